//! The merge methods and their parameters: names, types, defaults and ranges
//! follow mergekit 0.1.5 (`merge_methods/registry.py`,
//! `generalized_task_arithmetic.py`, `linear.py`, `slerp.py`), plus obim's own
//! `obim` method and DARE's `seed`.

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    "seed of DARE's random keep mask (obim extension)",
);

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
        "rescale kept values by 1/density",
    )
}

impl Method {
    pub const ALL: &'static [Method] = &[
        Method::Obim,
        Method::TaskArithmetic,
        Method::Ties,
        Method::DareTies,
        Method::DareLinear,
        Method::Linear,
        Method::Slerp,
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
        const TASK_ARITHMETIC: &[Param] = &[
            BASE,
            WEIGHT,
            DENSITY,
            normalize(false),
            rescale(false),
            LAMBDA,
            INT8_MASK,
        ];
        const TIES: &[Param] = &[
            BASE,
            WEIGHT,
            DENSITY,
            normalize(true),
            rescale(false),
            LAMBDA,
            INT8_MASK,
        ];
        const DARE: &[Param] = &[
            BASE,
            WEIGHT,
            DENSITY,
            normalize(false),
            rescale(true),
            LAMBDA,
            INT8_MASK,
            SEED,
        ];
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
        match self {
            Method::Obim => OBIM,
            Method::TaskArithmetic => TASK_ARITHMETIC,
            Method::Ties => TIES,
            Method::DareTies | Method::DareLinear => DARE,
            Method::Linear => LINEAR,
            Method::Slerp => SLERP,
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

    /// Inputs besides the base: (min, max).
    pub fn input_count(self) -> (usize, Option<usize>) {
        match self {
            Method::Slerp => (1, Some(1)),
            _ => (1, None),
        }
    }

    /// mergekit's `density` has no effect without a sparsification step.
    pub fn sparsifies(self) -> bool {
        matches!(self, Method::Ties | Method::DareTies | Method::DareLinear)
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
