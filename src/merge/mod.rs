//! Merge one tensor with one method, given the base's and the inputs'
//! values in f32 and the settings `Merge::tensor_settings` chose for it.
//! Every method is written with the kernels of `kernels.rs`; the definitions
//! follow mergekit 0.1.5 (`generalized_task_arithmetic.py`, `sparsify.py`,
//! `linear.py`, `slerp.py`) and, for `obim`, DESIGN §3.

pub mod kernels;

use crate::methods::Method;
use crate::recipe::{Saliency, TakeFrom, TensorSettings};

/// One merged tensor, and for OBIM how many positions each input won.
#[derive(Debug, Clone, PartialEq)]
pub struct Merged {
    pub values: Vec<f32>,
    pub won: Option<Vec<u64>>,
}

/// Per-input OBD statistics of one tensor: the sum of squared input
/// activations per input feature (`d_j`), or for a bias the token count.
#[derive(Debug, Clone)]
pub enum ObdStats {
    Columns(Vec<f64>),
    Tokens(f64),
}

/// What else a tensor's merge needs to know.
pub struct TensorContext<'a> {
    pub name: &'a str,
    pub shape: &'a [usize],
    /// Per input; `None` where the saliency is `magnitude` (or no statistics apply).
    pub obd: &'a [Option<ObdStats>],
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MergeError {
    #[error("tensor `{tensor}`: {reason}")]
    Invalid { tensor: String, reason: String },
}

/// Merges one tensor. `base` is `None` only for `linear` without a base.
pub fn merge_tensor(
    method: Method,
    s: &TensorSettings,
    base: Option<&[f32]>,
    inputs: &[&[f32]],
    ctx: &TensorContext,
) -> Result<Merged, MergeError> {
    let invalid = |reason: &str| MergeError::Invalid {
        tensor: ctx.name.to_string(),
        reason: reason.to_string(),
    };
    match s.take {
        Some(TakeFrom::Base) => {
            return base
                .map(|b| plain(b.to_vec()))
                .ok_or_else(|| invalid("`take base` in a merge without a base"));
        }
        Some(TakeFrom::Input(i)) => {
            return inputs
                .get(i)
                .map(|x| plain(x.to_vec()))
                .ok_or_else(|| invalid("`take` names a missing input"));
        }
        None => {}
    }
    let param = |x: Option<f64>, default: f64| x.unwrap_or(default);
    let weight = |i: usize| s.inputs[i].weight.unwrap_or(1.0);
    match method {
        Method::Obim => {
            let base = base.ok_or_else(|| invalid("obim needs a base"))?;
            Ok(obim(s, base, inputs, ctx))
        }
        Method::Linear => {
            let normalize = s.params.normalize.unwrap_or(true);
            let n = inputs.first().map_or(0, |x| x.len());
            let mut out = vec![0f32; n];
            for (i, x) in inputs.iter().enumerate() {
                let w = weight(i) as f32;
                kernels::update(&mut out, |j, v| v + x[j] * w);
            }
            if normalize {
                let total: f32 = (0..inputs.len()).map(|i| weight(i) as f32).sum();
                kernels::update(&mut out, |_, v| v / total);
            }
            Ok(plain(out))
        }
        Method::Slerp => {
            let base = base.ok_or_else(|| invalid("slerp needs a base"))?;
            let other = inputs
                .first()
                .ok_or_else(|| invalid("slerp needs one input"))?;
            Ok(plain(kernels::slerp(param(s.params.t, 0.5), base, other)))
        }
        Method::TaskArithmetic | Method::Ties | Method::DareTies | Method::DareLinear => {
            let base = base.ok_or_else(|| invalid("this method needs a base"))?;
            Ok(plain(task_arithmetic_family(method, s, base, inputs, ctx)))
        }
    }
}

fn plain(values: Vec<f32>) -> Merged {
    Merged { values, won: None }
}

/// mergekit's `GeneralizedTaskArithmeticMerge`: sparsify each δ (TIES: by
/// magnitude; DARE: at random), weight it, elect signs (TIES, DARE-TIES), sum,
/// optionally divide by the (agreeing) weights, scale by λ, add to the base.
fn task_arithmetic_family(
    method: Method,
    s: &TensorSettings,
    base: &[f32],
    inputs: &[&[f32]],
    ctx: &TensorContext,
) -> Vec<f32> {
    let defaults = |name: &str| method.param(name).and_then(|p| p.default);
    let flag = |given: Option<bool>, name: &str| {
        given.unwrap_or(matches!(
            defaults(name),
            Some(crate::methods::Default::Bool(true))
        ))
    };
    let normalize = flag(s.params.normalize, "normalize");
    let rescale = flag(s.params.rescale, "rescale");
    let lambda = s.params.lambda.unwrap_or(1.0) as f32;
    let seed = s.params.seed.unwrap_or(0);
    let weights: Vec<f32> = s
        .inputs
        .iter()
        .map(|x| x.weight.unwrap_or(1.0) as f32)
        .collect();
    let deltas: Vec<Vec<f32>> = inputs
        .iter()
        .enumerate()
        .map(|(k, x)| {
            let mut d = kernels::task_vector(base, x);
            let density = s.inputs[k].density.unwrap_or(1.0);
            if density < 1.0 {
                let original = if rescale { kernels::l1(&d) } else { 0.0 };
                match method {
                    Method::Ties => kernels::keep_largest(&mut d, density),
                    Method::DareTies | Method::DareLinear => {
                        kernels::keep_random(&mut d, density, dare_stream(seed, ctx.name, k))
                    }
                    _ => {}
                }
                if rescale && matches!(method, Method::Ties | Method::DareTies | Method::DareLinear)
                {
                    kernels::rescale_l1(&mut d, original);
                }
            }
            let w = weights[k];
            kernels::update(&mut d, |_, v| v * w);
            d
        })
        .collect();
    let n = base.len();
    let consensus = matches!(method, Method::Ties | Method::DareTies);
    let mut mixed = vec![0f32; n];
    if consensus {
        let agree = kernels::sign_agreement(&deltas);
        let mut divisor = vec![0f32; n];
        for (k, d) in deltas.iter().enumerate() {
            let a = &agree[k];
            kernels::update(&mut mixed, |i, v| if a[i] { v + d[i] } else { v });
            let w = weights[k];
            kernels::update(&mut divisor, |i, v| if a[i] { v + w } else { v });
        }
        if normalize {
            kernels::update(&mut mixed, |i, v| {
                v / if divisor[i] == 0.0 { 1.0 } else { divisor[i] }
            });
        }
    } else {
        for d in &deltas {
            kernels::update(&mut mixed, |i, v| v + d[i]);
        }
        if normalize {
            let total: f32 = weights.iter().sum();
            let divisor = if total.abs() < 1e-8 { 1.0 } else { total };
            kernels::update(&mut mixed, |_, v| v / divisor);
        }
    }
    if lambda != 1.0 {
        kernels::update(&mut mixed, |_, v| v * lambda);
    }
    kernels::update(&mut mixed, |i, v| base[i] + v);
    mixed
}

/// The seed of DARE's keep mask for input `k` of one tensor: the recipe's
/// `seed`, the tensor's name and the input's position.
pub fn dare_stream(seed: u64, tensor: &str, k: usize) -> u64 {
    let name = blake3::hash(tensor.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&name.as_bytes()[..8]);
    seed ^ u64::from_le_bytes(bytes) ^ (k as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03)
}

/// OBIM (DESIGN §3): saliency per input, exclusive assignment in the
/// tensor's order with q = round(retain·N), merged = θ_B + Σ 1[owner = k]·δₖ.
fn obim(s: &TensorSettings, base: &[f32], inputs: &[&[f32]], ctx: &TensorContext) -> Merged {
    let deltas: Vec<Vec<f32>> = inputs
        .iter()
        .map(|x| kernels::task_vector(base, x))
        .collect();
    let cols = ctx.shape.last().copied().unwrap_or(1).max(1);
    let scores: Vec<Vec<f32>> = deltas
        .iter()
        .enumerate()
        .map(|(k, d)| {
            let mut score = d.clone();
            match (s.saliency, ctx.obd.get(k).and_then(Option::as_ref)) {
                (Saliency::Obd, Some(ObdStats::Columns(dj))) => {
                    kernels::update(&mut score, |i, v| {
                        (v as f64 * v as f64 * dj[i % cols]) as f32
                    })
                }
                (Saliency::Obd, Some(ObdStats::Tokens(t))) => {
                    kernels::update(&mut score, |_, v| (v as f64 * v as f64 * t) as f32)
                }
                _ => kernels::update(&mut score, |_, v| v * v),
            }
            score
        })
        .collect();
    let n = base.len();
    let quotas: Vec<usize> = s
        .inputs
        .iter()
        .map(|x| kernels::quota(x.retain.unwrap_or(0.0), n))
        .collect();
    let owner = kernels::exclusive_assign(&scores, &quotas, &s.order);
    let mut won = vec![0u64; inputs.len()];
    for &o in &owner {
        if o != kernels::UNOWNED {
            won[o as usize] += 1;
        }
    }
    let mut values = base.to_vec();
    kernels::update(&mut values, |i, v| match owner[i] {
        kernels::UNOWNED => v,
        k => v + deltas[k as usize][i],
    });
    Merged {
        values,
        won: Some(won),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::{InputSettings, MergeParams};

    fn settings(inputs: Vec<InputSettings>, order: Vec<usize>) -> TensorSettings {
        TensorSettings {
            take: None,
            order,
            saliency: Saliency::Magnitude,
            inputs,
            params: MergeParams::default(),
            rule_lines: vec![],
        }
    }

    #[test]
    fn obim_by_hand() {
        let base = [0.0f32; 4];
        let a = [1.0f32, 0.0, 3.0, 0.5];
        let b = [2.0f32, 2.0, 0.1, 0.0];
        let input = |r| InputSettings {
            retain: Some(r),
            ..Default::default()
        };
        let s = settings(vec![input(0.5), input(0.5)], vec![0, 1]);
        let ctx = TensorContext {
            name: "x",
            shape: &[4],
            obd: &[None, None],
        };
        let m = merge_tensor(Method::Obim, &s, Some(&base), &[&a, &b], &ctx).unwrap();
        // a picks 2 of 4: positions 2 (9.0) and 0 (1.0); b gets 1 (4.0) and 3 (0.0).
        assert_eq!(m.values, vec![1.0, 2.0, 3.0, 0.0]);
        assert_eq!(m.won, Some(vec![2, 2]));
    }

    #[test]
    fn ties_by_hand() {
        let base = [0.0f32; 3];
        let a = [1.0f32, -2.0, 0.5];
        let b = [3.0f32, 1.0, -0.5];
        let input = || InputSettings {
            weight: Some(1.0),
            density: Some(1.0),
            ..Default::default()
        };
        let s = settings(vec![input(), input()], vec![]);
        let ctx = TensorContext {
            name: "x",
            shape: &[3],
            obd: &[None, None],
        };
        let m = merge_tensor(Method::Ties, &s, Some(&base), &[&a, &b], &ctx).unwrap();
        // Signs: + (both), − (−2+1), + (tie → +: 0.5 agrees). Normalized by agreeing weights.
        assert_eq!(m.values, vec![2.0, -2.0, 0.5]);
    }
}
