//! The merges that need a whole-tensor statistic before any position can be
//! written, as passes over a [`Stream`]: TIES, DARE(-TIES), breadcrumbs,
//! task arithmetic with sign election and DELLA (by whole rows, `della.rs`),
//! OBIM, SCE (`sce.rs`) and model_stock per tensor. Each pass decodes a chunk of every operand it needs from the
//! mapped bytes, uses it while it is in cache and drops it, so no
//! whole-tensor f32 copy is made:
//!
//! - a magnitude threshold (TIES, breadcrumbs) takes two counting passes
//!   (`select.rs`), for every input at once;
//! - DARE's rescaling takes one pass for the L1 norms before and after;
//!   model_stock one for the Gram matrix of the task vectors;
//! - OBIM's claims take, per input, a counting pass (which also makes the
//!   previous input's claim) and a pass for the threshold's ties, and keep
//!   one byte per position: who owns it;
//! - the last pass trims, elects, sums and encodes.
//!
//! The arithmetic is that of the whole-tensor definitions in mergekit's
//! order, so a streamed merge equals one made from decoded tensors.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use super::kernels::{UNOWNED, order_key, quota, uniform};
use super::select::{
    self, BINS, Count, Cut, Kept, Rule, Window, count_high, count_high_keeping, with_keys,
};
use super::spherical::{stock_gram, stock_merge, stock_ratio};
use super::{
    MergeError, ObdStats, Pointwise, TensorContext, add_task_vectors, dare_stream, della, f32s, sce,
};
use crate::plan::{ObimParams, Op, Sparsify, TaskVectorParams};
use crate::recipe::{Dtype, Saliency};
use crate::stream::{Stream, nothing};

/// A streamed merge's output: the encoded bytes, how many merged values
/// are not finite, and for OBIM how many positions each input won.
pub struct Written<'o> {
    pub bytes: &'o [u8],
    pub non_finite: u64,
    pub won: Option<Vec<u64>>,
}

/// Whether `op` merges in passes here (else it is pointwise, or works on
/// whole tensors).
pub fn handles(op: &Op) -> bool {
    match op {
        Op::Obim(_) | Op::Sce { .. } => true,
        Op::ModelStock { filter_wise } => !filter_wise,
        Op::TaskVectors(_) => Pointwise::of(op).is_none(),
        _ => false,
    }
}

/// Merges one tensor whose operands are `stream`'s (the base, then the
/// inputs), encoded in `dtype` into the front of `out`.
pub fn merge<'o>(
    op: &Op,
    stream: &Stream,
    ctx: &TensorContext,
    dtype: Dtype,
    out: &'o mut Vec<u8>,
) -> Result<Written<'o>, MergeError> {
    match op {
        Op::TaskVectors(p) if handles(op) => match &p.sparsify {
            Sparsify::MagnitudeRank { epsilons } => {
                let (bytes, non_finite) = della::merge(p, epsilons, stream, ctx, dtype, out)?;
                Ok(Written {
                    bytes,
                    non_finite,
                    won: None,
                })
            }
            _ => Ok(task_vectors(p, stream, ctx, dtype, out)),
        },
        Op::Obim(p) => obim(p, stream, ctx, dtype, out),
        Op::ModelStock { filter_wise: false } => Ok(model_stock(stream, dtype, out)),
        Op::Sce { select_topk } => {
            let (bytes, non_finite) = sce::merge(*select_topk, stream, ctx, dtype, out)?;
            Ok(Written {
                bytes,
                non_finite,
                won: None,
            })
        }
        _ => Err(MergeError::Invalid {
            tensor: ctx.name.to_string(),
            reason: "this method does not merge in passes".to_string(),
        }),
    }
}

/// |v|'s bits, which order like |v|.
fn magnitude(v: f32) -> u32 {
    v.to_bits() & 0x7fff_ffff
}

/// Which entries of one input's δ are kept.
enum Mask {
    All,
    /// The largest |δ| (TIES).
    Top(Cut),
    /// Breadcrumbs: ascending by |δ| (ties: the lower index first), the
    /// ranks from `lower`'s count up to `upper`'s: on the key !|δ|, in
    /// `upper`'s cut and not in `lower`'s.
    Middle {
        upper: Cut,
        lower: Cut,
    },
    /// DARE: each entry with probability `density`, from a SplitMix64
    /// stream (position i draws its i-th output; chunks of `chunk`).
    Random {
        stream: u64,
        density: f64,
        chunk: usize,
    },
}

impl Mask {
    /// `d` ← `d`·`weight` where kept, +0 elsewhere, for chunk `c`. Selects
    /// on bits rather than branches: in bf16-made deltas many values sit at
    /// a threshold, so no test on them is predictable.
    fn apply(&self, c: usize, d: &mut [f32], weight: f32) {
        let keep = |v: f32, keep: bool| {
            f32::from_bits((v * weight).to_bits() & u32::from(keep).wrapping_neg())
        };
        match self {
            Mask::All => d.iter_mut().for_each(|v| *v *= weight),
            Mask::Top(cut) => match cut.rule(c) {
                Rule::Nothing => d.fill(0.0),
                Rule::From(t) => d.iter_mut().for_each(|v| *v = keep(*v, magnitude(*v) >= t)),
                rule => {
                    let mut selected = rule.selector();
                    d.iter_mut()
                        .for_each(|v| *v = keep(*v, selected(magnitude(*v))));
                }
            },
            Mask::Middle { upper, lower } => match (upper.rule(c), lower.rule(c)) {
                (Rule::Nothing, _) => d.fill(0.0),
                // Every chunk but the (at most two) a cut falls in: no ties
                // to rank, so a loop the compiler vectorizes.
                (Rule::From(u), Rule::Nothing) => d
                    .iter_mut()
                    .for_each(|v| *v = keep(*v, !magnitude(*v) >= u)),
                (Rule::From(u), Rule::From(l)) => d.iter_mut().for_each(|v| {
                    let key = !magnitude(*v);
                    *v = keep(*v, (key >= u) & (key < l));
                }),
                (upper, lower) => {
                    let (mut upper, mut lower) = (upper.selector(), lower.selector());
                    for v in d {
                        let key = !magnitude(*v);
                        *v = keep(*v, upper(key) & !lower(key));
                    }
                }
            },
            Mask::Random {
                stream,
                density,
                chunk,
            } => {
                let start = (c * chunk) as u64;
                for (j, v) in d.iter_mut().enumerate() {
                    *v = keep(*v, uniform(*stream, start + j as u64) < *density);
                }
            }
        }
    }
}

/// One magnitude selection of the task-vector family: input `k`'s
/// `count` largest of |δ| (or of !|δ| when `inverted`).
struct Selection {
    k: usize,
    inverted: bool,
    count: usize,
}

/// mergekit's `GeneralizedTaskArithmeticMerge`: sparsify each δ (TIES: by
/// magnitude; DARE: at random; breadcrumbs: the middle magnitudes), weight
/// it, elect signs (TIES, DARE-TIES), sum, optionally divide by the
/// (agreeing) weights, scale by λ, add to the base.
fn task_vectors<'o>(
    p: &TaskVectorParams,
    stream: &Stream,
    ctx: &TensorContext,
    dtype: Dtype,
    out: &'o mut Vec<u8>,
) -> Written<'o> {
    let n = stream.len();
    let m = p.weights.len();
    let all: Vec<usize> = (0..=m).collect();
    let sparsified = |k: usize| p.sparsify != Sparsify::Keep && p.densities[k] < 1.0;
    // The magnitude selections, for every input in one pair of passes.
    let mut selections = Vec::new();
    for k in (0..m).filter(|&k| sparsified(k)) {
        let density = p.densities[k];
        match &p.sparsify {
            Sparsify::Magnitude => selections.push(Selection {
                k,
                inverted: false,
                count: ((density * n as f64) as usize).max(1),
            }),
            Sparsify::Outliers { gammas } => {
                let target = (density * n as f64) as usize;
                let top = (gammas[k] * n as f64) as usize;
                let bottom = n.saturating_sub(target + top);
                for count in [(bottom + target).min(n), bottom] {
                    selections.push(Selection {
                        k,
                        inverted: true,
                        count,
                    });
                }
            }
            _ => {}
        }
    }
    let mut cuts = if selections.is_empty() {
        Vec::new()
    } else {
        let counts: Vec<Count> = selections
            .iter()
            .map(|s| -> Count {
                let count = s.count;
                Box::new(move |_: &[u64], _| count)
            })
            .collect();
        // Breadcrumbs' two cuts of one input share its keys.
        let same_keys: Vec<bool> = selections
            .iter()
            .enumerate()
            .map(|(s, x)| {
                s > 0 && (selections[s - 1].k, selections[s - 1].inverted) == (x.k, x.inverted)
            })
            .collect();
        select::cuts(stream, &all, &counts, &same_keys, &|s, _, chunk, keys| {
            let Selection { k, inverted, .. } = selections[s];
            let pairs = keys.iter_mut().zip(chunk[1 + k].iter().zip(chunk[0]));
            if inverted {
                pairs.for_each(|(key, (x, b))| *key = !magnitude(x - b));
            } else {
                pairs.for_each(|(key, (x, b))| *key = magnitude(x - b));
            }
        })
    }
    .into_iter();
    let masks: Vec<Mask> = (0..m)
        .map(|k| {
            if !sparsified(k) {
                return Mask::All;
            }
            let mut next = || cuts.next().unwrap_or(Cut::Everything);
            match &p.sparsify {
                Sparsify::Magnitude => Mask::Top(next()),
                Sparsify::Outliers { .. } => Mask::Middle {
                    upper: next(),
                    lower: next(),
                },
                _ => Mask::Random {
                    stream: dare_stream(p.seed, ctx.name, k),
                    density: p.densities[k],
                    chunk: stream.chunk_size(),
                },
            }
        })
        .collect();
    let rescaled = |k: usize| p.rescale && sparsified(k);
    let factors = if (0..m).any(rescaled) {
        l1_factors(stream, &masks, &rescaled)
    } else {
        vec![1.0; m]
    };
    let weights = f32s(&p.weights);
    let (bytes, non_finite) = stream.write(&all, nothing(stream), dtype, out, |c, (), chunk| {
        let Some((b, xs)) = chunk.split_first_mut() else {
            return;
        };
        for (k, x) in xs.iter_mut().enumerate() {
            x.iter_mut().zip(b.iter()).for_each(|(x, b)| *x -= b);
            if rescaled(k) {
                masks[k].apply(c, x, 1.0);
                let (factor, w) = (factors[k], weights[k]);
                x.iter_mut().for_each(|v| *v = *v * factor * w);
            } else {
                masks[k].apply(c, x, weights[k]);
            }
        }
        let deltas: Vec<&[f32]> = xs.iter().map(|x| &**x).collect();
        add_task_vectors(p, &weights, b, &deltas);
    });
    Written {
        bytes,
        non_finite,
        won: None,
    }
}

/// mergekit's `rescale`: per input, the L1 norm of δ over that of the
/// trimmed δ (1 where either is below 1e-7), in f64, summed chunk by chunk
/// in order.
fn l1_factors(
    stream: &Stream,
    masks: &[Mask],
    rescaled: &(dyn Fn(usize) -> bool + Sync),
) -> Vec<f32> {
    let all: Vec<usize> = (0..=masks.len()).collect();
    let per_chunk = stream.map(&all, |c, chunk| {
        let mut d = Vec::new();
        (0..masks.len())
            .map(|k| {
                if !rescaled(k) {
                    return (0.0, 0.0);
                }
                d.clear();
                d.extend(chunk[1 + k].iter().zip(chunk[0]).map(|(x, b)| x - b));
                let l1 = |d: &[f32]| d.iter().map(|v| v.abs() as f64).sum::<f64>();
                let before = l1(&d);
                masks[k].apply(c, &mut d, 1.0);
                (before, l1(&d))
            })
            .collect::<Vec<(f64, f64)>>()
    });
    (0..masks.len())
        .map(|k| {
            let (before, after) = per_chunk
                .iter()
                .fold((0.0, 0.0), |(b, a), c| (b + c[k].0, a + c[k].1));
            if before < 1e-7 || after < 1e-7 {
                1.0
            } else {
                (before / after) as f32
            }
        })
        .collect()
}

/// model_stock per tensor (`spherical::model_stock`): the task vectors'
/// Gram matrix in one pass, summed chunk by chunk in order, then a pass
/// that writes t·mean(inputs) + (1 − t)·base.
fn model_stock<'o>(stream: &Stream, dtype: Dtype, out: &'o mut Vec<u8>) -> Written<'o> {
    let k = stream.operands() - 1;
    let all: Vec<usize> = (0..=k).collect();
    let per_chunk = stream.map(&all, |_, chunk| stock_gram(chunk[0], &chunk[1..]));
    let gram = per_chunk.into_iter().fold(vec![0f64; k * k], |mut g, c| {
        g.iter_mut().zip(c).for_each(|(g, c)| *g += c);
        g
    });
    let t = stock_ratio(&gram, k);
    let (bytes, non_finite) = stream.write(&all, nothing(stream), dtype, out, |_, (), chunk| {
        let Some((b, xs)) = chunk.split_first_mut() else {
            return;
        };
        for (i, w0) in b.iter_mut().enumerate() {
            *w0 = stock_merge(t, *w0, xs.iter().map(|x| x[i]));
        }
    });
    Written {
        bytes,
        non_finite,
        won: None,
    }
}

thread_local! {
    /// OBIM's owner buffer, kept between tensors: a fresh one costs a page
    /// fault per 4 KiB on every tensor.
    static OWNER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// OBIM (DESIGN §3): in the tensor's order, input k claims round(retainₖ·N)
/// unowned positions by saliency (ties to the lower flat index); merged =
/// θ_B + scale·Σ 1[owner = k]·δₖ. Each claim is made in the pass that
/// counts the next input's keys, the last one in the writing pass.
fn obim<'o>(
    p: &ObimParams,
    stream: &Stream,
    ctx: &TensorContext,
    dtype: Dtype,
    out: &'o mut Vec<u8>,
) -> Result<Written<'o>, MergeError> {
    let n = stream.len();
    let m = p.retain.len();
    let cols = ctx.shape.last().copied().unwrap_or(1).max(1);
    let stats: Vec<Option<ObdStats>> = (0..m)
        .map(|k| match p.saliency {
            Saliency::Obd => ctx.obd.get(k).copied().flatten(),
            Saliency::Magnitude => None,
        })
        .collect();
    for s in stats.iter().flatten() {
        if let ObdStats::Columns(dj) = s
            && dj.len() != cols
        {
            return Err(MergeError::Invalid {
                tensor: ctx.name.to_string(),
                reason: format!(
                    "calibration statistics have {} input features, the tensor has {cols}",
                    dj.len()
                ),
            });
        }
    }
    // Input k's claim keys for chunk c: at least 1 where the position is
    // free, 0 where someone owns it.
    let keys_of = |k: usize, c: usize, b: &[f32], x: &[f32], owner: &[u8], keys: &mut [u32]| {
        saliency(stats[k], cols, c * stream.chunk_size(), b, x, keys);
        for (key, &o) in keys.iter_mut().zip(owner) {
            let free = u32::from(o == UNOWNED).wrapping_neg();
            *key = order_key(f32::from_bits(*key)).max(1) & free;
        }
    };
    // Gives input k the selected positions of a chunk; how many.
    let claim = |owner: &mut [u8], keys: &[u32], rule: Rule, k: usize| -> u64 {
        let mut selected = rule.selector();
        let mut taken = 0u32;
        for (o, &key) in owner.iter_mut().zip(keys) {
            // Owned positions (key 0) are never taken.
            let s = selected(key) & (key != 0);
            let mask = u8::from(s).wrapping_neg();
            *o = (k as u8 & mask) | (*o & !mask);
            taken += u32::from(s);
        }
        u64::from(taken)
    };
    OWNER.with_borrow_mut(|owner| {
        owner.clear();
        owner.resize(n, UNOWNED);
        let mut won = vec![0u64; m];
        let mut pending: Option<(usize, Cut)> = None;
        for &k in &p.order {
            // Makes the pending claim, then counts k's keys (and the free
            // positions) where nobody owns them now.
            let which: Vec<usize> = [0, 1 + k]
                .into_iter()
                .chain(pending.as_ref().map(|(j, _)| 1 + j))
                .collect();
            // Counts (and claims) over `items`: chunks with their owner
            // bytes, and where a window is given, the slot that keeps the
            // keys in it.
            type Items<'b> = Vec<(usize, (&'b mut [u8], Option<&'b mut Vec<Vec<u32>>>))>;
            let count = |items: Items, window: Option<Window>| {
                stream.fold(
                    &which,
                    items,
                    || (vec![0u32; BINS], 0usize, 0u64),
                    |(mut high, mut free, mut taken), c, (owner, slot), chunk| {
                        with_keys(stream.chunk_len(c), |keys| {
                            if let Some((j, cut)) = &pending {
                                keys_of(*j, c, chunk[0], chunk[2], owner, keys);
                                taken += claim(owner, keys, cut.rule(c), *j);
                            }
                            keys_of(k, c, chunk[0], chunk[1], owner, keys);
                            match (slot, window) {
                                (Some(slot), Some(w)) => {
                                    count_high_keeping(&mut high, keys, w, &mut slot[0])
                                }
                                _ => count_high(&mut high, keys),
                            }
                            free += owner.iter().filter(|&&o| o == UNOWNED).count();
                        });
                        (high, free, taken)
                    },
                    |a, b| (select::add_counts(a.0, b.0), a.1 + b.1, a.2 + b.2),
                )
            };
            let mut parts: Vec<Option<&mut [u8]>> =
                owner.chunks_mut(stream.chunk_size()).map(Some).collect();
            let mut take = |c: usize| parts[c].take().expect("each chunk once");
            let quota = quota(p.retain[k], n);
            let (high, free, taken, kept) = match select::sample(stream) {
                None => {
                    let all = (0..stream.chunks()).map(|c| (c, (take(c), None))).collect();
                    let (high, free, taken) = count(all, None);
                    (high, free, taken, None)
                }
                Some(sample) => {
                    // The sample first: it guesses where k's cut falls, so
                    // the other chunks keep the keys there.
                    let items = sample.iter().map(|&c| (c, (take(c), None))).collect();
                    let (high, free, taken) = count(items, None);
                    let seen: usize = sample.iter().map(|&c| stream.chunk_len(c)).sum();
                    let fraction = (quota as f64 / n as f64).min(free as f64 / seen as f64);
                    let window = select::guess(&select::totals(&high, 1)[0], fraction);
                    let mut kept = Kept::new(stream, vec![window]);
                    let (_, slots) = kept.slots();
                    let items = slots
                        .into_iter()
                        .map(|(c, s)| (c, (take(c), Some(s))))
                        .collect();
                    let rest = count(items, window);
                    let high = select::add_counts(high, rest.0);
                    (high, free + rest.1, taken + rest.2, Some(kept))
                }
            };
            if let Some((j, _)) = pending {
                won[j] = taken;
            }
            let wanted = quota.min(free);
            let counts: Vec<Count> = vec![Box::new(move |_: &[u64], _| wanted)];
            let owner = &owner[..];
            let cut = select::cuts_counted(
                stream,
                &[0, 1 + k],
                &high,
                &counts,
                kept.as_ref(),
                &[],
                &|_, c, chunk, keys| {
                    let start = c * stream.chunk_size();
                    keys_of(
                        k,
                        c,
                        chunk[0],
                        chunk[1],
                        &owner[start..start + keys.len()],
                        keys,
                    );
                },
            )
            .pop()
            .unwrap_or(Cut::Nothing);
            pending = Some((k, cut));
        }
        let all: Vec<usize> = (0..=m).collect();
        let taken = AtomicU64::new(0);
        let scale = p.scale as f32;
        let (bytes, non_finite) = stream.write(
            &all,
            owner.chunks_mut(stream.chunk_size()).collect(),
            dtype,
            out,
            |c, owner, chunk| {
                let Some((b, xs)) = chunk.split_first_mut() else {
                    return;
                };
                if let Some((j, cut)) = &pending {
                    let t = with_keys(b.len(), |keys| {
                        keys_of(*j, c, b, xs[*j], owner, keys);
                        claim(owner, keys, cut.rule(c), *j)
                    });
                    taken.fetch_add(t, Ordering::Relaxed);
                }
                for (k, x) in xs.iter().enumerate() {
                    for ((b, &o), &x) in b.iter_mut().zip(owner.iter()).zip(x.iter()) {
                        // A select on bits: the compiler keeps a branch for `if`.
                        let won = u32::from(o == k as u8).wrapping_neg();
                        let sum = (*b + scale * (x - *b)).to_bits();
                        *b = f32::from_bits((sum & won) | (b.to_bits() & !won));
                    }
                }
            },
        );
        if let Some((j, _)) = pending {
            won[j] = taken.into_inner();
        }
        Ok(Written {
            bytes,
            non_finite,
            won: Some(won),
        })
    })
}

/// The saliency (as f32 bits) of δ = x − b at positions `start..` of a
/// tensor with `cols` columns: δ² (magnitude), δ²·d_j (OBD, d_j the column's
/// Σ x² of activations), δ²·tokens (a bias's OBD).
fn saliency(
    stats: Option<ObdStats>,
    cols: usize,
    start: usize,
    b: &[f32],
    x: &[f32],
    keys: &mut [u32],
) {
    let delta = |i: usize| x[i] - b[i];
    match stats {
        Some(ObdStats::Columns(dj)) => {
            // Row by row, so that d_j is a slice too.
            let mut i = 0;
            while i < keys.len() {
                let col = (start + i) % cols;
                let len = (cols - col).min(keys.len() - i);
                for (j, (key, &dj)) in keys[i..i + len]
                    .iter_mut()
                    .zip(&dj[col..col + len])
                    .enumerate()
                {
                    let d = f64::from(delta(i + j));
                    *key = ((d * d * f64::from(dj)) as f32).to_bits();
                }
                i += len;
            }
        }
        Some(ObdStats::Tokens(t)) => {
            for (i, key) in keys.iter_mut().enumerate() {
                let d = f64::from(delta(i));
                *key = ((d * d * t) as f32).to_bits();
            }
        }
        None => {
            for (key, (x, b)) in keys.iter_mut().zip(x.iter().zip(b)) {
                let d = x - b;
                *key = (d * d).to_bits();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::TensorDtype;
    use crate::stream::CHUNK;
    use crate::tensors::{from_f32, to_f32};

    /// `op` streamed from `operands` (the base, then the inputs) stored in
    /// bf16, written in f32; with the positions each input won.
    fn streamed(op: &Op, operands: &[Vec<f32>], cols: usize) -> (Vec<f32>, Option<Vec<u64>>) {
        let bytes: Vec<Vec<u8>> = operands.iter().map(|v| from_f32(v, Dtype::Bf16)).collect();
        let stream = Stream::new(
            bytes
                .iter()
                .map(|b| (b.as_slice(), TensorDtype::Bf16))
                .collect(),
        )
        .expect("bf16 operands");
        let n = operands[0].len();
        let obd = vec![None; operands.len() - 1];
        let ctx = TensorContext {
            name: "t",
            shape: &[n / cols, cols],
            obd: &obd,
            grams: &[],
        };
        let mut out = Vec::new();
        let written = merge(op, &stream, &ctx, Dtype::F32, &mut out).expect("merges");
        assert_eq!(written.non_finite, 0);
        (
            to_f32(written.bytes, TensorDtype::F32).expect("f32"),
            written.won,
        )
    }

    /// Values rounded to bf16, so that many |δ| tie.
    fn bf16(values: impl Iterator<Item = f32>) -> Vec<f32> {
        let v: Vec<f32> = values.collect();
        to_f32(&from_f32(&v, Dtype::Bf16), TensorDtype::Bf16).expect("bf16")
    }

    /// A base and three inputs over several chunks (and a short last one),
    /// with many equal |δ| across chunk borders.
    fn family(n: usize) -> Vec<Vec<f32>> {
        let base = bf16((0..n).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0));
        let mut operands = vec![base.clone()];
        for k in 0..3 {
            let x = bf16(
                base.iter()
                    .enumerate()
                    .map(|(i, b)| b + (((i * (7 + 2 * k) + k * 13) % 29) as f32 - 14.0) / 64.0),
            );
            operands.push(x);
        }
        operands
    }

    /// Positions by `key` descending, ties to the lower index.
    fn ranked(n: usize, key: impl Fn(usize) -> f32) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
        order
    }

    fn ties(density: f64) -> Op {
        Op::TaskVectors(TaskVectorParams {
            sparsify: Sparsify::Magnitude,
            elect_signs: true,
            weights: vec![1.0, 0.5, 2.0],
            densities: vec![density, 0.3, 1.0],
            normalize: true,
            rescale: false,
            lambda: 0.8,
            seed: 0,
            int8_mask: false,
        })
    }

    /// The merge of task vectors when `kept(k, δ)` names the positions input
    /// `k` keeps (each then weighted), as mergekit defines it.
    fn kept_by_sorting(
        p: &TaskVectorParams,
        o: &[Vec<f32>],
        kept: impl Fn(usize, &[f32]) -> Vec<usize>,
    ) -> Vec<f32> {
        let n = o[0].len();
        let weights = f32s(&p.weights);
        let deltas: Vec<Vec<f32>> = (1..o.len())
            .map(|k| {
                let d: Vec<f32> = (0..n).map(|i| o[k][i] - o[0][i]).collect();
                let mut out = vec![0.0; n];
                for i in kept(k - 1, &d) {
                    out[i] = d[i] * weights[k - 1];
                }
                out
            })
            .collect();
        let mut b = o[0].clone();
        let parts: Vec<&[f32]> = deltas.iter().map(Vec::as_slice).collect();
        add_task_vectors(p, &weights, &mut b, &parts);
        b
    }

    /// TIES by sorting every |δ|: the density's share with the largest.
    fn ties_by_sorting(p: &TaskVectorParams, o: &[Vec<f32>]) -> Vec<f32> {
        kept_by_sorting(p, o, |k, d| {
            let n = d.len();
            let density = p.densities[k];
            let keep = if density >= 1.0 {
                n
            } else {
                ((density * n as f64) as usize).max(1)
            };
            ranked(n, |i| d[i].abs()).into_iter().take(keep).collect()
        })
    }

    #[test]
    fn ties_equals_sorting_every_magnitude() {
        // 64 chunks and more: the cuts are guessed from a sample first.
        for (n, densities) in [
            (3 * CHUNK + 77, &[0.001, 0.5, 0.97][..]),
            (64 * CHUNK + 77, &[0.3]),
        ] {
            let o = family(n);
            for &density in densities {
                let op = ties(density);
                let Op::TaskVectors(p) = &op else {
                    unreachable!()
                };
                assert!(
                    streamed(&op, &o, 11).0 == ties_by_sorting(p, &o),
                    "n {n}, density {density}"
                );
            }
        }
    }

    #[test]
    fn breadcrumbs_drop_outliers_and_the_smallest() {
        let op = |density, gamma| {
            Op::TaskVectors(TaskVectorParams {
                sparsify: Sparsify::Outliers {
                    gammas: vec![gamma],
                },
                elect_signs: false,
                weights: vec![2.0],
                densities: vec![density],
                normalize: false,
                rescale: false,
                lambda: 1.0,
                seed: 0,
                int8_mask: false,
            })
        };
        // |δ| ranks: 0.1 < 0.2 < ... < 1.0 (10 entries), base 0.
        let d: Vec<f32> = (1..=10).rev().map(|i| i as f32 / 10.0).collect();
        let o = vec![vec![0.0; 10], d];
        // density 0.5 keeps 5, gamma 0.2 drops the 2 largest: ranks 4..8 stay.
        let kept: Vec<f32> = streamed(&op(0.5, 0.2), &o, 10)
            .0
            .into_iter()
            .filter(|v| *v != 0.0)
            .collect();
        let expected: Vec<f32> = [0.8f32, 0.7, 0.6, 0.5, 0.4]
            .iter()
            .map(|v| bf16([*v].into_iter())[0] * 2.0)
            .collect();
        assert_eq!(kept, expected);
        // 9 kept and 5 outliers do not fit in 10: nothing from the bottom goes.
        let m = streamed(&op(0.9, 0.5), &o, 10).0;
        assert_eq!(m.iter().filter(|v| **v != 0.0).count(), 9);
        assert_eq!(m[0], 0.0, "the largest is dropped");
        // Ties across chunks: ascending, the lower index first.
        let n = 2 * CHUNK + 9;
        let o = vec![vec![0.0; n], vec![0.5; n]];
        let m = streamed(&op(0.5, 0.25), &o, 1).0;
        let (bottom, target) = (n - n / 2 - n / 4, n / 2);
        assert!(m[..bottom].iter().all(|v| *v == 0.0));
        assert!(m[bottom..bottom + target].iter().all(|v| *v == 1.0));
        assert!(m[bottom + target..].iter().all(|v| *v == 0.0));
    }

    #[test]
    fn breadcrumbs_equal_sorting_every_magnitude() {
        let gammas = [0.01, 0.2, 0.0];
        let p = TaskVectorParams {
            sparsify: Sparsify::Outliers {
                gammas: gammas.to_vec(),
            },
            elect_signs: false,
            weights: vec![1.0, 0.5, 2.0],
            densities: vec![0.9, 0.5, 0.3],
            normalize: false,
            rescale: false,
            lambda: 1.0,
            seed: 0,
            int8_mask: false,
        };
        let op = Op::TaskVectors(p.clone());
        // Ascending |δ|, ties to the lower index: the smallest go, then the
        // density's share stays, the largest `gamma` share goes.
        let by_sorting = |o: &[Vec<f32>]| {
            kept_by_sorting(&p, o, |k, d| {
                let n = d.len();
                let target = (p.densities[k] * n as f64) as usize;
                let top = (gammas[k] * n as f64) as usize;
                let bottom = n.saturating_sub(target + top);
                let mut order: Vec<usize> = (0..n).collect();
                order.sort_by(|&a, &b| d[a].abs().total_cmp(&d[b].abs()).then(a.cmp(&b)));
                order[bottom..(bottom + target).min(n)].to_vec()
            })
        };
        // 64 chunks and more: the cuts are guessed from a sample first.
        for n in [3 * CHUNK + 77, 64 * CHUNK + 77] {
            let o = family(n);
            assert!(streamed(&op, &o, 11).0 == by_sorting(&o), "n {n}");
        }
    }

    #[test]
    fn model_stock_streams_as_it_merges_whole_tensors() {
        // family(): bf16 values, so the in-memory merge sees what the stream decodes.
        let o = family(3 * CHUNK + 77);
        let n = o[0].len();
        let merged = streamed(&Op::ModelStock { filter_wise: false }, &o, 1).0;
        let mut whole = o[0].clone();
        super::super::spherical::model_stock(&mut whole, &o[1..], &[n], false);
        // The Gram matrix is summed in another order there: t may differ in
        // its last bits.
        let worst = merged
            .iter()
            .zip(&whole)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-6, "{worst}");
        assert!(
            merged != o[0],
            "the inputs' task vectors are not orthogonal"
        );
    }

    #[test]
    fn dare_masks_are_reproducible_and_independent_of_threads() {
        let op = Op::TaskVectors(TaskVectorParams {
            sparsify: Sparsify::Random,
            elect_signs: true,
            weights: vec![1.0, 1.0, 1.0],
            densities: vec![0.3, 0.3, 0.3],
            normalize: false,
            rescale: true,
            lambda: 1.0,
            seed: 42,
            int8_mask: false,
        });
        let o = family(2 * CHUNK + 5);
        let make = |threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("a pool");
            pool.install(|| streamed(&op, &o, 7).0)
        };
        let one = make(1);
        assert!(one == make(4));
        let changed = one.iter().zip(&o[0]).filter(|(m, b)| m != b).count();
        // Each input keeps ~30%; some positions are kept by none.
        let share = changed as f64 / one.len() as f64;
        assert!((0.5..0.75).contains(&share), "{share}");
    }

    /// OBIM by sorting: in order, each input takes the quota of free
    /// positions with the largest δ², ties to the lower index.
    fn obim_by_sorting(p: &ObimParams, o: &[Vec<f32>]) -> (Vec<f32>, Vec<u64>) {
        let n = o[0].len();
        let mut owner = vec![usize::MAX; n];
        let mut won = vec![0; p.retain.len()];
        for &k in &p.order {
            let d = |i: usize| o[k + 1][i] - o[0][i];
            let free: Vec<usize> = ranked(n, |i| d(i) * d(i))
                .into_iter()
                .filter(|&i| owner[i] == usize::MAX)
                .take(quota(p.retain[k], n))
                .collect();
            won[k] = free.len() as u64;
            free.into_iter().for_each(|i| owner[i] = k);
        }
        let scale = p.scale as f32;
        let merged = (0..n)
            .map(|i| match owner[i] {
                usize::MAX => o[0][i],
                k => o[0][i] + scale * (o[k + 1][i] - o[0][i]),
            })
            .collect();
        (merged, won)
    }

    #[test]
    fn obim_equals_claiming_by_sorting() {
        let settings = [
            (vec![0, 1, 2], vec![0.3, 0.3, 0.3]),
            (vec![2, 0, 1], vec![0.5, 0.1, 0.6]),
            (vec![1, 2, 0], vec![0.0, 1.0, 0.2]),
        ];
        obim_equals_sorting(&family(3 * CHUNK + 77), &settings);
        obim_equals_sorting(&family(64 * CHUNK + 77), &settings[1..2]);
    }

    fn obim_equals_sorting(o: &[Vec<f32>], settings: &[(Vec<usize>, Vec<f64>)]) {
        for (order, retain) in settings.iter().cloned() {
            let p = ObimParams {
                order,
                saliency: Saliency::Magnitude,
                retain,
                using: vec![None; 3],
                scale: 0.9,
            };
            let (merged, won) = streamed(&Op::Obim(p.clone()), o, 13);
            let (expected, expected_won) = obim_by_sorting(&p, o);
            assert_eq!(won, Some(expected_won), "{p:?}");
            assert!(merged == expected, "{p:?}");
        }
    }
}
