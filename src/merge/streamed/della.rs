//! DELLA (mergekit 0.1.5 `sparsify.py`: `della_magprune`, then
//! `GeneralizedTaskArithmeticMerge`): each δ is ranked within its rows, so
//! this member of the task-vector family streams by whole rows
//! ([`Stream::in_rows`]). With `rescale`, a first pass ranks, draws and
//! notes the kept positions (one bit each) and the L1 norms before and
//! after; the writing pass applies them. Without, one pass does all.

use super::{Written, pack, rescale_factor};
use crate::merge::kernels::{draw, draw_threshold};
use crate::merge::{MergeError, TensorContext, add_task_vectors, dare_stream, f32s};
use crate::plan::TaskVectorParams;
use crate::recipe::Dtype;
use crate::stream::Stream;

/// How one input's δ is sparsified: the entry of magnitude rank r (0 = the
/// smallest, ties by the lower index) of a row of C is kept with
/// probability density − ε + 2ε·r/(C − 1), drawn from the SplitMix64 stream
/// `stream` as DARE's are (position i of the tensor draws its i-th
/// output). A row of one entry is kept with probability `density`
/// (mergekit divides 0 by 0 there).
#[derive(Clone, Copy)]
pub struct RankKeep {
    pub density: f64,
    pub epsilon: f64,
    pub stream: u64,
}

impl RankKeep {
    /// `keep[j]` ← all ones where entry j of `row` (which starts at flat
    /// position `start`) is kept, else 0.
    pub fn row(&self, row: &[f32], start: usize, keep: &mut [u32]) {
        let kept = |j: usize, threshold: u64| {
            u32::from(draw(self.stream, (start + j) as u64) < threshold).wrapping_neg()
        };
        if row.len() == 1 {
            keep[0] = kept(0, draw_threshold(self.density));
            return;
        }
        ROW.with_borrow_mut(|(order, spare, by_rank)| {
            by_rank.fill(self, row.len());
            ascending(row, order, spare);
            for (&entry, &threshold) in order.iter().zip(&by_rank.thresholds) {
                let j = entry as u32 as usize;
                keep[j] = kept(j, threshold);
            }
        });
    }
}

/// The draw thresholds ([`draw_threshold`]) of ranks 0 to C − 1 in rows
/// of C, for one density and ε: the same for every row of a tensor.
#[derive(Default)]
struct ByRank {
    of: Option<(usize, u64, u64)>,
    thresholds: Vec<u64>,
}

impl ByRank {
    fn fill(&mut self, rank: &RankKeep, cols: usize) {
        let of = Some((cols, rank.density.to_bits(), rank.epsilon.to_bits()));
        if self.of == of {
            return;
        }
        // mergekit works in f32: probs = (density − ε) + rank_norm·2·ε.
        let (low, spread) = (
            (rank.density - rank.epsilon) as f32,
            (2.0 * rank.epsilon) as f32,
        );
        let last = (cols - 1) as f32;
        self.thresholds.clear();
        self.thresholds
            .extend((0..cols).map(|r| draw_threshold(f64::from(low + (r as f32 / last) * spread))));
        self.of = of;
    }
}

/// `order` ← `row`'s entries by |v| ascending, ties by the lower index
/// (mergekit's `torch.sort` leaves tied entries in an unspecified order),
/// each as |v|'s bits above its index: a stable radix sort on the bits of
/// |v| that vary within the row, in as few digits of at most 11 bits as
/// cover them (deltas of bf16 weights share their low bits), the digits'
/// counts taken in one pass, a digit every entry shares skipped. `spare`
/// is scratch.
fn ascending(row: &[f32], order: &mut Vec<u64>, spare: &mut Vec<u64>) {
    const MAX_DIGIT: u32 = 11;
    order.clear();
    order.extend(
        row.iter()
            .enumerate()
            .map(|(j, v)| u64::from(v.to_bits() & 0x7fff_ffff) << 32 | j as u64),
    );
    let (any, all) = row.iter().fold((0u32, u32::MAX), |(any, all), v| {
        let m = v.to_bits() & 0x7fff_ffff;
        (any | m, all & m)
    });
    let varying = any ^ all;
    if varying == 0 {
        return;
    }
    let (lo, hi) = (varying.trailing_zeros(), 32 - varying.leading_zeros());
    let passes = (hi - lo).div_ceil(MAX_DIGIT) as usize;
    let width = (hi - lo).div_ceil(passes as u32);
    let mask = (1u64 << width) - 1;
    let shift = |p: usize| 32 + lo + p as u32 * width;
    let digit = |e: u64, p: usize| ((e >> shift(p)) & mask) as usize;
    let mut counts = [[0u32; 1 << MAX_DIGIT]; 3];
    // One loop per digit count, so the digits' shifts are unrolled.
    let [c0, c1, c2] = &mut counts;
    match passes {
        1 => order.iter().for_each(|&e| c0[digit(e, 0)] += 1),
        2 => order.iter().for_each(|&e| {
            c0[digit(e, 0)] += 1;
            c1[digit(e, 1)] += 1;
        }),
        _ => order.iter().for_each(|&e| {
            c0[digit(e, 0)] += 1;
            c1[digit(e, 1)] += 1;
            c2[digit(e, 2)] += 1;
        }),
    }
    spare.resize(row.len(), 0);
    for (p, count) in counts.iter_mut().enumerate().take(passes) {
        if count.iter().any(|&c| c as usize == row.len()) {
            continue;
        }
        let mut next = 0;
        for s in count.iter_mut() {
            (*s, next) = (next, next + *s);
        }
        for &e in order.iter() {
            let d = digit(e, p);
            spare[count[d] as usize] = e;
            count[d] += 1;
        }
        std::mem::swap(order, spare);
    }
}

thread_local! {
    /// One row's order, the sort's scratch and the thresholds by rank,
    /// reused from row to row.
    static ROW: std::cell::RefCell<(Vec<u64>, Vec<u64>, ByRank)> =
        std::cell::RefCell::new(Default::default());
    /// A chunk's keep masks.
    static KEEP: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `f(delta, keep masks)`: the masks of `delta` (chunk positions from
/// `start`, whole rows of `cols`) in this thread's scratch.
fn with_kept<T>(
    rank: &RankKeep,
    delta: &mut [f32],
    start: usize,
    cols: usize,
    f: impl FnOnce(&mut [f32], &[u32]) -> T,
) -> T {
    KEEP.with_borrow_mut(|keep| {
        keep.resize(delta.len(), 0);
        for (r, (row, keep)) in delta.chunks(cols).zip(keep.chunks_mut(cols)).enumerate() {
            rank.row(row, start + r * cols, keep);
        }
        f(delta, keep)
    })
}

/// DELLA's merge of one tensor: per input, δ sparsified by rank within
/// rows (and, with `rescale`, scaled back to its L1 norm), weighted, then
/// [`add_task_vectors`] (mergekit's order: trim, rescale, weight, sum).
pub fn merge<'o>(
    p: &TaskVectorParams,
    epsilons: &[f64],
    stream: &Stream,
    ctx: &TensorContext,
    dtype: Dtype,
    out: &'o mut [u8],
) -> Result<Written<'o>, MergeError> {
    for (density, epsilon) in p.densities.iter().zip(epsilons) {
        if *density < 1.0 && (density + epsilon >= 1.0 || density - epsilon <= 0.0) {
            return Err(MergeError::Invalid {
                tensor: ctx.name.to_string(),
                reason: format!(
                    "della needs density ± epsilon within (0, 1); density {density}, epsilon {epsilon}"
                ),
            });
        }
    }
    let cols = ctx.shape.last().copied().unwrap_or(1).max(1);
    let rows = stream.in_rows(cols);
    let m = p.weights.len();
    let all: Vec<usize> = (0..=m).collect();
    let ranks: Vec<Option<RankKeep>> = (0..m)
        .map(|k| {
            (p.densities[k] < 1.0).then(|| RankKeep {
                density: p.densities[k],
                epsilon: epsilons[k],
                stream: dare_stream(p.seed, ctx.name, k),
            })
        })
        .collect();
    let rescaled = |k: usize| p.rescale && ranks[k].is_some();
    // With rescale: per chunk, each rescaled input's kept positions (a bit
    // each) and its L1 norms before and after.
    let (kept, factors) = if (0..m).any(rescaled) {
        let per_chunk = rows.map(&all, |c, chunk| {
            let start = c * rows.chunk_size();
            let mut delta = Vec::with_capacity(chunk[0].len());
            (0..m)
                .map(|k| {
                    let Some(rank) = ranks[k].filter(|_| rescaled(k)) else {
                        return (Vec::new(), 0.0, 0.0);
                    };
                    delta.clear();
                    delta.extend(chunk[1 + k].iter().zip(chunk[0]).map(|(x, b)| x - b));
                    with_kept(&rank, &mut delta, start, cols, |delta, keep| {
                        let (mut before, mut after) = (0f64, 0f64);
                        for (d, k) in delta.iter().zip(keep) {
                            let magnitude = f64::from(d.abs());
                            before += magnitude;
                            after += f64::from(f32::from_bits(d.abs().to_bits() & k));
                        }
                        (pack(keep), before, after)
                    })
                })
                .collect::<Vec<(Vec<u64>, f64, f64)>>()
        });
        let factors: Vec<f32> = (0..m)
            .map(|k| {
                let (before, after) = per_chunk
                    .iter()
                    .fold((0.0, 0.0), |(b, a), c| (b + c[k].1, a + c[k].2));
                rescale_factor(before, after)
            })
            .collect();
        let kept: Vec<Vec<Vec<u64>>> = per_chunk
            .into_iter()
            .map(|c| c.into_iter().map(|(bits, _, _)| bits).collect())
            .collect();
        (kept, factors)
    } else {
        (vec![Vec::new(); rows.chunks()], vec![1.0; m])
    };
    let weights = f32s(&p.weights);
    let written = rows.write(&all, kept, dtype, out, |c, kept, chunk| {
        let Some((b, xs)) = chunk.split_first_mut() else {
            return;
        };
        let start = c * rows.chunk_size();
        for (k, x) in xs.iter_mut().enumerate() {
            x.iter_mut().zip(b.iter()).for_each(|(x, b)| *x -= b);
            let w = weights[k];
            // Selects on bits, not branches: keeping is a coin flip.
            let keep = |v: f32, keep: u32| f32::from_bits(v.to_bits() & keep);
            match ranks[k] {
                None => x.iter_mut().for_each(|v| *v *= w),
                Some(_) if rescaled(k) => {
                    let factor = factors[k];
                    for (x, bits) in x.chunks_mut(64).zip(&kept[k]) {
                        for (i, v) in x.iter_mut().enumerate() {
                            let bit = ((bits >> i) & 1) as u32;
                            *v = keep(*v * factor * w, bit.wrapping_neg());
                        }
                    }
                }
                Some(rank) => with_kept(&rank, x, start, cols, |x, mask| {
                    x.iter_mut()
                        .zip(mask)
                        .for_each(|(v, m)| *v = keep(*v * w, *m));
                }),
            }
        }
        let deltas: Vec<&[f32]> = xs.iter().map(|x| &**x).collect();
        add_task_vectors(p, &weights, b, &deltas);
    });
    Ok(Written::of(written))
}

#[cfg(test)]
mod tests {
    use super::super::tests::{encoded, stream_of};
    use super::*;
    use crate::checkpoint::TensorDtype;
    use crate::merge::kernels::uniform;
    use crate::plan::Sparsify;
    use crate::tensors::to_f32;

    /// DELLA as its definition reads, on whole tensors: per row a sort by
    /// (|δ|, index), a draw per entry, the L1 ratio over the tensor.
    fn della_by_definition(
        p: &TaskVectorParams,
        eps: &[f64],
        ops: &[Vec<f32>],
        cols: usize,
    ) -> Vec<f32> {
        let (base, inputs) = ops.split_first().expect("a base");
        let deltas: Vec<Vec<f32>> = inputs
            .iter()
            .enumerate()
            .map(|(k, x)| {
                let stream = dare_stream(p.seed, "t", k);
                let d: Vec<f32> = x.iter().zip(base).map(|(x, b)| x - b).collect();
                let mut kept = vec![0f32; d.len()];
                for (r, row) in d.chunks(cols).enumerate() {
                    let mut order: Vec<usize> = (0..row.len()).collect();
                    order.sort_by(|&a, &b| row[a].abs().total_cmp(&row[b].abs()).then(a.cmp(&b)));
                    let (low, spread) = ((p.densities[k] - eps[k]) as f32, (2.0 * eps[k]) as f32);
                    for (rank, &j) in order.iter().enumerate() {
                        let probability = low + (rank as f32 / (row.len() - 1) as f32) * spread;
                        if uniform(stream, (r * cols + j) as u64) < f64::from(probability) {
                            kept[r * cols + j] = row[j];
                        }
                    }
                }
                let l1 = |v: &[f32]| v.iter().map(|x| f64::from(x.abs())).sum::<f64>();
                let factor = if p.rescale {
                    (l1(&d) / l1(&kept)) as f32
                } else {
                    1.0
                };
                kept.iter()
                    .map(|v| v * factor * p.weights[k] as f32)
                    .collect()
            })
            .collect();
        let mut merged = base.clone();
        let parts: Vec<&[f32]> = deltas.iter().map(|d| &d[..]).collect();
        add_task_vectors(p, &f32s(&p.weights), &mut merged, &parts);
        merged
    }

    #[test]
    fn streamed_by_rows_equals_the_definition() {
        // Rows of 5000 do not divide a chunk: 6 to a chunk, the last chunk
        // short; values on a bf16 grid, so many |δ| tie.
        let (rows, cols) = (13, 5000);
        let value = |i: usize, s: usize| {
            let v = (((i * 7919 + s * 104_729) % 1021) as f32 - 510.0) / 4096.0;
            half::bf16::from_f32(v).to_f32()
        };
        let ops: Vec<Vec<f32>> = (0..3)
            .map(|s| (0..rows * cols).map(|i| value(i, s)).collect())
            .collect();
        for rescale in [true, false] {
            let p = TaskVectorParams {
                sparsify: Sparsify::MagnitudeRank {
                    epsilons: vec![0.1, 0.2],
                },
                elect_signs: true,
                weights: vec![1.0, 0.7],
                densities: vec![0.5, 0.4],
                normalize: true,
                rescale,
                lambda: 1.0,
                seed: 7,
                int8_mask: false,
            };
            let eps = [0.1, 0.2];
            let bytes = encoded(&ops, Dtype::F32);
            let stream = stream_of(&bytes, TensorDtype::F32);
            let ctx = TensorContext {
                name: "t",
                shape: &[rows, cols],
                obd: &[None, None],
                grams: &[],
            };
            let mut out = vec![0; rows * cols * 4];
            let written = merge(&p, &eps, &stream, &ctx, Dtype::F32, &mut out).expect("merges");
            let streamed = to_f32(written.bytes, TensorDtype::F32).expect("f32");
            let expected = della_by_definition(&p, &eps, &ops, cols);
            for (i, (s, e)) in streamed.iter().zip(&expected).enumerate() {
                assert!(
                    (s - e).abs() <= 1e-6 * (1.0 + e.abs()),
                    "rescale {rescale}, at {i}: {s} vs {e}"
                );
            }
        }
    }

    #[test]
    fn radix_order_is_by_magnitude_then_index() {
        // Signs, ties, zeros of both signs, digits that vary and digits that do not.
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
        let entries: Vec<u32> = order.iter().map(|&e| e as u32).collect();
        assert_eq!(entries, sorted);
        // One value repeated: every digit is shared, the order stays by index.
        ascending(&[2.0; 9], &mut order, &mut spare);
        assert_eq!(
            order.iter().map(|&e| e as u32).collect::<Vec<_>>(),
            (0..9).collect::<Vec<u32>>()
        );
    }

    #[test]
    fn rows_keep_what_a_full_sort_keeps() {
        // Rows with spread magnitudes, heavy ties (a bf16 grid, zeros of
        // both signs), one value repeated, a few large buckets; wide and
        // narrow ε.
        let rows: Vec<Vec<f32>> = vec![
            (0..3000)
                .map(|i| half::bf16::from_f32(((i * 7919 % 1021) as f32 - 510.0) / 4096.0).to_f32())
                .collect(),
            (0..3000)
                .map(|i| if i % 3 == 0 { 0.0 } else { -0.0 })
                .collect(),
            (0..700).map(|i| [0.5, -0.5, 0.25, 1e-30][i % 4]).collect(),
            (0..5000)
                .map(|i| ((i * 31 % 97) as f32).exp2() * if i % 2 == 0 { 1.0 } else { -1.0 })
                .collect(),
            vec![3.0, -1.0],
        ];
        for (r, row) in rows.iter().enumerate() {
            for (density, epsilon) in [(0.5, 0.1), (0.5, 0.45), (0.2, 0.01)] {
                let rank = RankKeep {
                    density,
                    epsilon,
                    stream: 11 + r as u64,
                };
                let mut keep = vec![0u32; row.len()];
                rank.row(row, 1000, &mut keep);
                let mut order: Vec<usize> = (0..row.len()).collect();
                order.sort_by(|&a, &b| row[a].abs().total_cmp(&row[b].abs()).then(a.cmp(&b)));
                let (low, spread) = ((density - epsilon) as f32, (2.0 * epsilon) as f32);
                for (position, &j) in order.iter().enumerate() {
                    let p = low + (position as f32 / (row.len() - 1) as f32) * spread;
                    let expected = uniform(rank.stream, (1000 + j) as u64) < f64::from(p);
                    assert_eq!(keep[j] != 0, expected, "row {r}, ε {epsilon}, entry {j}");
                }
            }
        }
    }

    #[test]
    fn keep_probability_grows_with_rank() {
        // 2000 rows of 5: the rank-r entry is kept with p = 0.3 + 0.1·r.
        let rows = 2000;
        let row = [0.5f32, -0.1, 0.3, 0.2, -0.4]; // ranks 4, 0, 2, 1, 3
        let rank = RankKeep {
            density: 0.5,
            epsilon: 0.2,
            stream: 42,
        };
        let mut keep = vec![0u32; 5];
        let mut kept = [0usize; 5];
        for r in 0..rows {
            rank.row(&row, r * 5, &mut keep);
            for (n, k) in kept.iter_mut().zip(&keep) {
                *n += usize::from(*k != 0);
            }
        }
        for (j, rank) in [(1, 0.0), (3, 1.0), (2, 2.0), (4, 3.0), (0, 4.0)] {
            let (rate, expected) = (kept[j] as f64 / rows as f64, 0.3 + 0.1 * rank);
            assert!(
                (rate - expected).abs() < 0.04,
                "rank {rank}: kept {rate} of rows, expected {expected}"
            );
        }
    }
}
