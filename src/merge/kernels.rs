//! The shared maths of every merge method, on f32 buffers, parallel over
//! chunks: task vectors in place, top-k selection (a threshold found with
//! `select_nth_unstable`, ties to the lower flat index), OBIM's exclusive
//! assignment, sparsification, sign election, SLERP. Every method in
//! `mod.rs` is a composition of these. Buffers are updated in place so a
//! merge allocates little beyond its inputs.

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

/// Where the k largest keys end: everything above `threshold`, and of the
/// keys equal to it the `ties_wanted` with the lowest indices; per chunk of
/// `CHUNK` positions, the ties before it and in it.
#[derive(Debug, Clone)]
enum Cut {
    Nothing,
    Everything,
    At {
        threshold: u32,
        ties_wanted: usize,
        chunks: Vec<(usize, usize)>,
    },
}

/// Which keys of one chunk are among the k largest.
#[derive(Debug, Clone, Copy)]
enum Rule {
    Nothing,
    /// Every key at least this.
    From(u32),
    /// Every key above `threshold`, and of the ties the first up to rank
    /// `wanted`, counting from `rank` (the ties before the chunk).
    Ranked {
        threshold: u32,
        rank: usize,
        wanted: usize,
    },
}

impl Cut {
    /// The rule for chunk `c`: chunks before the cut take all their ties,
    /// chunks after it none, and only the one the cut falls in ranks them.
    fn rule(&self, c: usize) -> Rule {
        match *self {
            Cut::Nothing => Rule::Nothing,
            Cut::Everything => Rule::From(0),
            Cut::At {
                threshold,
                ties_wanted,
                ref chunks,
            } => {
                let (before, ties) = chunks[c];
                if before + ties <= ties_wanted {
                    Rule::From(threshold)
                } else if before >= ties_wanted {
                    threshold.checked_add(1).map_or(Rule::Nothing, Rule::From)
                } else {
                    Rule::Ranked {
                        threshold,
                        rank: before,
                        wanted: ties_wanted,
                    }
                }
            }
        }
    }
}

/// For `Rule::Ranked`: whether each key, in order, is among the k largest.
fn ranked(threshold: u32, mut rank: usize, wanted: usize) -> impl FnMut(u32) -> bool {
    move |key| {
        let tie = key == threshold;
        rank += usize::from(tie);
        (key > threshold) | (tie & (rank <= wanted))
    }
}

/// Below this many positions, selection sorts partially instead of counting.
const SMALL: usize = 1 << 20;

/// Finds the cut for the `k` largest of `key(i)` (`None`: not eligible).
/// O(n) and parallel: a radix select over 16-bit digits: a histogram of the
/// high digits (skipped when the caller counted them: `high`), then per
/// chunk the low digits of the keys in the chosen high bucket, which give
/// the threshold and the ties in each chunk. Small inputs use
/// `select_nth_unstable`.
fn cut(
    n: usize,
    key: &(impl Fn(usize) -> Option<u32> + Sync),
    k: usize,
    high: Option<Vec<u64>>,
) -> Cut {
    if k == 0 {
        return Cut::Nothing;
    }
    let range = |c: usize| c * CHUNK..((c + 1) * CHUNK).min(n);
    let (threshold, greater, ties): (u32, usize, Vec<usize>) = if n < SMALL {
        let mut keys: Vec<u32> = (0..n).filter_map(key).collect();
        if k >= keys.len() {
            return Cut::Everything;
        }
        let (_, &mut threshold, _) = keys.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
        let greater = keys.iter().filter(|x| **x > threshold).count();
        let ties = (0..n.div_ceil(CHUNK))
            .map(|c| range(c).filter(|&i| key(i) == Some(threshold)).count())
            .collect();
        (threshold, greater, ties)
    } else {
        // From the largest digit down: the digit holding the k-th largest,
        // and the count above it.
        let locate = |h: &[u64], k: u64| -> Option<(usize, u64)> {
            let mut above = 0u64;
            for d in (0..h.len()).rev() {
                if above + h[d] >= k {
                    return Some((d, above));
                }
                above += h[d];
            }
            None
        };
        let high = high.unwrap_or_else(|| {
            // A few blocks per thread.
            let block = n.div_ceil((rayon::current_num_threads() * 4).max(1));
            histogram(n, block, key, |key| Some((key >> 16) as usize))
        });
        let Some((hi, above_hi)) = locate(&high, k as u64) else {
            return Cut::Everything;
        };
        let lows: Vec<Vec<u16>> = (0..n.div_ceil(CHUNK))
            .into_par_iter()
            .map(|c| {
                range(c)
                    .filter_map(|i| key(i).filter(|key| (key >> 16) as usize == hi))
                    .map(|key| key as u16)
                    .collect()
            })
            .collect();
        let mut low = vec![0u64; 1 << 16];
        lows.iter()
            .flatten()
            .for_each(|&l| low[usize::from(l)] += 1);
        let Some((lo, above_lo)) = locate(&low, k as u64 - above_hi) else {
            return Cut::Everything;
        };
        let ties = lows
            .par_iter()
            .map(|l| l.iter().filter(|&&l| usize::from(l) == lo).count())
            .collect();
        let threshold = ((hi as u32) << 16) | lo as u32;
        (threshold, (above_hi + above_lo) as usize, ties)
    };
    let chunks = ties
        .iter()
        .scan(0, |running, &t| {
            let before = *running;
            *running += t;
            Some((before, t))
        })
        .collect();
    Cut::At {
        threshold,
        ties_wanted: k - greater,
        chunks,
    }
}

/// Counts of `digit(key(i))` over all positions: per block (a few blocks per
/// thread), then summed. Generic, so that both closures inline.
fn histogram(
    n: usize,
    block: usize,
    key: &(impl Fn(usize) -> Option<u32> + Sync),
    digit: impl Fn(u32) -> Option<usize> + Sync,
) -> Vec<u64> {
    let partial: Vec<Vec<u32>> = (0..n.div_ceil(block))
        .into_par_iter()
        .map(|b| {
            let mut h = vec![0u32; 1 << 16];
            for i in b * block..((b + 1) * block).min(n) {
                if let Some(d) = key(i).and_then(&digit) {
                    h[d] += 1;
                }
            }
            h
        })
        .collect();
    sum_counts(partial.iter().map(Vec::as_slice))
}

/// Per-block counts summed into one histogram of the 2^16 digits (bins past
/// those are dropped).
fn sum_counts<'a>(parts: impl Iterator<Item = &'a [u32]>) -> Vec<u64> {
    let mut total = vec![0u64; 1 << 16];
    for h in parts {
        total
            .iter_mut()
            .zip(h)
            .for_each(|(t, &c)| *t += u64::from(c));
    }
    total
}

/// No owner.
pub const UNOWNED: u8 = u8::MAX;

/// q = round(ratio · n), halves away from zero.
pub fn quota(ratio: f64, n: usize) -> usize {
    (ratio * n as f64).round().max(0.0) as usize
}

/// The keys of one OBIM round: how many positions are free, and for large
/// tensors the histogram of the keys' high 16 bits (the first counting pass
/// of the selection, done while the keys are made).
pub struct Round {
    free: usize,
    high: Option<Vec<u64>>,
}

/// Fills `keys` with claim keys: `saliency(start, chunk)` writes the
/// saliencies (f32 bits) of a chunk of positions, which become, while the
/// chunk is in cache, their `order_key`, at least 1, where nobody owns the
/// position yet, and 0 where somebody does.
pub fn free_keys(
    keys: &mut [u32],
    owner: &[u8],
    saliency: impl Fn(usize, &mut [u32]) + Sync,
) -> Round {
    let count = keys.len() >= SMALL;
    // Owned positions (key 0) are counted in spare bins past the end, spread
    // so that the increments do not wait on each other; free keys are
    // at least 1 << 31, so no free key shares their high digits.
    const SPARE: usize = 8;
    let parts: Vec<(usize, Vec<u32>)> = keys
        .par_chunks_mut(CHUNK)
        .zip(owner.par_chunks(CHUNK))
        .enumerate()
        .fold(
            || (0, vec![0u32; if count { (1 << 16) + SPARE } else { 0 }]),
            |(mut free, mut high), (c, (keys, owner))| {
                saliency(c * CHUNK, keys);
                let mut n = 0u32;
                for (key, &o) in keys.iter_mut().zip(owner) {
                    let is_free = o == UNOWNED;
                    n += u32::from(is_free);
                    *key =
                        order_key(f32::from_bits(*key)).max(1) & u32::from(is_free).wrapping_neg();
                }
                free += n as usize;
                if count {
                    for (j, &key) in keys.iter().enumerate() {
                        let bin = if key == 0 {
                            (1 << 16) + j % SPARE
                        } else {
                            (key >> 16) as usize
                        };
                        high[bin] += 1;
                    }
                }
                (free, high)
            },
        )
        .collect();
    let free = parts.iter().map(|(f, _)| f).sum();
    let high = count.then(|| sum_counts(parts.iter().map(|(_, h)| h.as_slice())));
    Round { free, high }
}

/// One step of OBIM's exclusive iterative masking (DESIGN §3): input `k`
/// takes, among positions nobody owns yet, the `quota` with the largest
/// keys (see [`free_keys`]; fewer if fewer remain), among equal keys the
/// lower flat index. Returns how many it took. With the quota capped at the
/// free count the threshold is at least 1, so an owned position (key 0) is
/// never taken and no pass branches on who owns what.
pub fn claim(owner: &mut [u8], keys: &[u32], round: Round, quota: usize, k: u8) -> u64 {
    let cut = cut(
        keys.len(),
        &|i| Some(keys[i]),
        quota.min(round.free),
        round.high,
    );
    owner
        .par_chunks_mut(CHUNK)
        .zip(keys.par_chunks(CHUNK))
        .enumerate()
        .map(|(c, (owner, keys))| match cut.rule(c) {
            Rule::Nothing => 0,
            // (`Everything` is `From(0)`; owned positions, key 0, stay owned.)
            Rule::From(t) => take_where(owner, keys, k, |key| key >= t.max(1)),
            Rule::Ranked {
                threshold,
                rank,
                wanted,
            } => take_where(owner, keys, k, ranked(threshold, rank, wanted)),
        })
        .sum()
}

/// Gives position `i` to `k` where `selected(keys[i])`; returns how many.
fn take_where(owner: &mut [u8], keys: &[u32], k: u8, mut selected: impl FnMut(u32) -> bool) -> u64 {
    let mut taken = 0u32;
    for (o, &key) in owner.iter_mut().zip(keys) {
        let selected = selected(key);
        // A select on bits: with `if`, the compiler may keep a branch.
        let m = u8::from(selected).wrapping_neg();
        *o = (k & m) | (*o & !m);
        taken += u32::from(selected);
    }
    u64::from(taken)
}

/// Keeps the `max(1, ⌊density·n⌋)` largest |δ| (mergekit's `magnitude`),
/// ties to the lower index; zeroes the rest and multiplies what it keeps by
/// `weight`. One pass after the cut is found (two when some ties at the
/// threshold must go).
pub fn keep_largest(delta: &mut [f32], density: f64, weight: f32) {
    let n = delta.len();
    let k = if density >= 1.0 {
        n
    } else {
        ((density * n as f64) as usize).max(1)
    };
    // |δ|'s bits order like |δ| (NaN above infinity, as `order_key` has it).
    let magnitude = |v: f32| v.to_bits() & 0x7fff_ffff;
    let cut = {
        let d = &*delta;
        cut(n, &|i| Some(magnitude(d[i])), k, None)
    };
    // Keeps or zeroes without branches: in bf16-made deltas many values sit
    // at the threshold, so no test on them is predictable.
    let keep = |v: f32, keep: bool| {
        f32::from_bits((v * weight).to_bits() & u32::from(keep).wrapping_neg())
    };
    delta
        .par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| match cut.rule(c) {
            Rule::Nothing => chunk.fill(0.0),
            Rule::From(t) => chunk
                .iter_mut()
                .for_each(|v| *v = keep(*v, magnitude(*v) >= t)),
            Rule::Ranked {
                threshold,
                rank,
                wanted,
            } => {
                let mut selected = ranked(threshold, rank, wanted);
                chunk
                    .iter_mut()
                    .for_each(|v| *v = keep(*v, selected(magnitude(*v))));
            }
        });
}

/// DARE's keep mask: element i is kept, times `weight`, when the i-th output
/// of a SplitMix64 stream seeded with `stream` is below `density` (as a
/// uniform in [0, 1)); the rest is zeroed. The same seed gives the same mask
/// on every run and thread count.
pub fn keep_random(delta: &mut [f32], density: f64, stream: u64, weight: f32) {
    update(delta, |i, d| {
        if uniform(stream, i as u64) < density {
            d * weight
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

    /// The `k` largest `values` among the `eligible` positions, by [`claim`].
    fn top_k(values: &[f32], eligible: impl Fn(usize) -> bool, k: usize) -> Vec<bool> {
        let mut owner: Vec<u8> = (0..values.len())
            .map(|i| if eligible(i) { UNOWNED } else { 1 })
            .collect();
        let mut keys = vec![0u32; values.len()];
        let round = free_keys(&mut keys, &owner, |start, keys| {
            for (key, v) in keys.iter_mut().zip(&values[start..]) {
                *key = v.to_bits();
            }
        });
        claim(&mut owner, &keys, round, k, 0);
        owner.iter().map(|o| *o == 0).collect()
    }

    #[test]
    fn top_k_breaks_ties_by_index() {
        let values = [1.0, 3.0, 3.0, 2.0, 3.0];
        assert_eq!(
            top_k(&values, |_| true, 2),
            vec![false, true, true, false, false]
        );
        assert_eq!(
            top_k(&values, |i| i != 1, 2),
            vec![false, false, true, false, true]
        );
        assert_eq!(
            top_k(&values, |_| true, 4),
            vec![false, true, true, true, true]
        );
        assert_eq!(top_k(&values, |_| true, 9), vec![true; 5]);
        assert_eq!(top_k(&values, |_| true, 0), vec![false; 5]);
    }

    #[test]
    fn top_k_ties_across_chunks() {
        // Equal values everywhere: the lowest indices win, across chunk borders.
        let n = CHUNK * 3 + 17;
        let values = vec![0.5f32; n];
        let k = CHUNK + 5;
        let s = top_k(&values, |_| true, k);
        assert!(s[..k].iter().all(|x| *x) && s[k..].iter().all(|x| !*x));
    }

    #[test]
    fn radix_select_agrees_with_sorting() {
        // Large enough for the histogram path, with many ties and negative values.
        let n = (1 << 20) + 333;
        let values: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 - 400.0).collect();
        let mut order: Vec<usize> = (0..n).filter(|i| i % 3 != 0).collect();
        order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
        let m = order.len();
        for k in [1, 5000, m / 2, m - 1, m, m + 5] {
            let picked = top_k(&values, |i| i % 3 != 0, k);
            let mut expected = vec![false; n];
            order[..k.min(m)].iter().for_each(|&i| expected[i] = true);
            assert!(picked == expected, "k = {k}");
        }
    }

    #[test]
    fn keep_largest_agrees_with_sorting() {
        // The counting path, with ties at the threshold across chunk borders.
        let n = (1 << 20) + 333;
        let values: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 - 400.0).collect();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| values[b].abs().total_cmp(&values[a].abs()).then(a.cmp(&b)));
        for density in [0.001, 0.3, 0.5, 0.999] {
            let mut kept = values.clone();
            keep_largest(&mut kept, density, 2.0);
            let mut expected = vec![0.0f32; n];
            let k = (density * n as f64) as usize;
            order[..k]
                .iter()
                .for_each(|&i| expected[i] = values[i] * 2.0);
            assert!(kept == expected, "density {density}");
        }
    }

    #[test]
    fn exclusive_claims() {
        // Input 1 picks first and takes the two largest of its scores; input 0
        // takes the best two of what is left.
        let mut owner = vec![UNOWNED; 5];
        let mut keys = vec![0u32; 5];
        let mut step = |owner: &mut Vec<u8>, scores: [f32; 5], quota, k| {
            let round = free_keys(&mut keys, owner, |_, keys| {
                keys.iter_mut()
                    .zip(scores)
                    .for_each(|(k, s)| *k = s.to_bits())
            });
            claim(owner, &keys, round, quota, k)
        };
        assert_eq!(step(&mut owner, [0.0, 5.0, 6.0, 0.0, 0.0], 2, 1), 2);
        assert_eq!(step(&mut owner, [9.0, 8.0, 7.0, 1.0, 0.5], 2, 0), 2);
        assert_eq!(owner, vec![0, 1, 1, 0, UNOWNED]);
        // A quota larger than what remains is cut short; a zero score is
        // still a free position's, and taken.
        assert_eq!(step(&mut owner, [1.0, 1.0, 1.0, 1.0, 0.0], 4, 2), 1);
        assert_eq!(owner, vec![0, 1, 1, 0, 2]);
    }

    #[test]
    fn random_masks_are_reproducible_and_independent_of_threads() {
        let make = |threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut a = vec![1.0f32; 100_000];
                keep_random(&mut a, 0.3, 42, 1.0);
                a
            })
        };
        let a = make(1);
        assert_eq!(a, make(4));
        let kept = a.iter().filter(|x| **x != 0.0).count() as f64 / 1e5;
        assert!((kept - 0.3).abs() < 0.01, "{kept}");
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
