//! Each tensor's merge with every setting resolved: the `layers` rules that
//! match it applied (`Merge::tensor_settings`), the method's defaults filled
//! from the table in `methods.rs`, and the saliency it actually gets. The
//! plan stores one [`Op`] per tensor; the executor and the kernels read it
//! and never look a parameter up by name or default it again.

use crate::methods::{Method, ParamName, Scope};
use crate::recipe::{DataId, Saliency, TakeFrom, TensorSettings};
use serde_json::Value;

/// What happens to one tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// `take base` / `take INPUT`: copied, not merged.
    Take(TakeFrom),
    Obim(ObimParams),
    /// task arithmetic, TIES, DARE-TIES and DARE-linear.
    TaskVectors(TaskVectorParams),
    Linear(LinearParams),
    Slerp(SlerpParams),
}

/// OBIM (DESIGN §3).
#[derive(Debug, Clone, PartialEq)]
pub struct ObimParams {
    /// Input indices in the order they claim positions.
    pub order: Vec<usize>,
    /// The saliency this tensor gets (`obd` falls back to magnitude where a
    /// tensor has no linear input).
    pub saliency: Saliency,
    /// Per input: the fraction of positions it keeps.
    pub retain: Vec<f64>,
    /// Per input: the calibration data of its OBD statistics.
    pub using: Vec<Option<DataId>>,
    /// The factor on kept deltas.
    pub scale: f64,
}

/// How a task-vector method drops entries before summing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sparsify {
    /// Task arithmetic: nothing is dropped (`density` has no effect).
    Keep,
    /// TIES: keep the largest |δ|.
    Magnitude,
    /// DARE: keep each entry with probability `density`.
    Random,
}

/// mergekit's generalized task arithmetic.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskVectorParams {
    pub sparsify: Sparsify,
    /// TIES' sign election (TIES, DARE-TIES).
    pub elect_signs: bool,
    /// Per input.
    pub weights: Vec<f64>,
    /// Per input, in (0, 1].
    pub densities: Vec<f64>,
    pub normalize: bool,
    pub rescale: bool,
    pub lambda: f64,
    /// DARE's keep mask seed.
    pub seed: u64,
    /// Accepted for mergekit compatibility; masks are always exact.
    pub int8_mask: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LinearParams {
    /// Per input.
    pub weights: Vec<f64>,
    pub normalize: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SlerpParams {
    /// From the base (0) to the other model (1).
    pub t: f64,
}

impl Op {
    /// Resolves one tensor's settings. Parameters without a default are
    /// required, so the checker has made sure they are set (E0007); the
    /// fallbacks below are never reached on a checked recipe.
    pub fn resolve(method: Method, s: &TensorSettings, has_linear_input: bool) -> Op {
        if let Some(from) = s.take {
            return Op::Take(from);
        }
        let number = |set: Option<f64>, key: ParamName, fallback: f64| {
            set.or_else(|| method.default_number(key))
                .unwrap_or(fallback)
        };
        let flag = |set: Option<bool>, key: ParamName| {
            set.or_else(|| method.default_bool(key)).unwrap_or(false)
        };
        let per_input = |get: &dyn Fn(usize) -> Option<f64>, key: ParamName, fallback: f64| {
            (0..s.inputs.len())
                .map(|i| number(get(i), key, fallback))
                .collect::<Vec<f64>>()
        };
        let weights = per_input(&|i| s.inputs[i].weight, ParamName::Weight, 1.0);
        let normalize = flag(s.params.normalize, ParamName::Normalize);
        match method {
            Method::Obim => Op::Obim(ObimParams {
                order: s.order.clone(),
                saliency: match s.saliency {
                    Saliency::Obd if !has_linear_input => Saliency::Magnitude,
                    other => other,
                },
                retain: per_input(&|i| s.inputs[i].retain, ParamName::Retain, 0.0),
                using: s.inputs.iter().map(|x| x.using).collect(),
                scale: number(s.params.scale, ParamName::Scale, 1.0),
            }),
            Method::TaskArithmetic | Method::Ties | Method::DareTies | Method::DareLinear => {
                Op::TaskVectors(TaskVectorParams {
                    sparsify: match method {
                        Method::Ties => Sparsify::Magnitude,
                        Method::DareTies | Method::DareLinear => Sparsify::Random,
                        _ => Sparsify::Keep,
                    },
                    elect_signs: matches!(method, Method::Ties | Method::DareTies),
                    weights,
                    densities: per_input(&|i| s.inputs[i].density, ParamName::Density, 1.0),
                    normalize,
                    rescale: flag(s.params.rescale, ParamName::Rescale),
                    lambda: number(s.params.lambda, ParamName::Lambda, 1.0),
                    seed: s
                        .params
                        .seed
                        .unwrap_or_else(|| number(None, ParamName::Seed, 0.0) as u64),
                    int8_mask: flag(s.params.int8_mask, ParamName::Int8Mask),
                })
            }
            Method::Linear => Op::Linear(LinearParams { weights, normalize }),
            Method::Slerp => Op::Slerp(SlerpParams {
                t: number(s.params.t, ParamName::T, 0.5),
            }),
        }
    }

    /// The merge-level parameters and their values, in the method table's
    /// order (what `obim plan` shows beside each tensor).
    pub fn merge_params(&self, method: Method) -> Vec<(&'static str, Value)> {
        method
            .params()
            .iter()
            .filter(|p| p.scope == Scope::Merge && p.key != ParamName::Base)
            .filter_map(|p| Some((p.name, self.merge_param(p.key)?)))
            .collect()
    }

    fn merge_param(&self, key: ParamName) -> Option<Value> {
        Some(match (self, key) {
            (Op::Obim(o), ParamName::Scale) => o.scale.into(),
            (Op::TaskVectors(p), ParamName::Normalize) => p.normalize.into(),
            (Op::TaskVectors(p), ParamName::Rescale) => p.rescale.into(),
            (Op::TaskVectors(p), ParamName::Lambda) => p.lambda.into(),
            (Op::TaskVectors(p), ParamName::Int8Mask) => p.int8_mask.into(),
            (Op::TaskVectors(p), ParamName::Seed) => p.seed.into(),
            (Op::Linear(p), ParamName::Normalize) => p.normalize.into(),
            (Op::Slerp(p), ParamName::T) => p.t.into(),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::{InputSettings, MergeParams};

    fn settings(inputs: usize, params: MergeParams) -> TensorSettings {
        TensorSettings {
            take: None,
            order: (0..inputs).collect(),
            saliency: Saliency::Obd,
            inputs: vec![InputSettings::default(); inputs],
            params,
            rule_lines: vec![],
        }
    }

    #[test]
    fn defaults_come_from_the_method_table() {
        let ties = Op::resolve(Method::Ties, &settings(2, MergeParams::default()), true);
        let Op::TaskVectors(p) = ties else {
            panic!("ties is a task-vector method: {ties:?}")
        };
        assert_eq!(p.sparsify, Sparsify::Magnitude);
        assert!(p.elect_signs && p.normalize && !p.rescale);
        assert_eq!((p.lambda, p.densities.clone()), (1.0, vec![1.0, 1.0]));
        let dare = Op::resolve(
            Method::DareLinear,
            &settings(1, MergeParams::default()),
            true,
        );
        assert!(matches!(
            dare,
            Op::TaskVectors(TaskVectorParams {
                sparsify: Sparsify::Random,
                elect_signs: false,
                rescale: true,
                ..
            })
        ));
        let linear = Op::resolve(Method::Linear, &settings(1, MergeParams::default()), true);
        assert_eq!(
            linear,
            Op::Linear(LinearParams {
                weights: vec![1.0],
                normalize: true
            })
        );
    }

    #[test]
    fn set_values_win_and_obd_needs_a_linear_input() {
        let mut s = settings(
            2,
            MergeParams {
                normalize: Some(false),
                lambda: Some(0.5),
                seed: Some(7),
                ..Default::default()
            },
        );
        s.inputs[1].density = Some(0.3);
        let Op::TaskVectors(p) = Op::resolve(Method::DareTies, &s, true) else {
            panic!("dare_ties is a task-vector method")
        };
        assert_eq!((p.normalize, p.lambda, p.seed), (false, 0.5, 7));
        assert_eq!(p.densities, vec![1.0, 0.3]);
        let norm = Op::resolve(Method::Obim, &s, false);
        assert!(matches!(
            norm,
            Op::Obim(ObimParams {
                saliency: Saliency::Magnitude,
                ..
            })
        ));
        s.take = Some(TakeFrom::Base);
        assert_eq!(
            Op::resolve(Method::Obim, &s, true),
            Op::Take(TakeFrom::Base)
        );
    }

    #[test]
    fn merge_params_follow_the_table_order() {
        let op = Op::resolve(Method::DareTies, &settings(1, MergeParams::default()), true);
        let names: Vec<&str> = op
            .merge_params(Method::DareTies)
            .iter()
            .map(|(n, _)| *n)
            .collect();
        assert_eq!(
            names,
            ["normalize", "rescale", "lambda", "int8_mask", "seed"]
        );
    }
}
