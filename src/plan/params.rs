//! Each tensor's merge with every setting resolved: the `layers` rules that
//! match it applied (`Merge::tensor_settings`), the method's defaults filled
//! from the table in `methods.rs`, and the saliency it actually gets. The
//! plan stores one [`Op`] per tensor; the executor and the kernels read it
//! and never look a parameter up by name or default it again.

use crate::calibrate::Moments;
use crate::methods::{Method, ParamName, Scope};
use crate::recipe::{DataId, InputSettings, Saliency, TakeFrom, TensorSettings};
use serde_json::Value;

/// What happens to one tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// `take base` / `take INPUT`: copied, not merged.
    Take(TakeFrom),
    Obim(ObimParams),
    /// task arithmetic, TIES, DARE, breadcrumbs and DELLA (mergekit's
    /// generalized task arithmetic).
    TaskVectors(TaskVectorParams),
    Linear(LinearParams),
    Slerp(SlerpParams),
    ModelStock {
        filter_wise: bool,
    },
    Nuslerp(NuslerpParams),
    Multislerp(MultislerpParams),
    Karcher {
        max_iter: usize,
        tol: f64,
    },
    Sce {
        select_topk: f64,
    },
    ArceeFusion,
    Nearswap {
        t: f64,
    },
    Passthrough {
        scale: f64,
    },
    Ram(RamParams),
    Regmean(RegmeanParams),
}

/// RegMean: each linear layer's weight from the inputs' Gram matrices.
#[derive(Debug, Clone, PartialEq)]
pub struct RegmeanParams {
    /// Scale of the Gram matrices' off-diagonal entries.
    pub alpha: f64,
    /// The factor on the merged task vector.
    pub lambda: f64,
    /// Per input: the data its Gram matrices come from.
    pub using: Vec<Option<DataId>>,
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
#[derive(Debug, Clone, PartialEq)]
pub enum Sparsify {
    /// Task arithmetic: nothing is dropped (`density` has no effect).
    Keep,
    /// TIES: keep the largest |δ|.
    Magnitude,
    /// DARE: keep each entry with probability `density`.
    Random,
    /// Breadcrumbs: drop the `gamma` largest |δ| (per input) and the smallest.
    Outliers { gammas: Vec<f64> },
    /// DELLA: keep with a probability that grows with the magnitude rank
    /// in its row, from density − ε to density + ε (per input).
    MagnitudeRank { epsilons: Vec<f64> },
}

impl Sparsify {
    /// Whether the method draws random numbers (and so takes `seed`).
    pub fn is_random(&self) -> bool {
        matches!(self, Sparsify::Random | Sparsify::MagnitudeRank { .. })
    }
}

/// mergekit's generalized task arithmetic.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskVectorParams {
    pub sparsify: Sparsify,
    /// TIES' sign election (TIES, DARE-TIES, breadcrumbs-TIES, DELLA).
    pub elect_signs: bool,
    /// Per input.
    pub weights: Vec<f64>,
    /// Per input, in (0, 1].
    pub densities: Vec<f64>,
    pub normalize: bool,
    pub rescale: bool,
    pub lambda: f64,
    /// The random sparsifiers' seed.
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

/// mergekit's `nuslerp`: SLERP of two inputs (or their task vectors when
/// there is a base) at t = w₂ / (w₁ + w₂).
#[derive(Debug, Clone, PartialEq)]
pub struct NuslerpParams {
    pub weights: Vec<f64>,
    /// Vectors along the first axis (columns) instead of rows.
    pub row_wise: bool,
    /// The whole tensor as one vector.
    pub flatten: bool,
}

/// mergekit's `multislerp`: a weighted mean on the hypersphere.
#[derive(Debug, Clone, PartialEq)]
pub struct MultislerpParams {
    pub weights: Vec<f64>,
    pub normalize_weights: bool,
    pub eps: f64,
}

/// mergekit's `ram` and `ramplus_tl`.
#[derive(Debug, Clone, PartialEq)]
pub struct RamParams {
    pub epsilon: f64,
    /// RAM+ (tensor-local): (r, alpha).
    pub plus: Option<(f64, f64)>,
}

impl Op {
    /// A merge of the form base + f·Δ where Δ does not depend on f (the
    /// task-vector family's `lambda`, OBIM's `scale`): f, and the same merge
    /// at f = 1. Candidates that differ only in f share that merge.
    pub fn factored(&self) -> Option<(f64, Op)> {
        match self {
            Op::TaskVectors(p) => Some((
                p.lambda,
                Op::TaskVectors(TaskVectorParams {
                    lambda: 1.0,
                    ..p.clone()
                }),
            )),
            Op::Obim(p) => Some((
                p.scale,
                Op::Obim(ObimParams {
                    scale: 1.0,
                    ..p.clone()
                }),
            )),
            _ => None,
        }
    }

    /// Resolves one tensor's settings. Parameters without a default are
    /// required, so the checker has made sure they are set (E0007); the
    /// fallbacks below are never reached on a checked recipe.
    pub fn resolve(method: Method, s: &TensorSettings, has_linear_input: bool) -> Op {
        if let Some(from) = s.take {
            return Op::Take(from);
        }
        let number = |key: ParamName, fallback: f64| {
            s.params
                .number(key)
                .or_else(|| method.default_number(key))
                .unwrap_or(fallback)
        };
        let flag = |key: ParamName| {
            s.params
                .flag(key)
                .or_else(|| method.default_bool(key))
                .unwrap_or(false)
        };
        let per_input =
            |get: &dyn Fn(&InputSettings) -> Option<f64>, key: ParamName, fallback: f64| {
                s.inputs
                    .iter()
                    .map(|x| {
                        get(x)
                            .or_else(|| method.default_number(key))
                            .unwrap_or(fallback)
                    })
                    .collect::<Vec<f64>>()
            };
        let weights = per_input(&|x| x.weight, ParamName::Weight, 1.0);
        let normalize = flag(ParamName::Normalize);
        let task_vectors = |sparsify: Sparsify, elect_signs: bool| {
            Op::TaskVectors(TaskVectorParams {
                sparsify,
                elect_signs,
                weights: weights.clone(),
                densities: per_input(&|x| x.density, ParamName::Density, 1.0),
                normalize,
                rescale: flag(ParamName::Rescale),
                lambda: number(ParamName::Lambda, 1.0),
                seed: number(ParamName::Seed, 0.0) as u64,
                int8_mask: flag(ParamName::Int8Mask),
            })
        };
        match method {
            Method::Obim => Op::Obim(ObimParams {
                order: s.order.clone(),
                saliency: match s.saliency {
                    Saliency::Obd if !has_linear_input => Saliency::Magnitude,
                    other => other,
                },
                retain: per_input(&|x| x.retain, ParamName::Retain, 0.0),
                using: s.inputs.iter().map(|x| x.using).collect(),
                scale: number(ParamName::Scale, 1.0),
            }),
            Method::TaskArithmetic => task_vectors(Sparsify::Keep, false),
            Method::Ties => task_vectors(Sparsify::Magnitude, true),
            Method::DareTies => task_vectors(Sparsify::Random, true),
            Method::DareLinear => task_vectors(Sparsify::Random, false),
            Method::Breadcrumbs | Method::BreadcrumbsTies => task_vectors(
                Sparsify::Outliers {
                    gammas: per_input(&|x| x.gamma, ParamName::Gamma, 0.01),
                },
                method == Method::BreadcrumbsTies,
            ),
            Method::Della | Method::DellaLinear => task_vectors(
                Sparsify::MagnitudeRank {
                    epsilons: per_input(&|x| x.epsilon, ParamName::Epsilon, 0.15),
                },
                method == Method::Della,
            ),
            Method::Linear => Op::Linear(LinearParams { weights, normalize }),
            Method::Slerp => Op::Slerp(SlerpParams {
                t: number(ParamName::T, 0.5),
            }),
            Method::ModelStock => Op::ModelStock {
                filter_wise: flag(ParamName::FilterWise),
            },
            Method::Nuslerp => Op::Nuslerp(NuslerpParams {
                weights,
                row_wise: flag(ParamName::NuslerpRowWise),
                flatten: flag(ParamName::NuslerpFlatten),
            }),
            Method::Multislerp => Op::Multislerp(MultislerpParams {
                weights,
                normalize_weights: flag(ParamName::NormalizeWeights),
                eps: number(ParamName::Eps, 1e-8),
            }),
            Method::Karcher => Op::Karcher {
                max_iter: number(ParamName::MaxIter, 10.0) as usize,
                tol: number(ParamName::Tol, 1e-5),
            },
            Method::Sce => Op::Sce {
                select_topk: number(ParamName::SelectTopk, 1.0),
            },
            Method::ArceeFusion => Op::ArceeFusion,
            Method::Nearswap => Op::Nearswap {
                t: number(ParamName::T, 0.0),
            },
            Method::Passthrough => Op::Passthrough {
                scale: number(ParamName::Scale, 1.0),
            },
            Method::Ram | Method::RamplusTl => Op::Ram(RamParams {
                epsilon: number(ParamName::Epsilon, 1e-5),
                plus: (method == Method::RamplusTl)
                    .then(|| (number(ParamName::R, 0.1), number(ParamName::Alpha, 0.2))),
            }),
            Method::Regmean => Op::Regmean(RegmeanParams {
                alpha: number(ParamName::Alpha, 0.9),
                lambda: number(ParamName::Lambda, 1.0),
                using: s.inputs.iter().map(|x| x.using).collect(),
            }),
        }
    }

    /// The statistics the tensor's merge reads: each input's `using` data
    /// and which moments of it (OBD's Σ x², RegMean's Σ x xᵀ).
    pub fn calibration(&self) -> Option<(&[Option<DataId>], Moments)> {
        match self {
            Op::Obim(p) if p.saliency == Saliency::Obd => Some((&p.using, Moments::Diagonal)),
            Op::Regmean(p) => Some((&p.using, Moments::Gram)),
            _ => None,
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
            (Op::ModelStock { filter_wise }, ParamName::FilterWise) => (*filter_wise).into(),
            (Op::Nuslerp(p), ParamName::NuslerpRowWise) => p.row_wise.into(),
            (Op::Nuslerp(p), ParamName::NuslerpFlatten) => p.flatten.into(),
            (Op::Multislerp(p), ParamName::NormalizeWeights) => p.normalize_weights.into(),
            (Op::Multislerp(p), ParamName::Eps) => p.eps.into(),
            (Op::Karcher { max_iter, .. }, ParamName::MaxIter) => (*max_iter as u64).into(),
            (Op::Karcher { tol, .. }, ParamName::Tol) => (*tol).into(),
            (Op::Sce { select_topk }, ParamName::SelectTopk) => (*select_topk).into(),
            (Op::Nearswap { t }, ParamName::T) => (*t).into(),
            (Op::Passthrough { scale }, ParamName::Scale) => (*scale).into(),
            (Op::Ram(p), ParamName::Epsilon) => p.epsilon.into(),
            (Op::Regmean(p), ParamName::Alpha) => p.alpha.into(),
            (Op::Regmean(p), ParamName::Lambda) => p.lambda.into(),
            (
                Op::Ram(RamParams {
                    plus: Some((r, _)), ..
                }),
                ParamName::R,
            ) => (*r).into(),
            (
                Op::Ram(RamParams {
                    plus: Some((_, a)), ..
                }),
                ParamName::Alpha,
            ) => (*a).into(),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::{MergeParams, ParamValue};

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
        let mut s = settings(2, {
            let mut p = MergeParams::default();
            p.set(ParamName::Normalize, Some(ParamValue::Bool(false)));
            p.set(ParamName::Lambda, Some(ParamValue::Number(0.5)));
            p.set(ParamName::Seed, Some(ParamValue::Number(7.0)));
            p
        });
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
