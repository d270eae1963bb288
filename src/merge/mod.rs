//! Merge one tensor with one method, given the base's and the inputs'
//! values in f32 and the [`Op`] the plan resolved for it.
//! The definitions follow mergekit 0.1.5 (`merge_methods/`, `sparsify.py`)
//! and, for `obim`, DESIGN §3: pointwise methods and the task-vector family
//! here and their kernels in `kernels.rs`; the merges that stream in passes
//! (TIES, DARE, breadcrumbs, DELLA, SCE, OBIM, model_stock, multislerp,
//! karcher, ramplus_tl, arcee_fusion) in `streamed/`, nuslerp and the
//! spherical methods' geometry in `spherical.rs`, RegMean in `regmean.rs`.

pub mod kernels;
mod regmean;
mod spherical;
pub mod streamed;

pub use regmean::Solve;

use crate::checkpoint::TensorDtype;
use crate::plan::{Op, RamParams, Sparsify, TaskVectorParams};
use crate::recipe::{Dtype, TakeFrom};
use crate::stream::Stream;

/// One merged tensor, and for OBIM how many positions each input won.
#[derive(Debug, Clone, PartialEq)]
pub struct Merged {
    pub values: Vec<f32>,
    pub won: Option<Vec<u64>>,
    /// For RegMean's linear layers: how the system was solved.
    pub solve: Option<Solve>,
    /// Input buffers the merge no longer needs, for the caller to reuse.
    pub spare: Vec<Vec<f32>>,
}

/// Per-input OBD statistics of one tensor: the sum of squared input
/// activations per input feature (`d_j`), or for a bias the token count.
#[derive(Debug, Clone, Copy)]
pub enum ObdStats<'a> {
    Columns(&'a [f32]),
    Tokens(f64),
}

/// What else a tensor's merge needs to know.
pub struct TensorContext<'a> {
    pub name: &'a str,
    pub shape: &'a [usize],
    /// Per input; `None` where the saliency is `magnitude` (or no statistics apply).
    pub obd: &'a [Option<ObdStats<'a>>],
    /// RegMean: per input, the Gram matrix of the layer's input; empty for a
    /// tensor that is not a linear layer's weight.
    pub grams: &'a [Vec<f32>],
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MergeError {
    #[error("tensor `{tensor}`: {reason}")]
    Invalid { tensor: String, reason: String },
}

/// Merges one tensor. `base` is `None` only for `linear` without a base.
/// The buffers are consumed: task vectors are computed in place.
pub fn merge_tensor(
    op: &Op,
    base: Option<Vec<f32>>,
    mut inputs: Vec<Vec<f32>>,
    ctx: &TensorContext,
) -> Result<Merged, MergeError> {
    let invalid = |reason: &str| MergeError::Invalid {
        tensor: ctx.name.to_string(),
        reason: reason.to_string(),
    };
    match op {
        Op::Take(TakeFrom::Base) => {
            return base
                .map(|b| spare(b, inputs))
                .ok_or_else(|| invalid("`take base`, but the tensor has no base (a merge without one, or a slice without it)"));
        }
        Op::Take(TakeFrom::Input(i)) if *i < inputs.len() => {
            let taken = inputs.swap_remove(*i);
            inputs.extend(base);
            return Ok(spare(taken, inputs));
        }
        Op::Take(TakeFrom::Input(_)) => {
            return Err(invalid(
                "`take` names an input the tensor does not come from (in a stacked merge: a model outside its slice)",
            ));
        }
        _ => {}
    }
    if let Some(p) = Pointwise::of(op) {
        let (mut out, rest) = if p.uses_base() {
            (
                base.ok_or_else(|| invalid("this method needs a base"))?,
                inputs,
            )
        } else if inputs.is_empty() {
            return Err(invalid("this method needs an input"));
        } else {
            let rest = inputs.split_off(1);
            (inputs.swap_remove(0), rest)
        };
        kernels::update_chunks(&mut out, |start, o| {
            let rest: Vec<&[f32]> = rest.iter().map(|x| &x[start..start + o.len()]).collect();
            p.apply(o, &rest);
        });
        return Ok(spare(out, rest));
    }
    let need_base =
        |base: Option<Vec<f32>>| base.ok_or_else(|| invalid("this method needs a base"));
    if streamed::handles(op) {
        let base = match base {
            None if streamed::reads_base(op, false) => {
                return Err(invalid("this method needs a base"));
            }
            base => base,
        };
        return streamed_in_memory(op, base, inputs, ctx);
    }
    match op {
        Op::Regmean(p) => {
            let mut base = need_base(base)?;
            let solve = regmean::regmean(p, &mut base, &inputs, ctx.grams, ctx.shape)
                .map_err(|r| invalid(&r))?;
            let mut merged = spare(base, inputs);
            merged.solve = solve;
            Ok(merged)
        }
        Op::Slerp(p) => {
            let mut base = need_base(base)?;
            let other = inputs
                .first()
                .ok_or_else(|| invalid("slerp needs one input"))?;
            kernels::slerp(p.t, &mut base, other);
            Ok(spare(base, inputs))
        }
        // Always streamed (above), but pointwise task arithmetic.
        Op::TaskVectors(_)
        | Op::Obim(_)
        | Op::Sce { .. }
        | Op::Multislerp(_)
        | Op::Karcher { .. }
        | Op::Ram(RamParams { plus: Some(_), .. })
        | Op::ArceeFusion => Err(invalid("this merge streams")),
        Op::ModelStock { filter_wise } => {
            let mut base = need_base(base)?;
            spherical::model_stock(&mut base, &inputs, ctx.shape, *filter_wise);
            Ok(spare(base, inputs))
        }
        Op::Nuslerp(p) => {
            let [a, b] = &mut inputs[..] else {
                return Err(invalid("nuslerp needs two inputs"));
            };
            spherical::nuslerp(p, base.as_deref(), a, b, ctx.shape);
            let merged = inputs.swap_remove(0);
            inputs.extend(base);
            Ok(spare(merged, inputs))
        }
        // Always pointwise (merged above); a `take` returned earlier.
        Op::Linear(_)
        | Op::Nearswap { .. }
        | Op::Passthrough { .. }
        | Op::Ram(RamParams { plus: None, .. })
        | Op::Take(_) => Err(invalid("this method needs an input")),
    }
}

/// Weights as the kernels take them.
fn f32s(weights: &[f64]) -> Vec<f32> {
    weights.iter().map(|w| *w as f32).collect()
}

/// mergekit's normalizer of task arithmetic: Σw, or 1 where Σw ≈ 0.
fn divisor(weights: &[f32]) -> f32 {
    let total: f32 = weights.iter().sum();
    if total.abs() < 1e-8 { 1.0 } else { total }
}

/// A merge in which each output position depends only on the inputs at that
/// position: `linear`, and task arithmetic without sparsification or sign
/// election (also TIES-free DARE-linear at density 1). It runs on chunks of
/// positions, so the executor can merge a tensor straight from the mapped
/// shards while each chunk is in cache, with no whole-tensor buffers.
#[derive(Debug, Clone, PartialEq)]
pub enum Pointwise {
    /// mergekit's `linear`: Σ xₖ·wₖ in input order, / Σw when normalizing.
    Linear { weights: Vec<f32>, normalize: bool },
    /// b + λ·(Σ (xₖ − b)·wₖ / divisor), in mergekit's order of operations.
    TaskArithmetic {
        weights: Vec<f32>,
        divisor: Option<f32>,
        lambda: f32,
    },
    /// mergekit's `nearswap`: w·x + (1 − w)·b with w = clamp(t / |b − x|, 0, 1)
    /// (|b − x| at least 1e-6): the base takes x where the two are close.
    Nearswap { t: f32 },
    /// mergekit's `passthrough`: the one input, times `scale` unless 1.
    Passthrough { scale: f32 },
    /// mergekit's `ram`: where one input changes a position (|δ| > ε) its
    /// δ, where several do their mean.
    Ram { epsilon: f32 },
}

impl Pointwise {
    /// The pointwise form of `op`, if it has one (`take` is no merge and
    /// has none; neither has a merge that sparsifies or elects signs).
    pub fn of(op: &Op) -> Option<Pointwise> {
        match op {
            Op::Linear(p) => Some(Pointwise::Linear {
                weights: f32s(&p.weights),
                normalize: p.normalize,
            }),
            Op::TaskVectors(p)
                if !p.elect_signs
                    && (p.sparsify == Sparsify::Keep || p.densities.iter().all(|d| *d >= 1.0)) =>
            {
                let weights = f32s(&p.weights);
                Some(Pointwise::TaskArithmetic {
                    divisor: p.normalize.then(|| divisor(&weights)),
                    weights,
                    lambda: p.lambda as f32,
                })
            }
            Op::Nearswap { t } => Some(Pointwise::Nearswap { t: *t as f32 }),
            Op::Passthrough { scale } => Some(Pointwise::Passthrough {
                scale: *scale as f32,
            }),
            Op::Ram(RamParams {
                epsilon,
                plus: None,
            }) => Some(Pointwise::Ram {
                epsilon: *epsilon as f32,
            }),
            _ => None,
        }
    }

    /// Whether the first operand is the base (else: the first input).
    pub fn uses_base(&self) -> bool {
        !matches!(
            self,
            Pointwise::Linear { .. } | Pointwise::Passthrough { .. }
        )
    }

    /// `first` ← the merge at these positions of `first` (the base, or
    /// linear's first input) and `rest` (the other inputs, in order).
    pub fn apply(&self, first: &mut [f32], rest: &[&[f32]]) {
        let len = first.len();
        match self {
            Pointwise::Linear { weights, normalize } => {
                // mergekit: result = 0; result += xₖ·wₖ in order; result /= Σw.
                first.iter_mut().for_each(|v| *v *= weights[0]);
                for (x, w) in rest.iter().zip(&weights[1..]) {
                    for (v, x) in first.iter_mut().zip(&x[..len]) {
                        *v += x * w;
                    }
                }
                if *normalize {
                    let total: f32 = weights.iter().sum();
                    first.iter_mut().for_each(|v| *v /= total);
                }
            }
            Pointwise::TaskArithmetic {
                weights,
                divisor,
                lambda,
            } => {
                let mut mixed = vec![0f32; len];
                for (x, w) in rest.iter().zip(weights) {
                    for ((m, x), b) in mixed.iter_mut().zip(&x[..len]).zip(first.iter()) {
                        *m += (x - b) * w;
                    }
                }
                for (m, b) in mixed.iter_mut().zip(first.iter_mut()) {
                    if let Some(d) = divisor {
                        *m /= d;
                    }
                    if *lambda != 1.0 {
                        *m *= lambda;
                    }
                    *b += *m;
                }
            }
            Pointwise::Nearswap { t } => {
                let x = rest[0];
                for (b, x) in first.iter_mut().zip(&x[..len]) {
                    let w = (t / (*b - x).abs().max(1e-6)).clamp(0.0, 1.0);
                    *b = w * x + (1.0 - w) * *b;
                }
            }
            Pointwise::Passthrough { scale } => {
                if *scale != 1.0 {
                    first.iter_mut().for_each(|v| *v *= scale);
                }
            }
            Pointwise::Ram { epsilon } => {
                for (i, b) in first.iter_mut().enumerate() {
                    let changed = |x: &[f32]| (x[i] - *b).abs() > *epsilon;
                    let count = rest.iter().filter(|x| changed(x)).count();
                    let mut merged = 0f32;
                    for x in rest {
                        let d = if changed(x) { x[i] - *b } else { 0.0 };
                        merged += if count > 1 { d / count as f32 } else { d };
                    }
                    *b += merged;
                }
            }
        }
    }
}

/// A streamed merge (`streamed/`) of decoded tensors: a stage's output,
/// aligned token rows, a LoRA model's weights. Their f32 bytes are the
/// stream (the base first where the merge reads it); the buffers are
/// handed back as spares.
fn streamed_in_memory(
    op: &Op,
    base: Option<Vec<f32>>,
    mut inputs: Vec<Vec<f32>>,
    ctx: &TensorContext,
) -> Result<Merged, MergeError> {
    let (read, unread) = match streamed::reads_base(op, base.is_some()) {
        true => (base, None),
        false => (None, base),
    };
    let operands = read
        .iter()
        .chain(&inputs)
        .map(|v| (bytemuck::cast_slice::<f32, u8>(v), TensorDtype::F32))
        .collect();
    let stream = Stream::new(operands).ok_or_else(|| MergeError::Invalid {
        tensor: ctx.name.to_string(),
        reason: "the operands differ in size".to_string(),
    })?;
    // The merge writes f32 straight into the returned values.
    let mut values = vec![0f32; stream.len()];
    let won = streamed::merge(
        op,
        &stream,
        read.is_some(),
        ctx,
        Dtype::F32,
        bytemuck::cast_slice_mut(&mut values),
    )?
    .won;
    drop(stream);
    inputs.extend(read.into_iter().chain(unread));
    Ok(Merged {
        values,
        won,
        solve: None,
        spare: inputs,
    })
}

fn spare(values: Vec<f32>, spare: Vec<Vec<f32>>) -> Merged {
    Merged {
        values,
        won: None,
        solve: None,
        spare,
    }
}

/// The end of mergekit's `GeneralizedTaskArithmeticMerge` at a run of
/// positions: `b` += λ·(Σₖ δₖ, where TIES elects signs only the δ of the
/// sign of Σₖ δₖ, / the (agreeing) weights when normalizing). `deltas` are
/// trimmed and weighted. The arithmetic is mergekit's, in its order.
pub(super) fn add_task_vectors(
    p: &TaskVectorParams,
    weights: &[f32],
    b: &mut [f32],
    deltas: &[&[f32]],
) {
    let len = b.len();
    let lambda = p.lambda as f32;
    TASK_SCRATCH.with_borrow_mut(|scratch| {
        scratch.clear();
        scratch.resize(3 * len, 0.0);
        let (mixed, rest) = scratch.split_at_mut(len);
        let (sum, agreeing) = rest.split_at_mut(len);
        if p.elect_signs {
            // The sign of Σₖ δₖ elects; a δ of the other sign (or zero) is left out.
            for d in deltas {
                for (s, d) in sum.iter_mut().zip(&d[..len]) {
                    *s += d;
                }
            }
            for (d, &w) in deltas.iter().zip(weights) {
                let d = &d[..len];
                for i in 0..len {
                    // sign(δ) equals the elected sign (+1 when Σ ≥ 0, else
                    // −1), as selects on bits rather than branches
                    // (agreement is a coin flip). Adding +0.0 changes
                    // nothing: `mixed` is never −0.0.
                    let (d, up) = (d[i], sum[i] >= 0.0);
                    let agree = ((d > 0.0) & up) | ((d < 0.0) & !up);
                    let keep = u32::from(agree).wrapping_neg();
                    mixed[i] += f32::from_bits(d.to_bits() & keep);
                    agreeing[i] += f32::from_bits(w.to_bits() & keep);
                }
            }
            if p.normalize {
                for (m, a) in mixed.iter_mut().zip(agreeing.iter()) {
                    *m /= if *a == 0.0 { 1.0 } else { *a };
                }
            }
        } else {
            for d in deltas {
                for (m, d) in mixed.iter_mut().zip(&d[..len]) {
                    *m += d;
                }
            }
            if p.normalize {
                let divisor = divisor(weights);
                mixed.iter_mut().for_each(|m| *m /= divisor);
            }
        }
        for (m, b) in mixed.iter().zip(b.iter_mut()) {
            *b += if lambda != 1.0 { m * lambda } else { *m };
        }
    });
}

thread_local! {
    /// [`add_task_vectors`]' sums, kept between chunks.
    static TASK_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The seed of DARE's keep mask for input `k` of one tensor: the recipe's
/// `seed`, the tensor's name and the input's position.
pub fn dare_stream(seed: u64, tensor: &str, k: usize) -> u64 {
    let name = blake3::hash(tensor.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&name.as_bytes()[..8]);
    seed ^ u64::from_le_bytes(bytes) ^ (k as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::ObimParams;
    use crate::recipe::Saliency;

    #[test]
    fn obim_by_hand() {
        let base = [0.0f32; 4];
        let a = [1.0f32, 0.0, 3.0, 0.5];
        let b = [2.0f32, 2.0, 0.1, 0.0];
        let op = Op::Obim(ObimParams {
            order: vec![0, 1],
            saliency: Saliency::Magnitude,
            retain: vec![0.5, 0.5],
            using: vec![None, None],
            scale: 1.0,
        });
        let ctx = TensorContext {
            name: "x",
            shape: &[4],
            obd: &[None, None],
            grams: &[],
        };
        let m = merge_tensor(&op, Some(base.to_vec()), vec![a.to_vec(), b.to_vec()], &ctx).unwrap();
        // a picks 2 of 4: positions 2 (9.0) and 0 (1.0); b gets 1 (4.0) and 3 (0.0).
        assert_eq!(m.values, vec![1.0, 2.0, 3.0, 0.0]);
        assert_eq!(m.won, Some(vec![2, 2]));
    }

    #[test]
    fn in_memory_spherical_merges_read_the_base_only_where_they_use_it() {
        let ctx = TensorContext {
            name: "x",
            shape: &[2],
            obd: &[None, None],
            grams: &[],
        };
        let (base, a, b) = (vec![1.0f32, 1.0], vec![3.0f32, 1.0], vec![1.0f32, 5.0]);
        let merge = |op: &Op, base: Option<Vec<f32>>| {
            merge_tensor(op, base, vec![a.clone(), b.clone()], &ctx).expect("merges")
        };
        // karcher never reads the base, but hands its buffer back.
        let karcher = Op::Karcher {
            max_iter: 50,
            tol: 1e-9,
        };
        let with = merge(&karcher, Some(base.clone()));
        assert_eq!(with.values, merge(&karcher, None).values);
        assert_eq!(with.spare.len(), 3);
        // multislerp of task vectors (2, 0) and (0, 4): their directions'
        // bisector at the mean norm 3, plus the base.
        let multislerp = Op::Multislerp(crate::plan::MultislerpParams {
            weights: vec![1.0, 1.0],
            normalize_weights: true,
            eps: 1e-8,
        });
        let e = 1.0 + 3.0 * std::f32::consts::FRAC_1_SQRT_2;
        let m = merge(&multislerp, Some(base));
        assert!(
            m.values.iter().all(|v| (v - e).abs() < 1e-5),
            "{:?}",
            m.values
        );
        assert_eq!(m.spare.len(), 3);
        assert_ne!(merge(&multislerp, None).values, m.values);
    }

    #[test]
    fn ties_by_hand() {
        let base = [0.0f32; 3];
        let a = [1.0f32, -2.0, 0.5];
        let b = [3.0f32, 1.0, -0.5];
        let op = Op::TaskVectors(TaskVectorParams {
            sparsify: Sparsify::Magnitude,
            elect_signs: true,
            weights: vec![1.0, 1.0],
            densities: vec![1.0, 1.0],
            normalize: true,
            rescale: false,
            lambda: 1.0,
            seed: 0,
            int8_mask: false,
        });
        let ctx = TensorContext {
            name: "x",
            shape: &[3],
            obd: &[None, None],
            grams: &[],
        };
        let m = merge_tensor(&op, Some(base.to_vec()), vec![a.to_vec(), b.to_vec()], &ctx).unwrap();
        // Signs: + (both), − (−2+1), + (tie → +: 0.5 agrees). Normalized by agreeing weights.
        assert_eq!(m.values, vec![2.0, -2.0, 0.5]);
    }

    /// [`Op::factored`]: every member of the task-vector family and OBIM
    /// merge to base + f·(their merge at f = 1 − base), to within f32
    /// rounding, so selection candidates can share the merge at f = 1.
    #[test]
    fn factored_merges_are_base_plus_factor_times_their_unit_delta() {
        let n = 4096;
        let wave = |k: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * (7 + 2 * k) % 97) as f32 - 48.0) / 400.0 + 0.1)
                .collect()
        };
        let base = wave(0);
        let inputs = vec![wave(1), wave(2), wave(3)];
        let task = |sparsify: Sparsify, elect_signs: bool, lambda: f64| {
            Op::TaskVectors(TaskVectorParams {
                sparsify,
                elect_signs,
                weights: vec![1.0, 0.5, 0.8],
                densities: vec![0.6, 0.5, 0.7],
                normalize: true,
                rescale: true,
                lambda,
                seed: 3,
                int8_mask: false,
            })
        };
        let obim = |scale: f64| {
            Op::Obim(ObimParams {
                order: vec![0, 1, 2],
                saliency: Saliency::Magnitude,
                retain: vec![0.3, 0.3, 0.3],
                using: vec![None; 3],
                scale,
            })
        };
        let ops = [
            task(Sparsify::Keep, false, 0.4),
            task(Sparsify::Magnitude, true, 0.7),
            task(Sparsify::Random, true, 1.3),
            task(
                Sparsify::Outliers {
                    gammas: vec![0.01; 3],
                },
                false,
                0.5,
            ),
            task(
                Sparsify::MagnitudeRank {
                    epsilons: vec![0.1; 3],
                },
                true,
                0.9,
            ),
            obim(0.6),
        ];
        let ctx = TensorContext {
            name: "w",
            shape: &[64, 64],
            obd: &[None, None, None],
            grams: &[],
        };
        let merged = |op: &Op| {
            merge_tensor(op, Some(base.clone()), inputs.clone(), &ctx)
                .unwrap()
                .values
        };
        for op in &ops {
            let (f, unit) = op.factored().unwrap();
            assert_ne!(f, 1.0);
            let (direct, one) = (merged(op), merged(&unit));
            assert_ne!(direct, one, "{op:?}: the factor changed nothing");
            for i in 0..n {
                let shared = base[i] + f as f32 * (one[i] - base[i]);
                assert!(
                    (shared - direct[i]).abs() <= 1e-6 * (1.0 + base[i].abs()),
                    "{op:?} at {i}: {shared} vs {}",
                    direct[i]
                );
            }
        }
        assert!(Op::ArceeFusion.factored().is_none());
    }

    fn della(rescale: bool, seed: u64) -> Op {
        Op::TaskVectors(TaskVectorParams {
            sparsify: Sparsify::MagnitudeRank {
                epsilons: vec![0.2],
            },
            elect_signs: false,
            weights: vec![1.0],
            densities: vec![0.5],
            normalize: false,
            rescale,
            lambda: 1.0,
            seed,
            int8_mask: false,
        })
    }

    #[test]
    fn della_rescale_restores_the_l1_norm() {
        // 64 rows of 8; δ = the input (the base is zero).
        let delta: Vec<f32> = (0..512)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 100.0)
            .collect();
        let ctx = TensorContext {
            name: "w",
            shape: &[64, 8],
            obd: &[None],
            grams: &[],
        };
        let m = merge_tensor(
            &della(true, 5),
            Some(vec![0.0; 512]),
            vec![delta.clone()],
            &ctx,
        )
        .unwrap();
        let l1 = |v: &[f32]| v.iter().map(|x| x.abs() as f64).sum::<f64>();
        assert!((l1(&m.values) - l1(&delta)).abs() < 1e-3 * l1(&delta));
        assert!(
            m.values.iter().filter(|v| **v == 0.0).count() > 100,
            "entries were dropped"
        );
    }

    #[test]
    fn della_is_right_in_expectation_over_seeds() {
        // Without rescale, E[merged] = p(rank)·δ: ranks 0..3 of a row of 4
        // are kept with 0.3, 0.433, 0.567, 0.7.
        let row = [0.4f32, -0.1, 0.3, -0.2]; // ranks 3, 0, 2, 1
        let ctx = TensorContext {
            name: "w",
            shape: &[1, 4],
            obd: &[None],
            grams: &[],
        };
        let seeds = 3000;
        let mut sum = [0f64; 4];
        for seed in 0..seeds {
            let m = merge_tensor(
                &della(false, seed),
                Some(vec![0.0; 4]),
                vec![row.to_vec()],
                &ctx,
            )
            .unwrap();
            for (s, v) in sum.iter_mut().zip(&m.values) {
                *s += *v as f64;
            }
        }
        for (j, rank) in [(0, 3.0), (1, 0.0), (2, 2.0), (3, 1.0)] {
            let p = 0.3 + 0.4 * rank / 3.0;
            let mean = sum[j] / seeds as f64;
            assert!(
                (mean - p * row[j] as f64).abs() < 0.03 * row[j].abs() as f64 + 0.005,
                "position {j}: mean {mean}, expected {}",
                p * row[j] as f64
            );
        }
    }

    #[test]
    fn ram_plus_boosts_unique_changes_by_overlap() {
        let op = Op::Ram(RamParams {
            epsilon: 1e-5,
            plus: Some((0.5, 0.2)),
        });
        let ctx = TensorContext {
            name: "x",
            shape: &[4],
            obd: &[None, None],
            grams: &[],
        };
        // Input 0 shares position 0 and changes position 1 alone: ρ = 1,
        // λ = 1 + 0.5·min(0.2, 1) = 1.1. Input 1 shares 0, and changes
        // position 3 by less than ε: ρ = 1/ε, λ = 1.1 too.
        let inputs = vec![vec![1.0, 2.0, 0.0, 0.0], vec![3.0, 0.0, 0.0, 1e-6]];
        let m = merge_tensor(&op, Some(vec![0.0; 4]), inputs, &ctx).unwrap();
        assert_eq!(m.values, vec![2.0, 2.2, 0.0, 0.0]);
    }

    #[test]
    fn ram_keeps_unique_changes_and_averages_shared_ones() {
        let op = Op::Ram(RamParams {
            epsilon: 1e-5,
            plus: None,
        });
        let ctx = TensorContext {
            name: "x",
            shape: &[4],
            obd: &[None, None],
            grams: &[],
        };
        let a = vec![1.0f32, 2.0, 0.0, 0.0];
        let b = vec![3.0f32, 0.0, 0.0, 1e-6];
        let m = merge_tensor(&op, Some(vec![0.0; 4]), vec![a, b], &ctx).unwrap();
        assert_eq!(m.values, vec![2.0, 2.0, 0.0, 0.0]);
    }
}
