//! What each method computes, for `obim explain METHOD`: the maths of
//! DESIGN §3 and of mergekit 0.1.5's implementation, in a few lines each.
//! Notation: θ_B the base's tensor, θₖ input k's, δₖ = θₖ − θ_B its task
//! vector, wₖ its weight, N the tensor's number of entries.

use super::Method;

impl Method {
    /// The method's name as mergekit's registry gives it, and where it comes from.
    pub fn title(self) -> &'static str {
        match self {
            Method::Obim => "OBIM, Optimal Brain Iterative Merging (arXiv 2502.12217)",
            Method::TaskArithmetic => "Task Arithmetic (arXiv 2212.04089)",
            Method::Ties => "TIES (arXiv 2306.01708)",
            Method::DareTies => "DARE TIES (arXiv 2311.03099)",
            Method::DareLinear => "Linear DARE (arXiv 2311.03099)",
            Method::Linear => "Linear (model soups, arXiv 2203.05482)",
            Method::Slerp => "SLERP",
            Method::Breadcrumbs => "Model Breadcrumbs (arXiv 2312.06795)",
            Method::BreadcrumbsTies => "Model Breadcrumbs with TIES (arXiv 2312.06795)",
            Method::Della => "DELLA (arXiv 2406.11617)",
            Method::DellaLinear => "Linear DELLA (arXiv 2406.11617)",
            Method::ModelStock => "Model Stock (arXiv 2403.19522)",
            Method::Nuslerp => "NuSLERP",
            Method::Multislerp => "Multi-SLERP",
            Method::Karcher => "Karcher mean",
            Method::Sce => "SCE (arXiv 2408.07990)",
            Method::ArceeFusion => "Arcee Fusion",
            Method::Nearswap => "NearSwap",
            Method::Passthrough => "Passthrough",
            Method::Ram => "Reinforced Agent Merging (arXiv 2601.13572)",
            Method::RamplusTl => "Reinforced Agent Merging Plus, tensor-local (arXiv 2601.13572)",
            Method::Regmean => "RegMean, Dataless Knowledge Fusion (arXiv 2212.09849)",
        }
    }

    /// What the method computes for one tensor.
    pub fn maths(self) -> &'static str {
        match self {
            Method::Obim => {
                "In the tensor's order (`order`, default: rotated by the layer index), input k claims\n\
                 the qₖ = round(retainₖ·N) unowned positions with the largest saliency (ties to the\n\
                 lower flat index); merged = θ_B + scale · Σₖ 1[owner = k]·δₖ. Saliency `obd`:\n\
                 δₖ[i,j]²·d_j with d_j = Σ_t x_{t,j}² of the layer's input on input k's own `using`\n\
                 data; `magnitude`: δ²."
            }
            Method::TaskArithmetic => {
                "θ_B + λ·Σₖ wₖδₖ, divided by Σw when `normalize` (by 1 when |Σw| < 1e-8)."
            }
            Method::Ties => {
                "Each δₖ keeps its max(1, ⌊density·N⌋) largest |δ| (`rescale`: times the L1 norm\n\
                 it had over the one it keeps); δₖ·wₖ; the sign of Σₖ wₖδₖ is elected (ties to +);\n\
                 merged delta = the sum of the agreeing entries, divided by the sum of the agreeing\n\
                 weights when `normalize`; θ_B + λ·delta."
            }
            Method::DareTies => {
                "As ties, but each entry of δₖ is kept with probability `density` (obim's\n\
                 SplitMix64 stream from `seed`, the tensor's name and k); `rescale` (default on)\n\
                 restores δₖ's L1 norm, as mergekit does, not the paper's 1/density."
            }
            Method::DareLinear => {
                "As task_arithmetic after DARE's random drop (see dare_ties), no sign election."
            }
            Method::Linear => "Σₖ wₖθₖ, divided by Σw when `normalize`.",
            Method::Slerp => {
                "With d the dot product of the normalised whole tensors: (1−t)·θ_B + t·θ₁ when\n\
                 |d| > 0.9995, else sin((1−t)Ω)/sin Ω·θ_B + sin(tΩ)/sin Ω·θ₁, Ω = acos d."
            }
            Method::Breadcrumbs => {
                "mergekit's `magnitude_outliers`: of δₖ's N entries sorted by |δ|, the ⌊gamma·N⌋\n\
                 largest are dropped as outliers and the smallest as needed to keep ⌊density·N⌋\n\
                 (fewer outliers go when both do not fit); then as task_arithmetic (`rescale`:\n\
                 restore δₖ's L1 norm)."
            }
            Method::BreadcrumbsTies => {
                "Breadcrumbs' sparsification, then TIES' sign election and agreeing sum."
            }
            Method::Della => {
                "mergekit's `della_magprune`: in each row (last axis) of δₖ, the entry of magnitude\n\
                 rank r of C (0 the smallest) is kept with probability density − ε + 2ε·r/(C−1),\n\
                 drawn like DARE's; `rescale` (default on) restores δₖ's L1 norm (the paper divides\n\
                 each kept entry by its probability: mergekit does not, nor does obim); then TIES'\n\
                 sign election, normalized by the agreeing weights. density ± ε must lie in (0, 1)."
            }
            Method::DellaLinear => {
                "DELLA's sparsification (see della), then a plain weighted sum as task_arithmetic."
            }
            Method::ModelStock => {
                "With K inputs and cos the mean cosine between their task vectors (pairwise, over\n\
                 the whole tensor, or per row with `filter_wise`): t = K·cos / (1 + (K−1)·cos) (0\n\
                 where the denominator is ≈ 0); merged = t·mean(θₖ) + (1−t)·θ_B."
            }
            Method::Nuslerp => {
                "SLERP of the two inputs (of their task vectors, added back to θ_B, when there is a\n\
                 base) at t = w₂/(w₁+w₂) (0.5 when the weights sum to ≈ 0): over the whole tensor\n\
                 (`nuslerp_flatten`, the default), else per row, or per column with\n\
                 `nuslerp_row_wise`; linear where the vectors are colinear."
            }
            Method::Multislerp => {
                "The inputs (task vectors with a base) as unit vectors uₖ = xₖ/(‖xₖ‖+eps); their\n\
                 weighted mean m (weights divided by their sum with `normalize_weights`) normalised;\n\
                 the weighted mean of the tangent vectors uₖ − (uₖ·m)m mapped back by the\n\
                 exponential map at m; scaled by Σ wₖ‖xₖ‖; plus θ_B. One input is returned as it is."
            }
            Method::Karcher => {
                "The Karcher mean of the inputs' directions on the unit sphere, equal weights: start\n\
                 at their normalised mean, step along the mean of the log maps θ/sin θ·(u − cos θ·m)\n\
                 at most `max_iter` times until the step is below `tol`; scaled by the mean norm."
            }
            Method::Sce => {
                "Task vectors; with select_topk < 1, only the ⌊select_topk·(positions that vary)⌋\n\
                 positions with the largest variance across the inputs stay; TIES' sign election;\n\
                 each task vector weighted by its mean square over their sum; merged delta = Σ of the\n\
                 agreeing weighted entries / Σ of the agreeing weights (at least 1e-6); θ_B + delta."
            }
            Method::ArceeFusion => {
                "importance = |θ₁ − θ_B| · KL(softmax(θ₁) ‖ softmax(θ_B)) per row (last axis);\n\
                 positions whose importance reaches median + 1.5·IQR (quantiles over the tensor)\n\
                 take θ₁, the rest keep θ_B. obim's quantiles are exact; mergekit samples 1M\n\
                 positions in larger tensors."
            }
            Method::Nearswap => {
                "w = clamp(t / max(|θ_B − θ₁|, 1e-6), 0, 1) per position; merged = w·θ₁ + (1−w)·θ_B:\n\
                 the base takes the other model's value where the two are within t."
            }
            Method::Passthrough => {
                "The one input's tensor, times `scale` when it is not 1; with `slice`s, layers\n\
                 stacked from ranges of several models."
            }
            Method::Ram => {
                "A position changed (|δₖ| > epsilon) by one input takes that δₖ; one changed by\n\
                 several takes their mean; θ_B + the result."
            }
            Method::RamplusTl => {
                "As ram, but input k's unique changes are multiplied by 1 + r·min(alpha, ρₖ), ρₖ =\n\
                 (positions k shares with others) / (positions k changes alone), counted per tensor."
            }
            Method::Regmean => {
                "For a linear layer's weight W (y = W x): Gₖ = Σ_t x xᵀ of the layer's input over\n\
                 input k's own `using` data, G̃ₖ = alpha·Gₖ + (1 − alpha)·diag(Gₖ); merged = θ_B +\n\
                 λ·(Σₖ δₖ G̃ₖ)(Σₖ G̃ₖ)⁻¹, solved in f64 by Cholesky (a ridge added where the sum is\n\
                 not positive definite). Every other tensor (embeddings, norms, biases): θ_B + λ·mean\n\
                 of the δₖ, the mean of the inputs at λ = 1."
            }
        }
    }
}
