//! DELLA's sparsifier (mergekit 0.1.5 `sparsify.py`: `della_magprune`),
//! which ranks within rows and so works on whole tensors. TIES', DARE's and
//! breadcrumbs' stream (`streamed.rs`).

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
