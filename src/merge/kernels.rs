//! The shared maths of every merge method, on f32 slices, parallel over
//! chunks: task vectors, top-k selection (ties to the lower flat index),
//! OBIM's exclusive assignment, sparsification, sign election, SLERP.
//! Every method in `methods.rs` is a composition of these.

use rayon::prelude::*;

const CHUNK: usize = 1 << 15;

/// δ = x − base.
pub fn task_vector(base: &[f32], x: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; base.len()];
    out.par_chunks_mut(CHUNK)
        .zip(base.par_chunks(CHUNK))
        .zip(x.par_chunks(CHUNK))
        .for_each(|((o, b), x)| {
            for ((o, b), x) in o.iter_mut().zip(b).zip(x) {
                *o = x - b;
            }
        });
    out
}

/// `out[i] = f(i, out[i])`, in parallel.
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

/// Puts the `k` best of `candidates` first and returns them: the largest
/// `scores`, ties to the lower index. Average O(n) (`select_nth_unstable_by`).
pub fn select_top(scores: &[f32], candidates: &mut [u32], k: usize) -> usize {
    let k = k.min(candidates.len());
    if k > 0 && k < candidates.len() {
        candidates.select_nth_unstable_by(k, |&a, &b| {
            scores[b as usize]
                .total_cmp(&scores[a as usize])
                .then(a.cmp(&b))
        });
    }
    k
}

/// No owner.
pub const UNOWNED: u8 = u8::MAX;

/// OBIM's exclusive iterative masking (DESIGN §3): inputs pick in `order`;
/// input k takes, among positions nobody owns yet, the `quotas[k]` with the
/// largest `scores[k]` (fewer if fewer remain). Returns each position's owner.
pub fn exclusive_assign(scores: &[Vec<f32>], quotas: &[usize], order: &[usize]) -> Vec<u8> {
    let n = scores.first().map_or(0, Vec::len);
    let mut owner = vec![UNOWNED; n];
    let mut free: Vec<u32> = (0..n as u32).collect();
    for &k in order {
        let taken = select_top(&scores[k], &mut free, quotas[k]);
        for &i in &free[..taken] {
            owner[i as usize] = k as u8;
        }
        free.drain(..taken);
    }
    owner
}

/// q = round(ratio · n), halves away from zero.
pub fn quota(ratio: f64, n: usize) -> usize {
    (ratio * n as f64).round().max(0.0) as usize
}

/// Keeps the `max(1, ⌊density·n⌋)` largest |δ| (mergekit's `magnitude`),
/// ties to the lower index; zeroes the rest.
pub fn keep_largest(delta: &mut [f32], density: f64) {
    if density >= 1.0 {
        return;
    }
    let n = delta.len();
    let k = ((density * n as f64) as usize).max(1);
    let magnitude: Vec<f32> = delta.par_iter().map(|d| d.abs()).collect();
    let mut candidates: Vec<u32> = (0..n as u32).collect();
    select_top(&magnitude, &mut candidates, k);
    let mut keep = vec![false; n];
    for &i in &candidates[..k.min(n)] {
        keep[i as usize] = true;
    }
    update(delta, |i, d| if keep[i] { d } else { 0.0 });
}

/// DARE's keep mask: element i is kept when the i-th output of a SplitMix64
/// stream seeded with `stream` is below `density` (as a uniform in [0, 1)).
/// The same seed gives the same mask on every run and thread count.
pub fn keep_random(delta: &mut [f32], density: f64, stream: u64) {
    if density >= 1.0 {
        return;
    }
    update(delta, |i, d| {
        if uniform(stream, i as u64) < density {
            d
        } else {
            0.0
        }
    });
}

/// The i-th output of SplitMix64 started at `state`, as a uniform in [0, 1).
pub fn uniform(state: u64, i: u64) -> f64 {
    let mut z = state.wrapping_add((i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// Rescales a sparsified δ to the L1 norm of the original (mergekit's
/// `rescale`): unchanged when either norm is below 1e-7.
pub fn rescale_l1(sparse: &mut [f32], original_l1: f64) {
    let after: f64 = sparse.par_iter().map(|x| x.abs() as f64).sum();
    if original_l1 < 1e-7 || after < 1e-7 {
        return;
    }
    let factor = (original_l1 / after) as f32;
    update(sparse, |_, x| x * factor);
}

pub fn l1(values: &[f32]) -> f64 {
    values.par_iter().map(|x| x.abs() as f64).sum()
}

/// TIES' sign election (mergekit `get_mask`, method `sum`): the sign of
/// Σₖ δₖ (ties to +), and for each δₖ whether its sign agrees. A zero never agrees.
pub fn sign_agreement(deltas: &[Vec<f32>]) -> Vec<Vec<bool>> {
    let n = deltas.first().map_or(0, Vec::len);
    let majority: Vec<f32> = (0..n)
        .into_par_iter()
        .map(|i| {
            if deltas.iter().map(|d| d[i]).sum::<f32>() >= 0.0 {
                1.0
            } else {
                -1.0
            }
        })
        .collect();
    deltas
        .iter()
        .map(|d| {
            d.par_iter()
                .zip(&majority)
                .map(|(x, m)| sign(*x) == *m)
                .collect()
        })
        .collect()
}

fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Spherical interpolation of two whole tensors (mergekit 0.1.5 `slerp`):
/// linear when the normalized vectors are nearly colinear (|dot| > 0.9995).
pub fn slerp(t: f64, a: &[f32], b: &[f32]) -> Vec<f32> {
    const EPS: f64 = 1e-8;
    let norm = |v: &[f32]| {
        v.par_iter()
            .map(|x| (*x as f64) * (*x as f64))
            .sum::<f64>()
            .sqrt()
    };
    let (na, nb) = (norm(a), norm(b));
    let na = if na > EPS { na } else { 1.0 };
    let nb = if nb > EPS { nb } else { 1.0 };
    let dot: f64 = a
        .par_iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 / na) * (*y as f64 / nb))
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
    a.par_iter().zip(b).map(|(x, y)| ca * x + cb * y).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_breaks_ties_by_index() {
        let scores = [1.0, 3.0, 3.0, 2.0, 3.0];
        let mut c: Vec<u32> = (0..5).collect();
        let k = select_top(&scores, &mut c, 2);
        let mut best = c[..k].to_vec();
        best.sort();
        assert_eq!(best, vec![1, 2]);
    }

    #[test]
    fn exclusive_assignment() {
        // Input 1 picks first and takes the two largest of its scores; input 0
        // takes the best two of what is left.
        let scores = vec![vec![9.0, 8.0, 7.0, 1.0, 0.5], vec![0.0, 5.0, 6.0, 0.0, 0.0]];
        let owner = exclusive_assign(&scores, &[2, 2], &[1, 0]);
        assert_eq!(owner, vec![0, 1, 1, 0, UNOWNED]);
        // Quotas larger than what remains are cut short.
        let owner = exclusive_assign(&scores, &[4, 4], &[0, 1]);
        assert_eq!(owner.iter().filter(|o| **o == 1).count(), 1);
    }

    #[test]
    fn random_masks_are_reproducible_and_keep_the_density() {
        let mut a = vec![1.0f32; 100_000];
        let mut b = a.clone();
        keep_random(&mut a, 0.3, 42);
        keep_random(&mut b, 0.3, 42);
        assert_eq!(a, b);
        let kept = a.iter().filter(|x| **x != 0.0).count() as f64 / 1e5;
        assert!((kept - 0.3).abs() < 0.01, "{kept}");
    }

    #[test]
    fn slerp_endpoints() {
        let a = vec![1.0f32, 0.0];
        let b = vec![0.0f32, 1.0];
        assert_eq!(slerp(0.0, &a, &b), a);
        let mid = slerp(0.5, &a, &b);
        assert!((mid[0] - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6);
    }
}
