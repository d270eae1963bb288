//! DELLA's sparsifier (mergekit 0.1.5 `sparsify.py`: `della_magprune`),
//! which ranks within rows and so works on whole tensors. TIES', DARE's and
//! breadcrumbs' stream (`streamed.rs`).

use rayon::prelude::*;

use super::kernels::{uniform, update};

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
            let start = row * cols;
            let kept = |j: usize, v: f32, probability: f32| {
                // A select on bits, not a branch: keeping is a coin flip.
                let keep = uniform(stream, (start + j) as u64) < f64::from(probability);
                f32::from_bits((v * weight).to_bits() & u32::from(keep).wrapping_neg())
            };
            if values.len() == 1 {
                values[0] = kept(0, values[0], density as f32);
                return;
            }
            let last = (values.len() - 1) as f32;
            ROW_ORDER.with_borrow_mut(|(order, spare)| {
                ascending(values, order, spare);
                for (rank, &j) in order.iter().enumerate() {
                    let j = j as usize;
                    values[j] = kept(j, values[j], low + (rank as f32 / last) * spread);
                }
            });
        });
}

/// `order` ← the positions of `values` by |v| ascending, ties by the lower
/// index (mergekit's `torch.sort` leaves tied positions in an unspecified
/// order): a stable radix sort on |v|'s bits, a byte at a time from the
/// lowest, skipping bytes every value shares. `spare` is scratch.
fn ascending(values: &[f32], order: &mut Vec<u32>, spare: &mut Vec<u32>) {
    let key = |j: u32| values[j as usize].to_bits() & 0x7fff_ffff;
    order.clear();
    order.extend(0..values.len() as u32);
    spare.resize(values.len(), 0);
    for shift in [0, 8, 16, 24] {
        let mut starts = [0usize; 256];
        for &j in order.iter() {
            starts[(key(j) >> shift) as usize & 0xff] += 1;
        }
        if starts.contains(&values.len()) {
            continue;
        }
        let mut next = 0;
        for s in starts.iter_mut() {
            (*s, next) = (next, next + *s);
        }
        for &j in order.iter() {
            let digit = (key(j) >> shift) as usize & 0xff;
            spare[starts[digit]] = j;
            starts[digit] += 1;
        }
        std::mem::swap(order, spare);
    }
}

thread_local! {
    /// One row's order and the radix sort's scratch, reused from row to row.
    static ROW_ORDER: std::cell::RefCell<(Vec<u32>, Vec<u32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn radix_order_is_by_magnitude_then_index() {
        // Signs, ties, zeros of both signs, bytes that vary and bytes that do not.
        let values: Vec<f32> = (0..3000)
            .map(|i| ((i * 7919) % 263) as f32 / 64.0 * if i % 3 == 0 { -1.0 } else { 1.0 })
            .chain([0.0, -0.0, 1e-30, -1e30, 3.5])
            .collect();
        let (mut order, mut spare) = (Vec::new(), Vec::new());
        ascending(&values, &mut order, &mut spare);
        let mut sorted: Vec<u32> = (0..values.len() as u32).collect();
        sorted.sort_by(|&a, &b| {
            let m = |j: u32| values[j as usize].abs();
            m(a).total_cmp(&m(b)).then(a.cmp(&b))
        });
        assert_eq!(order, sorted);
        // One value repeated: every byte is shared, the order stays by index.
        ascending(&[2.0; 9], &mut order, &mut spare);
        assert_eq!(order, (0..9).collect::<Vec<u32>>());
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
