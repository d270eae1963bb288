//! mergekit's `sce` (0.1.5 `merge_methods/sce.py`) as passes over a
//! [`Stream`]: keep the `select_topk` fraction of positions with the
//! largest variance across the task vectors (of those with any), weight
//! each task vector by its mean square over the kept positions (over their
//! sum), elect signs as TIES does and average the agreeing ones. The
//! variance is the key of a top-k selection (`select.rs`: two counting
//! passes); a pass sums the squares; the last writes. No whole-tensor f32
//! copy is made.

use super::select::{self, Count, Cut, Rule, with_keys};
use super::{Written, pack};
use crate::merge::{MergeError, TensorContext};
use crate::recipe::Dtype;
use crate::stream::Stream;
use crate::tensors::front;

/// `keys` ← the bits of each position's variance across the task vectors
/// (population variance in f32, mergekit's order: the mean, then the mean
/// square deviation), which order like the variance. Input by input over
/// the chunk, so the loops vectorize.
fn variances(chunk: &[&[f32]], keys: &mut [u32]) {
    let Some((b, xs)) = chunk.split_first() else {
        return;
    };
    let (n, k) = (b.len(), xs.len() as f32);
    let variance: &mut [f32] = &mut bytemuck::cast_slice_mut(keys)[..n];
    MEAN.with_borrow_mut(|mean| {
        let mean = front(mean, n);
        mean.fill(0.0);
        for x in xs {
            let x = &x[..n];
            for i in 0..n {
                mean[i] += x[i] - b[i];
            }
        }
        mean.iter_mut().for_each(|m| *m /= k);
        variance.fill(0.0);
        for x in xs {
            let x = &x[..n];
            for i in 0..n {
                let d = x[i] - b[i] - mean[i];
                variance[i] += d * d;
            }
        }
    });
    for v in variance.iter_mut() {
        *v = f32::from_bits((*v / k).to_bits() & 0x7fff_ffff);
    }
}

thread_local! {
    /// A chunk's means across the task vectors.
    static MEAN: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The writing pass's sums per position: of the task vectors, of the
    /// agreeing weighted ones and of their weights.
    static SUMS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Σ (masked) d² over a chunk in f64, in eight fixed lanes (so the adds
/// pipeline) summed at the end.
fn sum_of_squares(x: &[f32], b: &[f32], keep: &[u32]) -> f64 {
    let mut lanes = [0f64; 8];
    let square = |x: f32, b: f32, k: u32| {
        let d = f32::from_bits((x - b).to_bits() & k);
        f64::from(d * d)
    };
    let (xs, x_tail) = x.as_chunks::<8>();
    let (bs, b_tail) = b.as_chunks::<8>();
    let (ks, k_tail) = keep.as_chunks::<8>();
    for ((x, b), k) in xs.iter().zip(bs).zip(ks) {
        for l in 0..8 {
            lanes[l] += square(x[l], b[l], k[l]);
        }
    }
    let tail: f64 = (x_tail.iter().zip(b_tail).zip(k_tail))
        .map(|((x, b), k)| square(*x, *b, *k))
        .sum();
    lanes.iter().sum::<f64>() + tail
}

/// `keep` ← chunk `c`'s keep mask (`chunk`: the base, then the inputs):
/// all ones where the position is among the selected, else 0.
fn kept(cut: &Cut, c: usize, chunk: &[&[f32]], keep: &mut [u32]) {
    match cut.rule(c) {
        Rule::Nothing => keep.fill(0),
        Rule::From(0) => keep.fill(u32::MAX),
        rule => {
            variances(chunk, keep);
            let mut selected = rule.selector();
            keep.iter_mut()
                .for_each(|k| *k = u32::from(selected(*k)).wrapping_neg());
        }
    }
}

/// Merges one tensor whose operands are `stream`'s (the base, then the
/// inputs) into the front of `out`: the encoded bytes and how many merged
/// values are not finite.
pub fn merge<'o>(
    select_topk: f64,
    stream: &Stream,
    ctx: &TensorContext,
    dtype: Dtype,
    out: &'o mut [u8],
) -> Result<Written<'o>, MergeError> {
    let m = stream.operands() - 1;
    if m == 0 {
        return Err(MergeError::Invalid {
            tensor: ctx.name.to_string(),
            reason: "sce needs an input".to_string(),
        });
    }
    let all: Vec<usize> = (0..=m).collect();
    let cut = if select_topk >= 1.0 {
        Cut::Everything
    } else if select_topk <= 0.0 {
        Cut::Nothing
    } else {
        // mergekit: int(count_nonzero(var) · density), a product in f32.
        let counts: Vec<Count> = vec![Box::new(move |h: &[u64], zeros: u64| {
            let nonzero = h.iter().sum::<u64>() - zeros;
            (nonzero as f32 * select_topk as f32) as usize
        })];
        select::cuts(stream, &all, &counts, &[], &|_, _, chunk, keys| {
            variances(chunk, keys)
        })
        .pop()
        .unwrap_or(Cut::Nothing)
    };
    // Each task vector's sum of squares where kept, in f64, chunk by chunk
    // in order; its mean square over all positions weights it. The kept
    // positions go to the writing pass as bits.
    let per_chunk = stream.map(&all, |c, chunk| {
        with_keys(chunk[0].len(), |keep| {
            kept(&cut, c, chunk, keep);
            let keep = &*keep;
            let squares: Vec<f64> = chunk[1..]
                .iter()
                .map(|x| sum_of_squares(x, chunk[0], keep))
                .collect();
            (squares, pack(keep))
        })
    });
    let n = stream.len().max(1) as f64;
    let squares: Vec<f64> = (0..m)
        .map(|k| per_chunk.iter().map(|c| c.0[k]).sum::<f64>() / n)
        .collect();
    let kept: Vec<Vec<u64>> = per_chunk.into_iter().map(|(_, bits)| bits).collect();
    let total: f64 = squares.iter().sum();
    let weights: Vec<f32> = if total.abs() < 1e-6 {
        vec![1.0 / m as f32; m]
    } else {
        squares.iter().map(|s| (s / total) as f32).collect()
    };
    let written = stream.write(&all, kept, dtype, out, |_, bits, chunk| {
        with_keys(chunk[0].len(), |keep| {
            for (keep, word) in keep.chunks_mut(64).zip(&bits) {
                for (i, k) in keep.iter_mut().enumerate() {
                    *k = ((word >> i) & 1).wrapping_neg() as u32;
                }
            }
            let Some((b, xs)) = chunk.split_first_mut() else {
                return;
            };
            let len = b.len();
            for x in xs.iter_mut() {
                for ((x, b), k) in x.iter_mut().zip(b.iter()).zip(&*keep) {
                    *x = f32::from_bits((*x - b).to_bits() & k);
                }
            }
            SUMS.with_borrow_mut(|sums| {
                let sums = front(sums, 3 * len);
                sums.fill(0.0);
                let (sum, rest) = sums.split_at_mut(len);
                let (merged, weight) = rest.split_at_mut(len);
                for x in xs.iter() {
                    sum.iter_mut().zip(x.iter()).for_each(|(s, d)| *s += d);
                }
                for (x, &w) in xs.iter().zip(&weights) {
                    let x: &[f32] = &x[..len];
                    for i in 0..len {
                        // The sign of the sum elects (+ when ≥ 0); selects
                        // on bits, as agreement is a coin flip.
                        let (d, up) = (x[i], sum[i] >= 0.0);
                        let agree = u32::from(((d > 0.0) & up) | ((d < 0.0) & !up)).wrapping_neg();
                        merged[i] += f32::from_bits((d * w).to_bits() & agree);
                        weight[i] += f32::from_bits(w.to_bits() & agree);
                    }
                }
                for ((b, m), w) in b.iter_mut().zip(&*merged).zip(&*weight) {
                    *b += m / w.max(1e-6);
                }
            });
        });
    });
    Ok(Written::of(written))
}

#[cfg(test)]
mod tests {
    use super::super::tests::{encoded, stream_of};
    use super::*;
    use crate::checkpoint::TensorDtype;
    use crate::merge::kernels::update;
    use crate::stream::CHUNK;
    use crate::tensors::to_f32;
    use rayon::prelude::*;

    /// mergekit's `sce` on whole tensors (the whole-tensor kernel obim had
    /// before SCE streamed): keep the `select_topk` fraction of positions with the
    /// largest variance across the task vectors (of those with any), elect
    /// signs as TIES does, weight each task vector by its mean square (over
    /// their sum), and average the agreeing ones. `base` becomes the merge;
    /// `deltas` hold the inputs and are turned into task vectors.
    fn sce_by_definition(base: &mut [f32], deltas: &mut [Vec<f32>], select_topk: f64) {
        for d in deltas.iter_mut() {
            d.iter_mut().zip(base.iter()).for_each(|(x, b)| *x -= b);
        }
        let k = deltas.len();
        if select_topk < 1.0 {
            let variance: Vec<f32> = (0..base.len())
                .into_par_iter()
                .map(|i| {
                    let mean = deltas.iter().map(|d| d[i]).sum::<f32>() / k as f32;
                    deltas.iter().map(|d| (d[i] - mean).powi(2)).sum::<f32>() / k as f32
                })
                .collect();
            let nonzero = variance.iter().filter(|v| **v != 0.0).count();
            // mergekit: int(count_nonzero(var) · density), a product in f32.
            let keep = if select_topk <= 0.0 {
                0
            } else {
                (nonzero as f32 * select_topk as f32) as usize
            };
            let mut order: Vec<u64> = variance
                .iter()
                .enumerate()
                .map(|(i, v)| (u64::from(!(v.abs().to_bits())) << 32) | i as u64)
                .collect();
            // The `keep` smallest keys (largest |variance|, ties to the lower
            // index: keys are unique), in no order: a selection, not a sort.
            if keep > 0 && keep < order.len() {
                order.select_nth_unstable(keep - 1);
            }
            let mut kept = vec![false; base.len()];
            for key in &order[..keep.min(order.len())] {
                kept[(key & 0xffff_ffff) as usize] = true;
            }
            for d in deltas.iter_mut() {
                update(d, |i, v| if kept[i] { v } else { 0.0 });
            }
        }
        let squares: Vec<f64> = deltas
            .iter()
            .map(|d| d.par_iter().map(|x| (x * x) as f64).sum::<f64>() / d.len().max(1) as f64)
            .collect();
        let total: f64 = squares.iter().sum();
        let weights: Vec<f32> = if total.abs() < 1e-6 {
            vec![1.0 / k as f32; k]
        } else {
            squares.iter().map(|s| (s / total) as f32).collect()
        };
        update(base, |i, b| {
            let sum: f32 = deltas.iter().map(|d| d[i]).sum();
            let up = sum >= 0.0;
            let (mut merged, mut weight) = (0f32, 0f32);
            for (d, w) in deltas.iter().zip(&weights) {
                let x = d[i];
                if (x > 0.0 && up) || (x < 0.0 && !up) {
                    merged += x * w;
                    weight += w;
                }
            }
            b + merged / weight.max(1e-6)
        });
    }

    /// SCE streamed from f32 `operands` (the base, then the inputs).
    fn streamed(select_topk: f64, operands: &[Vec<f32>]) -> Vec<f32> {
        let bytes = encoded(operands, Dtype::F32);
        let stream = stream_of(&bytes, TensorDtype::F32);
        let n = operands[0].len();
        let ctx = TensorContext {
            name: "t",
            shape: &[n],
            obd: &[],
            grams: &[],
        };
        let mut out = vec![0; n * 4];
        let written = merge(select_topk, &stream, &ctx, Dtype::F32, &mut out).expect("merges");
        to_f32(written.bytes, TensorDtype::F32).expect("f32")
    }

    #[test]
    fn weights_by_mean_square_and_elects_signs() {
        // Mean squares 1 and 4: weights 0.2, 0.8; position 1 disagrees in
        // sign and the larger sum (−2 + 1 < 0) elects −.
        let merged = streamed(1.0, &[vec![0.0; 2], vec![1.0, 1.0], vec![2.0, -2.0]]);
        assert!((merged[0] - (0.2 + 1.6)).abs() < 1e-6, "{merged:?}");
        assert!((merged[1] - (-2.0)).abs() < 1e-6, "{merged:?}");
    }

    #[test]
    fn streamed_equals_the_whole_tensor_merge() {
        // On a bf16 grid, so variances tie; some positions where every
        // input equals the base (variance 0, never selected); enough chunks
        // for the selection to sample, and a short last chunk.
        for n in [3 * CHUNK + 77, 64 * CHUNK + 77] {
            let value = |i: usize, s: usize| {
                let v = (((i * 7919 + s * 104_729) % 1021) as f32 - 510.0) / 4096.0;
                half::bf16::from_f32(v).to_f32()
            };
            let base: Vec<f32> = (0..n).map(|i| value(i, 0)).collect();
            let inputs: Vec<Vec<f32>> = (1..4)
                .map(|s| {
                    (0..n)
                        .map(|i| if i % 5 == 0 { base[i] } else { value(i, s) })
                        .collect()
                })
                .collect();
            for select_topk in [0.0, 0.1, 0.5, 1.0] {
                let operands: Vec<Vec<f32>> = std::iter::once(base.clone())
                    .chain(inputs.clone())
                    .collect();
                let got = streamed(select_topk, &operands);
                let (mut expected, mut deltas) = (base.clone(), inputs.clone());
                sce_by_definition(&mut expected, &mut deltas, select_topk);
                assert_eq!(got.len(), n);
                for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                    assert!(
                        (g - e).abs() <= 1e-6 * (1.0 + e.abs()),
                        "n {n}, topk {select_topk}, at {i}: {g} vs {e}"
                    );
                }
            }
        }
    }
}
