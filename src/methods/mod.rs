//! The merge methods and their parameters: names, types, defaults and ranges
//! follow mergekit 0.1.5 (`merge_methods/registry.py` and the module of each
//! method), plus obim's own `obim` method and the `seed` of the random
//! sparsifiers (DARE, DELLA).

mod maths;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    Obim,
    TaskArithmetic,
    Ties,
    DareTies,
    DareLinear,
    Linear,
    Slerp,
    Breadcrumbs,
    BreadcrumbsTies,
    Della,
    DellaLinear,
    ModelStock,
    Nuslerp,
    Multislerp,
    Karcher,
    Sce,
    ArceeFusion,
    Nearswap,
    Passthrough,
    Ram,
    RamplusTl,
    Regmean,
}

/// Whether a method takes a `base:` (mergekit's `BasePolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseUse {
    Required,
    /// With a base the method works on task vectors, without on the weights.
    Optional,
    /// No base (mergekit's "ignored": a base there is one more input).
    None,
}

/// The type and domain of a parameter value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// A model or merge.
    Model,
    /// A `data` source.
    Data,
    Bool,
    /// Any finite number.
    Number,
    /// A fraction in (0, 1].
    Fraction,
    /// A number in [0, 1].
    Unit,
    /// A non-negative integer.
    Seed,
    /// A positive integer.
    Count,
    /// A number ≥ 0.
    NonNegative,
}

impl Kind {
    pub fn describe(self) -> &'static str {
        match self {
            Kind::Model => "a model or merge",
            Kind::Data => "a data source",
            Kind::Bool => "`true` or `false`",
            Kind::Number => "a number",
            Kind::Fraction => "a number in (0, 1]",
            Kind::Unit => "a number in [0, 1]",
            Kind::Seed => "a non-negative integer",
            Kind::Count => "a positive integer",
            Kind::NonNegative => "a number ≥ 0",
        }
    }
}

/// Where a parameter may be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Only in the merge's parameter list (or a rule): `ties(normalize: false)`.
    Merge,
    /// Per input (`math weight 0.5`), or in the parameter list as the default
    /// for every input (`ties(density: 0.5)`), like mergekit's `parameters`.
    Input,
}

/// Every parameter any method takes, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ParamName {
    Base,
    Weight,
    Density,
    Retain,
    Using,
    Scale,
    Normalize,
    Rescale,
    Lambda,
    Int8Mask,
    Seed,
    T,
    Gamma,
    Epsilon,
    FilterWise,
    NuslerpRowWise,
    NuslerpFlatten,
    NormalizeWeights,
    Eps,
    MaxIter,
    Tol,
    SelectTopk,
    R,
    Alpha,
}

impl ParamName {
    pub const fn as_str(self) -> &'static str {
        match self {
            ParamName::Base => "base",
            ParamName::Weight => "weight",
            ParamName::Density => "density",
            ParamName::Retain => "retain",
            ParamName::Using => "using",
            ParamName::Scale => "scale",
            ParamName::Normalize => "normalize",
            ParamName::Rescale => "rescale",
            ParamName::Lambda => "lambda",
            ParamName::Int8Mask => "int8_mask",
            ParamName::Seed => "seed",
            ParamName::T => "t",
            ParamName::Gamma => "gamma",
            ParamName::Epsilon => "epsilon",
            ParamName::FilterWise => "filter_wise",
            ParamName::NuslerpRowWise => "nuslerp_row_wise",
            ParamName::NuslerpFlatten => "nuslerp_flatten",
            ParamName::NormalizeWeights => "normalize_weights",
            ParamName::Eps => "eps",
            ParamName::MaxIter => "max_iter",
            ParamName::Tol => "tol",
            ParamName::SelectTopk => "select_topk",
            ParamName::R => "r",
            ParamName::Alpha => "alpha",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Param {
    pub key: ParamName,
    /// `key`'s spelling in recipes.
    pub name: &'static str,
    pub kind: Kind,
    pub scope: Scope,
    /// `None`: required.
    pub default: Option<Default>,
    pub doc: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Default {
    Bool(bool),
    Number(f64),
    /// Optional with no value (e.g. `using` when saliency is `magnitude`).
    Unset,
}

const fn p(
    key: ParamName,
    kind: Kind,
    scope: Scope,
    default: Option<Default>,
    doc: &'static str,
) -> Param {
    Param {
        key,
        name: key.as_str(),
        kind,
        scope,
        default,
        doc,
    }
}

const BASE: Param = p(
    ParamName::Base,
    Kind::Model,
    Scope::Merge,
    None,
    "the model task vectors are taken against",
);
const WEIGHT: Param = p(
    ParamName::Weight,
    Kind::Number,
    Scope::Input,
    None,
    "the input's weight",
);
const DENSITY: Param = p(
    ParamName::Density,
    Kind::Fraction,
    Scope::Input,
    Some(Default::Number(1.0)),
    "fraction of the task vector kept",
);
const INT8_MASK: Param = p(
    ParamName::Int8Mask,
    Kind::Bool,
    Scope::Merge,
    Some(Default::Bool(false)),
    "accepted for mergekit compatibility; masks are always exact",
);
const LAMBDA: Param = p(
    ParamName::Lambda,
    Kind::Number,
    Scope::Merge,
    Some(Default::Number(1.0)),
    "scales the merged task vector",
);
const SEED: Param = p(
    ParamName::Seed,
    Kind::Seed,
    Scope::Merge,
    Some(Default::Number(0.0)),
    "seed of the random keep masks of DARE and DELLA (obim extension)",
);

/// The parameters of mergekit's generalized task arithmetic, with the
/// method's defaults of `normalize` and `rescale`.
const fn task_vectors(normalize_by_default: bool, rescale_by_default: bool) -> [Param; 7] {
    [
        BASE,
        WEIGHT,
        DENSITY,
        normalize(normalize_by_default),
        rescale(rescale_by_default),
        LAMBDA,
        INT8_MASK,
    ]
}

/// [`task_vectors`] followed by the method's own parameters (`M` = 7 + `N`,
/// checked when the table is built).
const fn task_vectors_and<const N: usize, const M: usize>(
    normalize_by_default: bool,
    rescale_by_default: bool,
    own: [Param; N],
) -> [Param; M] {
    assert!(M == 7 + N, "M must be 7 + N");
    let shared = task_vectors(normalize_by_default, rescale_by_default);
    let mut all = [BASE; M];
    let mut i = 0;
    while i < M {
        all[i] = if i < 7 { shared[i] } else { own[i - 7] };
        i += 1;
    }
    all
}

const fn normalize(default: bool) -> Param {
    p(
        ParamName::Normalize,
        Kind::Bool,
        Scope::Merge,
        Some(Default::Bool(default)),
        "divide by the sum of the weights",
    )
}
const fn rescale(default: bool) -> Param {
    p(
        ParamName::Rescale,
        Kind::Bool,
        Scope::Merge,
        Some(Default::Bool(default)),
        "restore the task vector's L1 norm after sparsifying",
    )
}

const fn gamma() -> Param {
    p(
        ParamName::Gamma,
        Kind::Unit,
        Scope::Input,
        Some(Default::Number(0.01)),
        "fraction of the largest |δ| dropped as outliers",
    )
}
const fn della_epsilon() -> Param {
    p(
        ParamName::Epsilon,
        Kind::Unit,
        Scope::Input,
        Some(Default::Number(0.15)),
        "keep probabilities spread over density ± epsilon by magnitude rank",
    )
}
const fn merge_number(key: ParamName, kind: Kind, default: f64, doc: &'static str) -> Param {
    p(key, kind, Scope::Merge, Some(Default::Number(default)), doc)
}
const fn merge_flag(key: ParamName, default: bool, doc: &'static str) -> Param {
    p(
        key,
        Kind::Bool,
        Scope::Merge,
        Some(Default::Bool(default)),
        doc,
    )
}
/// `base:` for the methods that work with or without one.
const OPTIONAL_BASE: Param = p(
    ParamName::Base,
    Kind::Model,
    Scope::Merge,
    Some(Default::Unset),
    "with a base, the method interpolates task vectors",
);
const RAM_EPSILON: Param = merge_number(
    ParamName::Epsilon,
    Kind::NonNegative,
    1e-5,
    "|δ| above which an input counts as changing a position",
);

impl Method {
    pub const ALL: &'static [Method] = &[
        Method::Obim,
        Method::TaskArithmetic,
        Method::Ties,
        Method::DareTies,
        Method::DareLinear,
        Method::Linear,
        Method::Slerp,
        Method::Breadcrumbs,
        Method::BreadcrumbsTies,
        Method::Della,
        Method::DellaLinear,
        Method::ModelStock,
        Method::Nuslerp,
        Method::Multislerp,
        Method::Karcher,
        Method::Sce,
        Method::ArceeFusion,
        Method::Nearswap,
        Method::Passthrough,
        Method::Ram,
        Method::RamplusTl,
        Method::Regmean,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::Obim => "obim",
            Method::TaskArithmetic => "task_arithmetic",
            Method::Ties => "ties",
            Method::DareTies => "dare_ties",
            Method::DareLinear => "dare_linear",
            Method::Linear => "linear",
            Method::Slerp => "slerp",
            Method::Breadcrumbs => "breadcrumbs",
            Method::BreadcrumbsTies => "breadcrumbs_ties",
            Method::Della => "della",
            Method::DellaLinear => "della_linear",
            Method::ModelStock => "model_stock",
            Method::Nuslerp => "nuslerp",
            Method::Multislerp => "multislerp",
            Method::Karcher => "karcher",
            Method::Sce => "sce",
            Method::ArceeFusion => "arcee_fusion",
            Method::Nearswap => "nearswap",
            Method::Passthrough => "passthrough",
            Method::Ram => "ram",
            Method::RamplusTl => "ramplus_tl",
            Method::Regmean => "regmean",
        }
    }

    pub fn from_name(name: &str) -> Option<Method> {
        Method::ALL.iter().copied().find(|m| m.name() == name)
    }

    /// Every parameter the method accepts, with mergekit's defaults.
    pub fn params(self) -> &'static [Param] {
        const OBIM: &[Param] = &[
            BASE,
            p(
                ParamName::Retain,
                Kind::Fraction,
                Scope::Input,
                None,
                "fraction of positions the input keeps (nₖ)",
            ),
            p(
                ParamName::Using,
                Kind::Data,
                Scope::Input,
                Some(Default::Unset),
                "calibration data for `obd` saliency",
            ),
            p(
                ParamName::Scale,
                Kind::Number,
                Scope::Merge,
                Some(Default::Number(1.0)),
                "multiplies the kept deltas (1.0: OBIM as published)",
            ),
        ];
        const TASK_ARITHMETIC: &[Param] = &task_vectors(false, false);
        const TIES: &[Param] = &task_vectors(true, false);
        const DARE: &[Param] = &task_vectors_and::<1, 8>(false, true, [SEED]);
        const BREADCRUMBS: &[Param] = &task_vectors_and::<1, 8>(false, false, [gamma()]);
        const DELLA: &[Param] = &task_vectors_and::<2, 9>(true, true, [della_epsilon(), SEED]);
        const DELLA_LINEAR: &[Param] =
            &task_vectors_and::<2, 9>(false, true, [della_epsilon(), SEED]);
        const LINEAR: &[Param] = &[WEIGHT, normalize(true)];
        const SLERP: &[Param] = &[
            BASE,
            p(
                ParamName::T,
                Kind::Unit,
                Scope::Merge,
                None,
                "interpolation factor from base (0) to the other model (1)",
            ),
        ];
        const MODEL_STOCK: &[Param] = &[
            BASE,
            merge_flag(
                ParamName::FilterWise,
                false,
                "one interpolation ratio per row instead of per tensor",
            ),
        ];
        const NUSLERP: &[Param] = &[
            OPTIONAL_BASE,
            WEIGHT,
            merge_flag(
                ParamName::NuslerpRowWise,
                false,
                "interpolate columns (vectors along the first axis) instead of rows",
            ),
            merge_flag(
                ParamName::NuslerpFlatten,
                true,
                "interpolate the whole tensor as one vector",
            ),
        ];
        const MULTISLERP: &[Param] = &[
            OPTIONAL_BASE,
            WEIGHT,
            merge_flag(
                ParamName::NormalizeWeights,
                true,
                "divide the weights by their sum",
            ),
            merge_number(
                ParamName::Eps,
                Kind::NonNegative,
                1e-8,
                "guards the divisions by norms",
            ),
        ];
        const KARCHER: &[Param] = &[
            merge_number(
                ParamName::MaxIter,
                Kind::Count,
                10.0,
                "iterations of the Karcher mean at most",
            ),
            merge_number(
                ParamName::Tol,
                Kind::NonNegative,
                1e-5,
                "stop when the tangent step is this small",
            ),
        ];
        const SCE: &[Param] = &[
            BASE,
            INT8_MASK,
            merge_number(
                ParamName::SelectTopk,
                Kind::Unit,
                1.0,
                "fraction of positions kept, by variance across the inputs",
            ),
        ];
        const ARCEE_FUSION: &[Param] = &[BASE];
        const NEARSWAP: &[Param] = &[
            BASE,
            p(
                ParamName::T,
                Kind::NonNegative,
                Scope::Merge,
                None,
                "distance under which the base takes the other model's value",
            ),
        ];
        const PASSTHROUGH: &[Param] = &[merge_number(
            ParamName::Scale,
            Kind::Number,
            1.0,
            "multiplies the input's tensors",
        )];
        const RAM: &[Param] = &[BASE, RAM_EPSILON];
        const RAMPLUS_TL: &[Param] = &[
            BASE,
            merge_number(
                ParamName::R,
                Kind::Number,
                0.1,
                "strength of the boost for inputs with much overlap",
            ),
            merge_number(
                ParamName::Alpha,
                Kind::Number,
                0.2,
                "cap of the overlap ratio",
            ),
            RAM_EPSILON,
        ];
        const REGMEAN: &[Param] = &[
            BASE,
            p(
                ParamName::Using,
                Kind::Data,
                Scope::Input,
                None,
                "the data whose layer inputs give the input's Gram matrices",
            ),
            merge_number(
                ParamName::Alpha,
                Kind::Unit,
                0.9,
                "scale of the Gram matrices' off-diagonal entries (0: diagonal RegMean)",
            ),
            merge_number(
                ParamName::Lambda,
                Kind::Number,
                1.0,
                "multiplies the merged task vector (1: RegMean as published)",
            ),
        ];
        match self {
            Method::Obim => OBIM,
            Method::TaskArithmetic => TASK_ARITHMETIC,
            Method::Ties => TIES,
            Method::DareTies | Method::DareLinear => DARE,
            Method::Linear => LINEAR,
            Method::Slerp => SLERP,
            Method::Breadcrumbs | Method::BreadcrumbsTies => BREADCRUMBS,
            Method::Della => DELLA,
            Method::DellaLinear => DELLA_LINEAR,
            Method::ModelStock => MODEL_STOCK,
            Method::Nuslerp => NUSLERP,
            Method::Multislerp => MULTISLERP,
            Method::Karcher => KARCHER,
            Method::Sce => SCE,
            Method::ArceeFusion => ARCEE_FUSION,
            Method::Nearswap => NEARSWAP,
            Method::Passthrough => PASSTHROUGH,
            Method::Ram => RAM,
            Method::RamplusTl => RAMPLUS_TL,
            Method::Regmean => REGMEAN,
        }
    }

    pub fn param(self, name: &str) -> Option<&'static Param> {
        self.params().iter().find(|p| p.name == name)
    }

    /// The method's default for a numeric parameter (the table above is the
    /// one place defaults are written); `None` when it has none.
    pub fn default_number(self, key: ParamName) -> Option<f64> {
        match self.params().iter().find(|p| p.key == key)?.default? {
            Default::Number(n) => Some(n),
            _ => None,
        }
    }

    /// The method's default for a boolean parameter.
    pub fn default_bool(self, key: ParamName) -> Option<bool> {
        match self.params().iter().find(|p| p.key == key)?.default? {
            Default::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// `order` and `saliency` statements belong to OBIM alone.
    pub fn has_order(self) -> bool {
        self == Method::Obim
    }

    /// Whether the method reads statistics of a forward pass on `using` data.
    pub fn calibrates(self) -> bool {
        matches!(self, Method::Obim | Method::Regmean)
    }

    /// Inputs besides the base: (min, max), mergekit's `InputContract`.
    pub fn input_count(self) -> (usize, Option<usize>) {
        match self {
            Method::Slerp | Method::ArceeFusion | Method::Nearswap | Method::Passthrough => {
                (1, Some(1))
            }
            Method::Nuslerp => (2, Some(2)),
            Method::ModelStock => (2, None),
            // One owner byte per position; 255 means unclaimed.
            Method::Obim => (1, Some(255)),
            _ => (1, None),
        }
    }

    /// [`Method::input_count`] in words: "exactly 1", "1 to 255", "at least 2".
    pub fn input_count_text(self) -> String {
        match self.input_count() {
            (min, Some(max)) if max == min => format!("exactly {max}"),
            (min, Some(max)) => format!("{min} to {max}"),
            (min, None) => format!("at least {min}"),
        }
    }

    /// mergekit's `density` has no effect without a sparsification step.
    pub fn sparsifies(self) -> bool {
        matches!(
            self,
            Method::Ties
                | Method::DareTies
                | Method::DareLinear
                | Method::Breadcrumbs
                | Method::BreadcrumbsTies
                | Method::Della
                | Method::DellaLinear
        )
    }

    /// Whether the method takes a `base:`, from the table above.
    pub fn base(self) -> BaseUse {
        match self.params().iter().find(|p| p.key == ParamName::Base) {
            Some(Param { default: None, .. }) => BaseUse::Required,
            Some(_) => BaseUse::Optional,
            None => BaseUse::None,
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
