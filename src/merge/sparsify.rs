//! The sparsifiers of breadcrumbs and DELLA (mergekit 0.1.5 `sparsify.py`:
//! `magnitude_outliers`, `della_magprune`). TIES' and DARE's are in
//! `kernels.rs` (`keep_largest`, `keep_random`).

use rayon::prelude::*;

use super::kernels::{uniform, update};

/// Positions sorted by |δ| ascending, ties by the lower index (mergekit's
/// `torch.sort` leaves tied positions in an unspecified order).
fn ascending_by_magnitude(delta: &[f32]) -> Vec<u64> {
    let mut keys: Vec<u64> = delta
        .par_iter()
        .enumerate()
        .map(|(i, v)| (u64::from(v.to_bits() & 0x7fff_ffff) << 32) | i as u64)
        .collect();
    keys.par_sort_unstable();
    keys
}

/// Breadcrumbs (`magnitude_outliers`): of N entries, drops the
/// ⌊gamma·N⌋ largest |δ| and as many of the smallest as leave ⌊density·N⌋
/// (fewer outliers go when both do not fit); keeps the rest times `weight`.
pub fn keep_middle(delta: &mut [f32], density: f64, gamma: f64, weight: f32) {
    let n = delta.len();
    if density >= 1.0 {
        update(delta, |_, v| v * weight);
        return;
    }
    let target = (density * n as f64) as usize;
    let top = (gamma * n as f64) as usize;
    let bottom = n.saturating_sub(target + top);
    let order = ascending_by_magnitude(delta);
    let mut keep = vec![false; n];
    for key in &order[bottom..(bottom + target).min(n)] {
        keep[(key & 0xffff_ffff) as usize] = true;
    }
    update(delta, |i, v| if keep[i] { v * weight } else { 0.0 });
}

/// DELLA (`della_magprune`): in each row (the last axis; a vector is one
/// row), the entry of magnitude rank r (0 = smallest, ties by the lower
/// index) of C is kept with probability density − ε + 2ε·r/(C − 1), drawn
/// from the SplitMix64 stream `stream` as DARE's are; kept entries are
/// multiplied by `weight`. A row of one entry is kept with probability
/// `density` (mergekit divides 0 by 0 there).
pub fn keep_by_rank(
    delta: &mut [f32],
    cols: usize,
    density: f64,
    epsilon: f64,
    stream: u64,
    weight: f32,
) {
    if density >= 1.0 {
        update(delta, |_, v| v * weight);
        return;
    }
    let cols = cols.max(1);
    // mergekit works in f32: probs = (density − ε) + rank_norm·2·ε.
    let (low, spread) = ((density - epsilon) as f32, (2.0 * epsilon) as f32);
    delta
        .par_chunks_mut(cols)
        .enumerate()
        .for_each(|(row, values)| {
            let order = ascending_by_magnitude(values);
            let mut probability = vec![density as f32; values.len()];
            if values.len() > 1 {
                let last = (values.len() - 1) as f32;
                for (rank, key) in order.iter().enumerate() {
                    probability[(key & 0xffff_ffff) as usize] = low + (rank as f32 / last) * spread;
                }
            }
            let start = row * cols;
            for (j, v) in values.iter_mut().enumerate() {
                let keep = uniform(stream, (start + j) as u64) < f64::from(probability[j]);
                *v = if keep { *v * weight } else { 0.0 };
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breadcrumbs_drop_outliers_and_the_smallest() {
        // |δ| ranks: 0.1 < 0.2 < 0.3 < 0.4 < 0.5 < ... < 1.0 (10 entries).
        let mut d: Vec<f32> = (1..=10).map(|i| i as f32 / 10.0).collect();
        d.reverse();
        // density 0.5 keeps 5, gamma 0.2 drops the 2 largest: ranks 4..8 stay.
        keep_middle(&mut d, 0.5, 0.2, 2.0);
        let kept: Vec<f32> = d.iter().copied().filter(|v| *v != 0.0).collect();
        assert_eq!(kept, vec![1.6, 1.4, 1.2, 1.0, 0.8]);
    }

    #[test]
    fn breadcrumbs_keep_the_density_when_outliers_do_not_fit() {
        let mut d: Vec<f32> = (1..=10).map(|i| i as f32).collect();
        // 9 kept and 5 outliers do not fit in 10: nothing from the bottom goes.
        keep_middle(&mut d, 0.9, 0.5, 1.0);
        assert_eq!(d.iter().filter(|v| **v != 0.0).count(), 9);
        assert_eq!(d[9], 0.0, "the largest is dropped");
    }

    #[test]
    fn della_keep_probability_grows_with_rank() {
        // 2000 rows of 5: the rank-r entry is kept with p = 0.3 + 0.1·r.
        let rows = 2000;
        let row = [0.5f32, -0.1, 0.3, 0.2, -0.4]; // ranks 4, 0, 2, 1, 3
        let mut d: Vec<f32> = row.iter().copied().cycle().take(rows * 5).collect();
        keep_by_rank(&mut d, 5, 0.5, 0.2, 42, 1.0);
        let rate =
            |j: usize| (0..rows).filter(|r| d[r * 5 + j] != 0.0).count() as f64 / rows as f64;
        for (j, rank) in [(1, 0.0), (3, 1.0), (2, 2.0), (4, 3.0), (0, 4.0)] {
            let expected = 0.3 + 0.1 * rank;
            assert!(
                (rate(j) - expected).abs() < 0.04,
                "rank {rank}: kept {} of rows, expected {expected}",
                rate(j)
            );
        }
    }
}
