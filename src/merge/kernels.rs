//! The shared maths of the whole-tensor merge methods, on f32 buffers,
//! parallel over chunks: task vectors in place, L1 norms and rescaling,
//! DARE's random stream, OBIM's keys and quotas, SLERP. Buffers are
//! updated in place so a merge allocates little beyond its inputs. Top-k
//! selection is in `streamed/select.rs`, the streamed methods in `streamed/`.

use rayon::prelude::*;

const CHUNK: usize = 1 << 15;

/// `values[i] = f(i, values[i])`, in parallel.
pub fn update(values: &mut [f32], f: impl Fn(usize, f32) -> f32 + Sync) {
    values
        .par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            for (j, v) in chunk.iter_mut().enumerate() {
                *v = f(c * CHUNK + j, *v);
            }
        });
}

/// `f(start, chunk)` on consecutive chunks of `values`, in parallel, for
/// loops the compiler can vectorize.
pub fn update_chunks<T: Send>(values: &mut [T], f: impl Fn(usize, &mut [T]) + Sync) {
    values
        .par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| f(c * CHUNK, chunk));
}

/// x ← x − base: the task vector, in place.
pub fn subtract(x: &mut [f32], base: &[f32]) {
    update_chunks(x, |start, c| {
        for (v, b) in c.iter_mut().zip(&base[start..]) {
            *v -= b;
        }
    });
}

/// A u32 whose order is `f32::total_cmp`'s.
pub fn order_key(v: f32) -> u32 {
    // Negative: all bits flipped; otherwise the sign bit set. No branch.
    let bits = v.to_bits();
    bits ^ (((bits as i32) >> 31) as u32 | 0x8000_0000)
}

/// The f32 whose [`order_key`] is `key`.
pub fn from_order_key(key: u32) -> f32 {
    // Keys with the top bit set were non-negative: only the sign bit was
    // set; the others were negative, every bit flipped.
    let mask = if key & 0x8000_0000 != 0 {
        0x8000_0000
    } else {
        u32::MAX
    };
    f32::from_bits(key ^ mask)
}

/// No owner.
pub const UNOWNED: u8 = u8::MAX;

/// q = round(ratio · n), halves away from zero.
pub fn quota(ratio: f64, n: usize) -> usize {
    (ratio * n as f64).round().max(0.0) as usize
}

/// The i-th output of SplitMix64 started at `state`, as a uniform in [0, 1).
pub fn uniform(state: u64, i: u64) -> f64 {
    draw(state, i) as f64 / (1u64 << 53) as f64
}

/// The top 53 bits of the i-th output of SplitMix64 started at `state`:
/// [`uniform`] times 2⁵³, an integer.
pub fn draw(state: u64, i: u64) -> u64 {
    let mut z = state.wrapping_add((i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    z >> 11
}

/// The integer t with `draw(s, i) < t` exactly when `uniform(s, i) <
/// probability`: the draws are integers, so the least one not below
/// probability·2⁵³ (a product by a power of two, exact).
pub fn draw_threshold(probability: f64) -> u64 {
    (probability.max(0.0) * (1u64 << 53) as f64).ceil() as u64
}

/// Σ|x| in f64.
pub fn l1(values: &[f32]) -> f64 {
    values
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|x| x.abs() as f64).sum::<f64>())
        .sum()
}

/// Rescales a sparsified δ to the L1 norm of the original (mergekit's
/// `rescale`; no rescaling when either norm is below 1e-7), then multiplies
/// by `weight`: (x·factor)·weight, mergekit's products in one pass.
pub fn rescale_l1(sparse: &mut [f32], original_l1: f64, weight: f32) {
    let after = l1(sparse);
    let factor = if original_l1 < 1e-7 || after < 1e-7 {
        1.0
    } else {
        (original_l1 / after) as f32
    };
    update(sparse, |_, x| x * factor * weight);
}

/// Spherical interpolation of two whole tensors (mergekit 0.1.5 `slerp`),
/// written into `a`: linear when the normalized vectors are nearly colinear
/// (|dot| > 0.9995).
pub fn slerp(t: f64, a: &mut [f32], b: &[f32]) {
    const EPS: f64 = 1e-8;
    let norm = |v: &[f32]| {
        v.par_chunks(CHUNK)
            .map(|c| c.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>())
            .sum::<f64>()
            .sqrt()
    };
    let (na, nb) = (norm(a), norm(b));
    let na = if na > EPS { na } else { 1.0 };
    let nb = if nb > EPS { nb } else { 1.0 };
    let dot: f64 = a
        .par_chunks(CHUNK)
        .zip(b.par_chunks(CHUNK))
        .map(|(a, b)| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (*x as f64 / na) * (*y as f64 / nb))
                .sum::<f64>()
        })
        .sum::<f64>()
        .clamp(-1.0, 1.0);
    let (ca, cb) = if dot.abs() > 0.9995 {
        (1.0 - t, t)
    } else {
        let theta = dot.acos();
        let s = theta.sin();
        (((1.0 - t) * theta).sin() / s, (t * theta).sin() / s)
    };
    let (ca, cb) = (ca as f32, cb as f32);
    update(a, |i, x| ca * x + cb * b[i]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_keys_invert() {
        for v in [
            0.0f32,
            -0.0,
            1.5,
            -1.5,
            f32::MIN_POSITIVE,
            -3e-40,
            f32::MAX,
            f32::MIN,
        ] {
            assert_eq!(from_order_key(order_key(v)).to_bits(), v.to_bits());
        }
    }

    #[test]
    fn slerp_endpoints() {
        let mut a = vec![1.0f32, 0.0];
        slerp(0.0, &mut a, &[0.0, 1.0]);
        assert_eq!(a, vec![1.0, 0.0]);
        let mut mid = vec![1.0f32, 0.0];
        slerp(0.5, &mut mid, &[0.0, 1.0]);
        assert!((mid[0] - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6);
    }
}
