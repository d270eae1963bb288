//! What `obim import` says about a mergekit config: every part it cannot
//! map, as data, worded in one place (codes E0040, W0007).

use crate::codes::Code;
use crate::diagnostic::Diagnostic;
use crate::methods::Method;
use crate::source::Span;

#[derive(Debug, Clone, PartialEq)]
pub enum ImportProblem {
    /// The file is not YAML (E0040).
    Yaml { span: Span, message: String },
    /// A document without `merge_method` (E0040).
    NoMethod { span: Span },
    /// A method obim does not have (E0040).
    UnknownMethod { span: Span, method: String },
    /// A `mergekit-moe` config (E0040).
    MoeConfig { span: Span },
    /// A `mergekit-evolve` config (E0040).
    EvolveConfig { span: Span },
    /// A key mergekit's schema does not have (E0040).
    UnknownKey { span: Span, key: String },
    /// A key obim has no form for yet (E0040).
    NotYet { span: Span, key: String },
    /// A parameter the method does not take (E0040).
    UnknownParam {
        span: Span,
        method: Method,
        key: String,
    },
    /// A merge-wide parameter given per model, with several models (E0040).
    PerModelMergeParam {
        span: Span,
        key: String,
        method: Method,
    },
    /// A model with different parameters in different slices (E0040).
    SliceParameters { span: Span, model: String },
    /// A LoRA reference (`model+adapter`) that is not one model and one adapter (E0040).
    Lora { span: Span },
    /// A `filter`/`value` pair after one that matches every tensor: mergekit
    /// never reaches it, so it is left out (W0007).
    NeverApplies { span: Span, key: String },
    /// A value obim cannot take (E0040).
    BadValue {
        span: Span,
        key: String,
        reason: String,
    },
}

impl ImportProblem {
    pub fn into_diagnostic(self) -> Diagnostic {
        let cannot = |span, message: String| Diagnostic::new(Code::E0040, span, message);
        match self {
            ImportProblem::Yaml { span, message } => {
                cannot(span, "not a YAML document obim can read".into()).label(message)
            }
            ImportProblem::NoMethod { span } => cannot(span, "no `merge_method`".into())
                .label("this document")
                .help("a mergekit config names its method: `merge_method: ties`"),
            ImportProblem::UnknownMethod { span, method } => {
                let known: Vec<&str> = Method::ALL.iter().map(|m| m.name()).collect();
                cannot(span, format!("obim has no merge method `{method}`"))
                    .label("not one of mergekit 0.1.5's methods")
                    .note(format!("methods: {}", known.join(", ")))
            }
            ImportProblem::MoeConfig { span } => cannot(
                span,
                "a mergekit-moe config: obim does not build mixtures of experts".into(),
            )
            .label("an MoE key")
            .help("keep mergekit-moe for this config"),
            ImportProblem::EvolveConfig { span } => cannot(
                span,
                "a mergekit-evolve config: obim does not run evolutionary searches".into(),
            )
            .label("an evolve key")
            .help("obim chooses settings with `auto` candidates and `select by loss(...)`"),
            ImportProblem::UnknownKey { span, key } => {
                cannot(span, format!("`{key}` is not a key of mergekit's config"))
                    .label("unknown key")
                    .help("mergekit-yaml's keys: merge_method, base_model, models, slices, parameters, dtype, out_dtype, tokenizer_source, tokenizer, chat_template, name")
            }
            ImportProblem::NotYet { span, key } => {
                cannot(span, format!("`{key}` has no `.obim` form yet"))
                    .label("not imported")
                    .help("remove it to import the rest, and keep mergekit for what it does")
            }
            ImportProblem::UnknownParam { span, method, key } => {
                let params: Vec<&str> = method.params().iter().map(|p| p.name).collect();
                cannot(span, format!("`{method}` has no parameter `{key}`"))
                    .label("mergekit would reject it too")
                    .note(format!("`{method}` takes: {}", params.join(", ")))
            }
            ImportProblem::PerModelMergeParam { span, key, method } => cannot(
                span,
                format!("`{key}` is one value for the whole `{method}` merge in obim"),
            )
            .label("given for one model of several")
            .help(format!("move `{key}` to the global `parameters`")),
            ImportProblem::SliceParameters { span, model } => cannot(
                span,
                format!("`{model}` has different parameters in different slices"),
            )
            .label("differs from its first slice")
            .help("obim gives each input one set of settings; split the merge into one per slice"),
            ImportProblem::Lora { span } => cannot(
                span,
                "a LoRA reference is `model+adapter`: one model, one adapter".into(),
            )
            .label("not of that form")
            .help("write one adapter on one model; obim applies it as `lora(\"adapter\", base: model)`"),
            ImportProblem::NeverApplies { span, key } => Diagnostic::new(
                Code::W0007,
                span,
                format!("this value of `{key}` never applies"),
            )
            .label("after a value without a filter")
            .help("mergekit takes the first pair that matches, and the one above matches every tensor; the recipe leaves this one out, as mergekit does")
            .note("move it above the catch-all to have it apply"),
            ImportProblem::BadValue { span, key, reason } => {
                cannot(span, format!("`{key}` cannot be imported")).label(reason)
            }
        }
    }
}
