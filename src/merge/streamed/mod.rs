//! The merges that need a whole-tensor statistic before any position can be
//! written, as passes over a [`Stream`]: TIES, DARE(-TIES), breadcrumbs,
//! task arithmetic with sign election here, OBIM in `obim.rs`, DELLA (by
//! whole rows) in `della.rs`, SCE in `sce.rs`, model_stock, multislerp and
//! karcher in `spherical.rs`, ramplus_tl in `ram.rs`, arcee_fusion (by
//! whole rows) in `fusion.rs`; the counting passes that find a top-k
//! threshold in `select.rs`. Each pass decodes a chunk
//! of every operand it needs from the mapped bytes, uses it while it is in
//! cache and drops it, so no whole-tensor f32 copy is made:
//!
//! - a magnitude threshold (TIES, breadcrumbs, SCE's variance,
//!   arcee_fusion's quantiles) takes two counting passes, for every input
//!   at once; arcee_fusion first one for each row's divergence;
//! - DARE's rescaling takes one pass for the L1 norms before and after;
//!   model_stock, multislerp and karcher one for the Gram matrix of their
//!   vectors; ramplus_tl one for how many positions each input changes
//!   with another or alone;
//! - OBIM's claims take, per input, a counting pass (which also makes the
//!   previous input's claim) and a pass for the threshold's ties, and keep
//!   one byte per position: who owns it;
//! - the last pass trims, elects, sums and encodes.
//!
//! The arithmetic is that of the whole-tensor definitions in mergekit's
//! order, so a streamed merge equals one made from decoded tensors;
//! multislerp and karcher, which take their norms and dots from the Gram
//! matrix, equal them to f64 rounding.

mod della;
mod fusion;
mod obim;
mod ram;
mod sce;
mod select;
mod spherical;
#[cfg(test)]
mod tests;

use self::select::{Count, Cut, Rule};
use crate::merge::kernels::uniform;
use crate::merge::{MergeError, Pointwise, TensorContext, add_task_vectors, dare_stream, f32s};
use crate::plan::{Op, RamParams, Sparsify, TaskVectorParams};
use crate::recipe::Dtype;
use crate::stream::{Stream, nothing};

/// A streamed merge's output: the encoded bytes, how many merged values
/// are not finite, and for OBIM how many positions each input won.
pub struct Written<'o> {
    pub bytes: &'o [u8],
    pub non_finite: u64,
    pub won: Option<Vec<u64>>,
}

impl<'o> Written<'o> {
    /// A writing pass's output ([`Stream::write`]): no positions won.
    fn of((bytes, non_finite): (&'o [u8], u64)) -> Self {
        Written {
            bytes,
            non_finite,
            won: None,
        }
    }
}

/// Whether `op` merges in passes here (else it is pointwise, or works on
/// whole tensors).
pub fn handles(op: &Op) -> bool {
    match op {
        Op::Obim(_) | Op::Sce { .. } => true,
        Op::ModelStock { filter_wise } => !filter_wise,
        Op::Multislerp(_) | Op::Karcher { .. } => true,
        Op::Ram(RamParams { plus, .. }) => plus.is_some(),
        Op::ArceeFusion => true,
        Op::TaskVectors(_) => Pointwise::of(op).is_none(),
        _ => false,
    }
}

/// Whether a merge by `op` (which [`handles`]) reads the base, given
/// whether the merge has one: multislerp merges task vectors where there is
/// a base, karcher never reads it, the rest always do.
pub fn reads_base(op: &Op, has_base: bool) -> bool {
    match op {
        Op::Multislerp(_) => has_base,
        Op::Karcher { .. } => false,
        _ => true,
    }
}

/// Merges one tensor whose operands are `stream`'s (the base, where
/// [`reads_base`], then the inputs), encoded in `dtype` into the front of
/// `out`.
pub fn merge<'o>(
    op: &Op,
    stream: &Stream,
    base: bool,
    ctx: &TensorContext,
    dtype: Dtype,
    out: &'o mut [u8],
) -> Result<Written<'o>, MergeError> {
    match op {
        Op::TaskVectors(p) if handles(op) => match &p.sparsify {
            Sparsify::MagnitudeRank { epsilons } => {
                della::merge(p, epsilons, stream, ctx, dtype, out)
            }
            _ => Ok(task_vectors(p, stream, ctx, dtype, out)),
        },
        Op::Obim(p) => obim::merge(p, stream, ctx, dtype, out),
        Op::ModelStock { filter_wise: false } => Ok(spherical::model_stock(stream, dtype, out)),
        Op::Multislerp(p) => spherical::multislerp(p, stream, base, ctx, dtype, out),
        Op::Karcher { max_iter, tol } => {
            Ok(spherical::karcher(*max_iter, *tol, stream, dtype, out))
        }
        Op::Ram(RamParams {
            epsilon,
            plus: Some((r, alpha)),
        }) => Ok(ram::merge(*epsilon, *r, *alpha, stream, dtype, out)),
        Op::ArceeFusion if stream.operands() == 2 => Ok(fusion::merge(stream, ctx, dtype, out)),
        Op::Sce { select_topk } => sce::merge(*select_topk, stream, ctx, dtype, out),
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
    out: &'o mut [u8],
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
    Written::of(
        stream.write(&all, nothing(stream), dtype, out, |c, (), chunk| {
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
        }),
    )
}

/// mergekit's `rescale`: per input, [`rescale_factor`] of the L1 norms of
/// δ and of the trimmed δ, in f64, summed chunk by chunk in order.
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
            rescale_factor(before, after)
        })
        .collect()
}

/// mergekit's `rescale` factor from the L1 norms of δ `before` and `after`
/// trimming: their ratio, 1 where either is below 1e-7.
fn rescale_factor(before: f64, after: f64) -> f32 {
    if before < 1e-7 || after < 1e-7 {
        1.0
    } else {
        (before / after) as f32
    }
}

/// Keep masks (all ones or 0 per position) as bits, 64 to a word: what a
/// pass that selects hands to the writing pass.
fn pack(keep: &[u32]) -> Vec<u64> {
    keep.chunks(64)
        .map(|masks| {
            masks
                .iter()
                .enumerate()
                .fold(0u64, |word, (i, m)| word | u64::from(m & 1) << i)
        })
        .collect()
}
