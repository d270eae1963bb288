//! The checker's problems as data, and the one place they become words.
//!
//! The checker reports a [`Problem`] carrying what it is about (spans, names,
//! numbers, candidate lists); [`Problem::into_diagnostic`] alone chooses the
//! code, the message, the labels, the notes and the help. Variants are grouped
//! by concern, each with the code it is reported under.

use super::DefKind;
use crate::codes::Code;
use crate::diagnostic::{Diagnostic, Label};
use crate::methods::{Kind, Method};
use crate::recipe::DataKind;
use crate::source::Span;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Problem {
    // Names and definitions.
    /// A name defined twice in one namespace of a module (E0003).
    DefinedTwice {
        span: Span,
        name: String,
        kind: DefKind,
        first: Span,
        first_kind: DefKind,
    },
    /// An import alias that is also a definition of the module (E0003).
    AliasDefinedTwice {
        span: Span,
        alias: String,
        definition: Span,
    },
    /// `m.x` where no import is called `m` (E0002).
    UnknownAlias {
        span: Span,
        alias: String,
        suggestion: Option<String>,
    },
    /// `m.x` where `m`'s module has no `x` (E0002); the suggestion is qualified.
    UnknownInModule {
        span: Span,
        name: String,
        file: String,
        suggestion: Option<String>,
    },
    /// An unqualified name that nothing defines (E0002).
    UnknownName {
        span: Span,
        name: String,
        suggestion: Option<String>,
    },
    /// `let` values that refer to each other, the first repeated at the end (E0014).
    LetCycle { span: Span, path: Vec<String> },
    /// Merges that depend on each other, the first repeated at the end (E0014).
    MergeCycle {
        span: Span,
        path: Vec<String>,
        /// The other merges of the cycle.
        members: Vec<Span>,
    },
    /// A definition of the root file nothing uses (W0001).
    Unused {
        span: Span,
        name: String,
        kind: DefKind,
    },
    /// An import of the root file nothing is used from (W0001).
    UnusedImport { span: Span },

    // Values and their types.
    /// A value of another type than the one expected (E0008).
    WrongType {
        span: Span,
        expected: &'static str,
        found: &'static str,
    },
    /// Something else where a model or merge is expected (E0004).
    NotAnInput { span: Span, found: &'static str },
    /// Something else where a data source is expected (E0004).
    NotData { span: Span, found: &'static str },
    /// A word outside a fixed set (`obd`, `bf16`, `jsonl`) (E0008).
    NotOneOf {
        span: Span,
        word: String,
        what: &'static str,
        allowed: &'static [&'static str],
        suggestion: Option<String>,
    },
    /// Not a word at all where one of a fixed set is expected (E0008).
    NotAWord {
        span: Span,
        what: &'static str,
        allowed: &'static [&'static str],
    },
    /// `auto` with no candidates to offer (E0031).
    InvalidAuto { span: Span, reason: InvalidAuto },
    /// A number outside its parameter's domain (E0009).
    OutOfRange {
        span: Span,
        name: String,
        kind: Kind,
        value: f64,
    },
    /// A gradient with an element that is not a number, or none (E0037).
    BadGradient {
        span: Span,
        name: String,
        /// What the element is; `None`: the list is empty.
        found: Option<&'static str>,
    },
    /// A `lora(...)` model that cannot be (E0041).
    BadLora { span: Span, issue: LoraIssue },
    /// A `slice` that cannot be built (E0039).
    BadSlice { span: Span, issue: SliceIssue },
    /// An output's tokenizer option that cannot be (E0043).
    BadTokenizerOption { span: Span, issue: TokenizerIssue },
    /// DELLA's density ± epsilon outside (0, 1) (E0038).
    DellaProbabilities {
        span: Span,
        input: String,
        density: f64,
        epsilon: f64,
    },
    /// `samples` or `seq_len` that is not a positive integer (E0009).
    NotPositiveInt { span: Span, key: String, value: f64 },
    /// A seed that is not a non-negative integer (E0009).
    BadSeed { span: Span, value: f64 },
    /// A `shard_size` that does not read as a size (E0008).
    NotASize { span: Span, text: String },
    /// A `layers` pattern that does not parse (E0018).
    BadPattern { span: Span, message: String },

    // Methods, stages and parameters.
    /// A merge's method names something that is not a method or stage (E0005).
    NotAMethod { span: Span, name: String },
    /// A merge's method names nothing known (E0005).
    UnknownMethod {
        span: Span,
        name: String,
        suggestion: Option<String>,
    },
    /// A stage whose merge instantiates the stage again (E0014).
    RecursiveStage { span: Span, stage: String },
    /// An argument the stage does not declare (E0006).
    UnknownStageParam {
        span: Span,
        stage: String,
        param: String,
        params: Span,
        suggestion: Option<String>,
    },
    /// Stage parameters given no argument (E0007).
    MissingStageArgs {
        span: Span,
        stage: String,
        missing: Vec<String>,
        params: Span,
    },
    /// A body on a merge that instantiates a stage (E0019).
    StageBody { span: Span, stage: Span },
    /// A stage whose method is not built in (E0005).
    StageMethodNotBuiltIn { span: Span, method: String },
    /// A parameter no method has (E0006).
    UnknownParam {
        span: Span,
        method: Method,
        key: String,
        suggestion: Option<String>,
    },
    /// A parameter of other methods, not of this one (E0019).
    OtherMethodsParam {
        span: Span,
        method: Method,
        key: String,
        used_by: Vec<Method>,
    },
    /// A `data` or `output` option that does not exist (E0006).
    UnknownOption {
        span: Span,
        key: String,
        what: &'static str,
        known: &'static [&'static str],
        suggestion: Option<String>,
    },
    /// `base` anywhere but the merge's parameter list (E0019).
    BaseNotInParams { span: Span },
    /// A merge-wide parameter written on one input (E0019).
    MergeWideSetting { span: Span, key: String },
    /// `add weight: 0.3`: a per-input key written as a parameter right after
    /// an input, which would set it for every input (E0035).
    ColonSetting {
        span: Span,
        input: String,
        key: String,
        value: String,
        entry: Span,
    },
    /// Weights that are legal but cannot be meant (W0006).
    OddWeights {
        span: Span,
        merge: String,
        method: Method,
        problem: WeightProblem,
        /// The inputs, labelled when the problem is the set of weights.
        inputs: Vec<Span>,
    },
    /// A required merge-wide parameter not given (E0007).
    MissingParam {
        span: Span,
        method: Method,
        param: &'static str,
        doc: &'static str,
    },
    /// A required per-input parameter not given for one input (E0007).
    MissingInputSetting {
        span: Span,
        input: String,
        param: &'static str,
    },

    // Inputs, `order` and `take`.
    /// A model listed twice as an input (E0010).
    InputTwice {
        span: Span,
        input: String,
        merge: String,
        first: Span,
    },
    /// The base listed as an input too (E0010).
    BaseAsInput {
        span: Span,
        input: String,
        merge: String,
        base: Option<Span>,
    },
    /// Fewer or more inputs than the method takes (E0020).
    InputCount {
        span: Span,
        merge: String,
        count: usize,
        method: Method,
    },
    /// `order`, `take` or a rule names a model that is not an input (E0027).
    NotAnInputOf {
        span: Span,
        name: String,
        merge: String,
        role: &'static str,
        merge_span: Span,
        inputs: Vec<String>,
    },
    /// `take base` in a merge without one (E0027).
    NoBase { span: Span, method: Method },
    /// An input listed twice in an order (E0012).
    OrderRepeats { span: Span, name: String },
    /// An order that leaves inputs out (E0012).
    OrderIncomplete { span: Span, missing: Vec<String> },

    // Statements out of place, settings without effect.
    /// `order`, `saliency` or `scale` in a merge that is not `obim` (E0019).
    ObimOnly {
        span: Span,
        what: &'static str,
        method: Method,
    },
    /// `select` inside a `layers` rule (E0019).
    SelectInRule { span: Span },
    /// `layers` inside a `layers` rule (E0019).
    NestedRule { span: Span },
    /// `field` on a `text` data source (E0019).
    FieldOnText { span: Span, kind: Span },
    /// `density` in a method that does not sparsify (W0003).
    DensityIgnored { span: Span, method: Method },
    /// `using` where every saliency is `magnitude` (W0003).
    UsingIgnored { span: Span, merge: String },
    /// A revision on a local model directory (W0003).
    RevisionIgnored { span: Span },

    // OBIM's calibration and retention budget.
    /// An input with `obd` saliency and no calibration data (E0011).
    NoCalibrationData { span: Span, input: String },
    /// Retention ratios that sum to more than 1 (E0013).
    RetentionOverBudget {
        /// The merge, or the rule under which the sum is over.
        span: Span,
        merge: String,
        /// The line of that rule, if it is one.
        rule_line: Option<usize>,
        /// The ratios that were summed, in input order.
        ratios: Vec<f64>,
        /// Where each input's ratio was written.
        kept: Vec<Kept>,
    },

    // Selection among `auto` candidates.
    /// `auto` candidates and no `select` to judge them (E0032).
    AutoWithoutSelect { span: Span, merge: String },
    /// A `select` with no `auto` to choose (W0004).
    SelectWithoutAuto { span: Span, merge: String },
    /// More candidates than the limit (E0033).
    TooManyCandidates {
        merge: String,
        count: usize,
        limit: usize,
        /// Each `auto` site: where, and how many values.
        sites: Vec<(Span, usize)>,
    },
    /// `select by` something other than `loss` (E0006).
    UnknownJudge { span: Span, judge: String },
    /// `search` with a strategy other than `coordinate` (E0006).
    UnknownSearch { span: Span, name: String },
    /// `select by loss()` without data (E0007).
    SelectWithoutData { span: Span, judge: String },

    // Data sources and outputs.
    /// A data source whose file (or glob) finds nothing (E0026).
    DataNotFound {
        span: Span,
        name: String,
        path: PathBuf,
        kind: DataKind,
    },
    /// An output of a model rather than a merge (E0004).
    OutputOfModel { span: Span, name: String },
    /// Two outputs in one directory, or one inside the other (E0017).
    OutputsShareDirectory {
        span: Span,
        path: PathBuf,
        other: Span,
    },
    /// An output over a model's directory (E0028).
    OutputOverModel {
        span: Span,
        model: String,
        model_span: Span,
    },
}

/// Why `auto` offers no candidates.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum InvalidAuto {
    /// `auto []`.
    Empty,
    /// A range whose step is 0 (or not finite).
    ZeroStep,
    /// A range whose step goes away from its end.
    NeverReaches { from: f64, to: f64, step: f64 },
    /// A range of more than 1000 values.
    TooMany { count: f64 },
}

/// What is wrong with a `lora(...)` model.
#[derive(Debug, Clone, PartialEq)]
pub enum LoraIssue {
    /// The adapter is not a local directory.
    NotLocal,
    /// The adapter's base is a merge.
    MergeBase,
    /// The adapter's base is itself a LoRA model.
    LoraBase,
    /// A LoRA model with calibration data.
    Calibrated,
}

/// What is wrong with an output's tokenizer options.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenizerIssue {
    /// `token` or `pad_to_multiple_of` without `tokenizer union | base | MODEL`.
    NoVocabulary { option: &'static str },
    /// The same token in two `token` lines.
    Repeated { token: String, first: Span },
    /// `from MODEL ID` with an ID that is no token id.
    BadId { value: f64 },
    /// A `chat_template` that is neither a known name nor a template.
    UnknownTemplate {
        text: String,
        suggestion: Option<String>,
    },
}

/// What is wrong with a `slice`.
#[derive(Debug, Clone, PartialEq)]
pub enum SliceIssue {
    /// Not whole numbers, or an empty range.
    BadRange { start: f64, end: f64 },
    /// Sources of one slice with different numbers of layers.
    Lengths {
        expected: usize,
        found: usize,
        first: Span,
    },
    /// More or fewer sources besides the base than the method takes.
    SourceCount { method: Method, count: usize },
    /// `slice` inside a `layers` rule.
    InRule,
    /// A model twice in one slice.
    Twice,
    /// A slice without the merge's base.
    NoBase,
    /// OBIM's statistics and order follow the inputs' own layers.
    Obim,
    /// `select` scores candidates with the inputs' layer count.
    Select { slice: Span },
}

/// What is odd about a merge's weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum WeightProblem {
    /// Every weight is 0.
    AllZero,
    /// The weights sum to 0 and the method divides by their sum.
    SumZero,
    /// One weight far outside what merges use.
    Huge(f64),
}

/// One input's retention ratio, where it was written, for E0013's labels.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Kept {
    pub span: Span,
    pub input: String,
    /// The ratio at the merge level.
    pub merge_level: Option<f64>,
    /// The ratio where the sum is over: under a rule, or the merge level.
    pub here: Option<f64>,
}

impl Problem {
    pub(super) fn into_diagnostic(self) -> Diagnostic {
        match self {
            Problem::DefinedTwice {
                span,
                name,
                kind,
                first,
                first_kind,
            } => Diagnostic::new(Code::E0003, span, format!("`{name}` is defined twice"))
                .label(format!("defined again here, as {}", kind.describe()))
                .with(first, format!("first defined here, as {}", first_kind.describe()))
                .help("models, merges, stages and `let`s share one namespace, data sources have their own"),
            Problem::AliasDefinedTwice {
                span,
                alias,
                definition,
            } => Diagnostic::new(Code::E0003, span, format!("`{alias}` is defined twice"))
                .label("used as an import alias here")
                .with(definition, "also defined here"),
            Problem::UnknownAlias {
                span,
                alias,
                suggestion,
            } => {
                let d = Diagnostic::new(Code::E0002, span, format!("no import named `{alias}`"))
                    .label("not an import alias");
                match suggestion {
                    Some(_) => d.suggest(suggestion.as_deref()),
                    None => d.help(format!(
                        "import the recipe first: `import \"./{alias}.obim\" as {alias}`"
                    )),
                }
            }
            Problem::UnknownInModule {
                span,
                name,
                file,
                suggestion,
            } => Diagnostic::new(
                Code::E0002,
                span,
                format!("`{name}` is not defined in `{file}`"),
            )
            .label("unknown name")
            .suggest(suggestion.as_deref()),
            Problem::UnknownName {
                span,
                name,
                suggestion,
            } => {
                let d = Diagnostic::new(Code::E0002, span, format!("unknown name `{name}`"))
                    .label("not defined");
                match suggestion {
                    Some(_) => d.suggest(suggestion.as_deref()),
                    None => d.help(
                        "define it with `model`, `data`, `merge` or `let`, or import a module that does",
                    ),
                }
            }
            Problem::LetCycle { span, path } => Diagnostic::new(
                Code::E0014,
                span,
                format!("`let` values refer to each other: {}", path.join(" → ")),
            )
            .label("this value depends on itself")
            .help("give one of the values a literal"),
            Problem::MergeCycle {
                span,
                path,
                members,
            } => {
                let mut d = Diagnostic::new(
                    Code::E0014,
                    span,
                    format!("merges depend on each other: {}", path.join(" → ")),
                )
                .label("this merge depends on itself")
                .help("a merge can only use merges that do not use it");
                for m in members {
                    d = d.with(m, "part of the cycle");
                }
                d
            }
            Problem::Unused { span, name, kind } => Diagnostic::new(
                Code::W0001,
                span,
                format!("{} `{name}` is never used", kind.describe()),
            )
            .label("defined here")
            .help(match kind {
                DefKind::Merge(_) => {
                    "add an `output`, use it in another merge, or remove it (prefix `_` to keep it silently)"
                }
                _ => "remove it, or prefix the name with `_` to keep it silently",
            }),
            Problem::UnusedImport { span } => {
                Diagnostic::new(Code::W0001, span, "nothing from this import is used")
                    .label("unused import")
                    .help("remove the import")
            }

            Problem::WrongType {
                span,
                expected,
                found,
            } => Diagnostic::new(
                Code::E0008,
                span,
                format!("expected {expected}, found {found}"),
            )
            .label(format!("this is {found}")),
            Problem::NotAnInput { span, found } => Diagnostic::new(
                Code::E0004,
                span,
                format!("expected a model or merge, found {found}"),
            )
            .label(format!("this is {found}"))
            .help("merge inputs, `base:`, `order` and `take` name models or merges"),
            Problem::NotData { span, found } => Diagnostic::new(
                Code::E0004,
                span,
                format!("expected a data source, found {found}"),
            )
            .label(format!("this is {found}"))
            .help("`using` names a `data` source: `data gsm8k = jsonl(\"gsm8k.jsonl\")`"),
            Problem::NotOneOf {
                span,
                word,
                what,
                allowed,
                suggestion,
            } => Diagnostic::new(Code::E0008, span, format!("`{word}` is not {what}"))
                .label(format!("expected {}", or_list(allowed)))
                .suggest(suggestion.as_deref()),
            Problem::NotAWord {
                span,
                what,
                allowed,
            } => Diagnostic::new(Code::E0008, span, format!("expected {what}"))
                .label(format!("expected {}", or_list(allowed))),
            Problem::InvalidAuto { span, reason } => {
                let (label, help) = match reason {
                    InvalidAuto::Empty => (
                        "no candidates".to_string(),
                        "give at least one value: `auto [0.3, 0.5]`",
                    ),
                    InvalidAuto::ZeroStep => (
                        "a step of 0".to_string(),
                        "the step must move from the first value towards the last",
                    ),
                    InvalidAuto::NeverReaches { from, to, step } => (
                        format!("from {from}, step {step} never reaches {to}"),
                        "the step's sign must go from the first value towards the last",
                    ),
                    InvalidAuto::TooMany { count } => {
                        (format!("{count} candidates"), "use a larger step")
                    }
                };
                Diagnostic::new(Code::E0031, span, "invalid `auto` candidates")
                    .label(label)
                    .help(help)
            }
            Problem::BadGradient { span, name, found } => {
                let (message, label) = match found {
                    Some(found) => (
                        format!("a gradient for `{name}` is a list of numbers"),
                        format!("found {found}"),
                    ),
                    None => (
                        format!("the gradient for `{name}` is empty"),
                        "no values".to_string(),
                    ),
                };
                Diagnostic::new(Code::E0037, span, message).label(label).help(format!(
                    "`{name}: [0, 0.5, 1]` goes from 0 at the first layer to 1 at the last; `{name}: auto [0.3, 0.5]` gives candidates for `select` instead"
                ))
            }
            Problem::BadLora { span, issue } => {
                let d = |message: &str| Diagnostic::new(Code::E0041, span, message.to_string());
                match issue {
                    LoraIssue::NotLocal => d("a LoRA adapter must be a local directory")
                        .label("not found here")
                        .help("download the adapter (adapter_config.json and adapter_model.safetensors) and give its directory, relative to the recipe"),
                    LoraIssue::MergeBase => d("a LoRA adapter applies to a model, not to a merge")
                        .label("a merge")
                        .help("declare the checkpoint the adapter was trained on: `model llama = \"...\"`, then `lora(\"./adapter\", base: llama)`"),
                    LoraIssue::LoraBase => d("a LoRA adapter's base cannot be another LoRA model")
                        .label("a LoRA model")
                        .help("merge the first adapter into its base, or give the adapter the checkpoint it was trained on"),
                    LoraIssue::Calibrated => d("a LoRA model cannot be calibrated yet")
                        .label("`using` data on a LoRA input")
                        .help("use `saliency magnitude` for this merge, or merge the adapter into its base first"),
                }
            }
            Problem::BadTokenizerOption { span, issue } => {
                let d = |message: String| Diagnostic::new(Code::E0043, span, message);
                match issue {
                    TokenizerIssue::NoVocabulary { option } => {
                        d(format!("`{option}` needs an output vocabulary"))
                            .label("no `tokenizer union`, `base` or model in this output")
                            .help("add `tokenizer union` (what mergekit's `tokenizer:` block uses by default), `tokenizer base` or `tokenizer MODEL`")
                    }
                    TokenizerIssue::Repeated { token, first } => {
                        d(format!("token {token:?} is given twice"))
                            .label("again here")
                            .with(first, "first here")
                            .help("keep one `token` line per token")
                    }
                    TokenizerIssue::BadId { value } => {
                        d(format!("`{value}` is not a token id"))
                            .label("expected a whole number from 0")
                            .help("give the id of a token in that model's tokenizer, or the token's text in quotes")
                    }
                    TokenizerIssue::UnknownTemplate { text, suggestion } => {
                        let diagnostic = d(format!("`{text}` is neither a chat template name nor a template"))
                            .label(format!(
                                "known names: `auto`, {}",
                                crate::vocab::CHAT_TEMPLATES
                                    .iter()
                                    .map(|(n, _)| format!("`{n}`"))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ));
                        match suggestion {
                            Some(s) => diagnostic.help(format!("did you mean `{s}`?")),
                            None => diagnostic.help("a template is Jinja text with `{{ ... }}` or `{% ... %}`, as `tokenizer_config.json`'s `chat_template`"),
                        }
                    }
                }
            }
            Problem::BadSlice { span, issue } => {
                let d = |message: String| Diagnostic::new(Code::E0039, span, message);
                match issue {
                    SliceIssue::BadRange { start, end } => d(format!(
                        "`[{start}, {end}]` is not a range of layers"
                    ))
                    .label("here")
                    .help("a slice source is `MODEL layers [FROM, TO]`: whole numbers, FROM < TO, TO excluded as in mergekit's `layer_range`"),
                    SliceIssue::Lengths {
                        expected,
                        found,
                        first,
                    } => d(format!(
                        "the sources of a slice must have the same number of layers: {expected} and {found}"
                    ))
                    .label(format!("{found} layers"))
                    .with(first, format!("{expected} layers"))
                    .help("each output layer of a slice merges one layer from every source"),
                    SliceIssue::SourceCount { method, count } => {
                        let expected = method.input_count_text();
                        d(format!(
                            "this slice has {count} source{} besides the base; `{method}` needs {expected}",
                            if count == 1 { "" } else { "s" }
                        ))
                        .label("here")
                        .help("`passthrough` stacks one source per slice: `slice a layers [0, 4]`; merging methods take several: `slice a layers [0, 4], b layers [0, 4]`")
                    }
                    SliceIssue::Twice => d("a model appears twice in this slice".into())
                        .label("again")
                        .help("each source of a slice is a different model, as in mergekit"),
                    SliceIssue::NoBase => d("this slice does not include the merge's base".into())
                        .label("no base among the sources")
                        .help("the base's layers must be a source of every slice, as mergekit requires: `slice base layers [0, 4], other layers [0, 4]`"),
                    SliceIssue::InRule => d("`slice` belongs to the merge, not to a `layers` rule".into())
                        .label("here")
                        .help("write the slices in the merge body; rules then apply to the output's tensors"),
                    SliceIssue::Select { slice } => d("a merge with slices cannot choose its settings yet".into())
                        .label("`select` here")
                        .with(slice, "slices here")
                        .help("choose the settings on an unstacked merge, then stack its output with `passthrough` in another merge"),
                    SliceIssue::Obim => d("`obim` cannot stack slices yet".into())
                        .label("here")
                        .help("OBIM's calibration statistics and rotating order follow each input's own layers; stack with `passthrough` in one merge and run `obim` on its output in another"),
                }
            }
            Problem::DellaProbabilities {
                span,
                input,
                density,
                epsilon,
            } => Diagnostic::new(
                Code::E0038,
                span,
                format!("`{input}`: density ± epsilon must lie within (0, 1) for della"),
            )
            .label(format!(
                "density {density} with epsilon {epsilon} gives keep probabilities from {:.3} to {:.3}",
                density - epsilon,
                density + epsilon
            ))
            .help("lower `epsilon` (default 0.15), or move the density away from 0 and 1"),
            Problem::OutOfRange {
                span,
                name,
                kind,
                value,
            } => {
                let help = match name.as_str() {
                    "retain" => Some("retain is the fraction of a tensor's positions the input keeps"),
                    "density" => Some("density is the fraction of the task vector kept"),
                    "t" => Some("t = 0 gives the base, t = 1 the other model"),
                    _ => None,
                };
                let d = Diagnostic::new(
                    Code::E0009,
                    span,
                    format!("`{name}` must be {}", kind.describe()),
                )
                .label(format!("{value} is out of range"));
                match help {
                    Some(h) => d.help(h),
                    None => d,
                }
            }
            Problem::NotPositiveInt { span, key, value } => Diagnostic::new(
                Code::E0009,
                span,
                format!("`{key}` must be a positive integer"),
            )
            .label(format!("{value} is not a positive integer")),
            Problem::BadSeed { span, value } => {
                Diagnostic::new(Code::E0009, span, "a seed must be a non-negative integer")
                    .label(format!("{value} is not a non-negative integer"))
            }
            Problem::NotASize { span, text } => {
                Diagnostic::new(Code::E0008, span, format!("`{text}` is not a size"))
                    .label("expected a size such as \"5GB\", \"500MiB\" or \"1000000\"")
            }
            Problem::BadPattern { span, message } => Diagnostic::new(
                Code::E0018,
                span,
                format!("invalid layer pattern: {message}"),
            )
            .label(message)
            .help("patterns use `*`, `?`, `{a..b}` (inclusive) and `{x,y}`"),

            Problem::NotAMethod { span, name } => Diagnostic::new(
                Code::E0005,
                span,
                format!("`{name}` is not a merge method"),
            )
            .label("not a method or stage")
            .help(format!("methods: {}", method_names())),
            Problem::UnknownMethod {
                span,
                name,
                suggestion,
            } => Diagnostic::new(
                Code::E0005,
                span,
                format!("unknown merge method `{name}`"),
            )
            .label("not a method or stage")
            .note(format!("methods: {}", method_names()))
            .suggest(suggestion.as_deref()),
            Problem::RecursiveStage { span, stage } => Diagnostic::new(
                Code::E0014,
                span,
                format!("stage `{stage}` instantiates itself"),
            )
            .label("recursive stage"),
            Problem::UnknownStageParam {
                span,
                stage,
                param,
                params,
                suggestion,
            } => Diagnostic::new(
                Code::E0006,
                span,
                format!("stage `{stage}` has no parameter `{param}`"),
            )
            .label("unknown parameter")
            .with(params, "the stage's parameters")
            .suggest(suggestion.as_deref()),
            Problem::MissingStageArgs {
                span,
                stage,
                missing,
                params,
            } => {
                let list = missing
                    .iter()
                    .map(|m| format!("`{m}: ...`"))
                    .collect::<Vec<_>>()
                    .join(", ");
                Diagnostic::new(Code::E0007, span, format!("stage `{stage}` needs {list}"))
                    .label("missing arguments")
                    .with(params, "declared here")
                    .help("pass every parameter of the stage by name")
            }
            Problem::StageBody { span, stage } => Diagnostic::new(
                Code::E0019,
                span,
                "a stage's merge body is fixed by the stage",
            )
            .label("remove this body")
            .with(stage, "the stage defines the body"),
            Problem::StageMethodNotBuiltIn { span, method } => Diagnostic::new(
                Code::E0005,
                span,
                format!("a stage's method must be built in, not `{method}`"),
            )
            .label("not a built-in method")
            .note(format!("methods: {}", method_names())),
            Problem::UnknownParam {
                span,
                method,
                key,
                suggestion,
            } => Diagnostic::new(
                Code::E0006,
                span,
                format!("`{method}` has no parameter `{key}`"),
            )
            .label("unknown parameter")
            .note(format!("`{method}` takes: {}", param_names(method)))
            .suggest(suggestion.as_deref()),
            Problem::OtherMethodsParam {
                span,
                method,
                key,
                used_by,
            } => {
                let used_by: Vec<&str> = used_by.iter().map(|m| m.name()).collect();
                Diagnostic::new(
                    Code::E0019,
                    span,
                    format!("`{method}` does not use `{key}`"),
                )
                .label(format!(
                    "`{key}` is a parameter of {}",
                    used_by.join(", ")
                ))
                .note(format!("`{method}` takes: {}", param_names(method)))
            }
            Problem::UnknownOption {
                span,
                key,
                what,
                known,
                suggestion,
            } => {
                let d = Diagnostic::new(Code::E0006, span, format!("unknown {what} `{key}`"))
                    .label(format!("not {} {what}", article(what)))
                    .note(format!("known: {}", known.join(", ")));
                match key.as_str() {
                    // mergekit's key for what obim does not do yet: say what it does.
                    "tokenizer_source" => d.help(
                        "obim does not build merged vocabularies yet; `tokenizer MODEL` copies one input's tokenizer (default: the base's)",
                    ),
                    _ => d.suggest(suggestion.as_deref()),
                }
            }
            Problem::BaseNotInParams { span } => Diagnostic::new(
                Code::E0019,
                span,
                "`base` belongs in the merge's parameter list",
            )
            .label("not allowed here")
            .help("write it as `METHOD(base: MODEL)`"),
            Problem::MergeWideSetting { span, key } => Diagnostic::new(
                Code::E0019,
                span,
                format!("`{key}` is set for the whole merge, not per input"),
            )
            .label("not a per-input setting")
            .help(format!("write `{key}: ...` in the parameter list")),
            Problem::ColonSetting {
                span,
                input,
                key,
                value,
                entry,
            } => Diagnostic::new(
                Code::E0035,
                span,
                format!("`{key}: {value}` after `{input}` would set `{key}` for every input"),
            )
            .label(format!("`{key}:` with a colon is a parameter of the whole merge"))
            .with(entry, format!("the input `{input}`"))
            .help(format!(
                "write `{input} {key} {value}` (no colon) for this input, or put `{key}: {value}` on a line of its own for every input"
            )),
            Problem::OddWeights {
                span,
                merge,
                method,
                problem,
                inputs,
            } => {
                let (message, label, help) = match problem {
                    WeightProblem::AllZero => (
                        format!("every weight of `{merge}` is 0"),
                        "nothing of any input is merged".to_string(),
                        match method {
                            Method::Linear => "the output would be all zeros; give the inputs weights",
                            _ => "the output would be the base; give the inputs weights",
                        },
                    ),
                    WeightProblem::SumZero if method == Method::Multislerp => (
                        format!("the weights of `{merge}` sum to 0"),
                        "`normalize_weights` divides by the sum of the weights".to_string(),
                        "every merged value would be NaN (mergekit's too); set `normalize_weights: false`, or fix the weights",
                    ),
                    WeightProblem::SumZero => (
                        format!("the weights of `{merge}` sum to 0"),
                        "`normalize` divides by the sum of the weights".to_string(),
                        "a sum of 0 is replaced by 1 (mergekit's rule), so the weights are used as they are; set `normalize: false` to say so, or fix the weights",
                    ),
                    WeightProblem::Huge(w) => (
                        format!("weight {w} in `{merge}` is far outside what merges use"),
                        format!("{w}"),
                        "weights are usually between -1 and 2; was a decimal point lost?",
                    ),
                };
                let mut d = Diagnostic::new(Code::W0006, span, message)
                    .label(label)
                    .help(help);
                for input in inputs {
                    d = d.with(input, "weighted here");
                }
                d
            }
            Problem::MissingParam {
                span,
                method,
                param,
                doc,
            } => Diagnostic::new(Code::E0007, span, format!("`{method}` needs `{param}:`"))
                .label(format!("no `{param}` given"))
                .help(format!("add `{param}: ...` to the parameter list ({doc})")),
            Problem::MissingInputSetting { span, input, param } => Diagnostic::new(
                Code::E0007,
                span,
                format!("input `{input}` has no `{param}`"),
            )
            .label(format!("needs a {param}"))
            .help(format!(
                "write `{input} {param} ...`, or `{param}: ...` in the parameter list for every input"
            )),

            Problem::InputTwice {
                span,
                input,
                merge,
                first,
            } => Diagnostic::new(
                Code::E0010,
                span,
                format!("`{input}` is an input of `{merge}` twice"),
            )
            .label("listed again here")
            .with(first, "first listed here")
            .help("list each input once"),
            Problem::BaseAsInput {
                span,
                input,
                merge,
                base,
            } => {
                let mut d = Diagnostic::new(
                    Code::E0010,
                    span,
                    format!("`{input}` is both the base and an input of `{merge}`"),
                )
                .label("listed as an input");
                if let Some(s) = base {
                    d = d.with(s, "the base");
                }
                d.help("the base's task vector is zero; remove it from the inputs")
            }
            Problem::InputCount {
                span,
                merge,
                count,
                method,
            } => {
                let expected = method.input_count_text();
                let plural = if count == 1 { "" } else { "s" };
                Diagnostic::new(
                    Code::E0020,
                    span,
                    format!("`{merge}` has {count} input{plural}; `{method}` needs {expected}"),
                )
                .label("here")
                .help(match method {
                    Method::Slerp => {
                        "slerp interpolates between its `base:` and one other model: `slerp(base: a, t: 0.5) { b }`"
                    }
                    _ => "list the input models in the merge body: `{ math weight 1.0 }`",
                })
            }
            Problem::NotAnInputOf {
                span,
                name,
                merge,
                role,
                merge_span,
                inputs,
            } => Diagnostic::new(
                Code::E0027,
                span,
                format!("`{name}` is not an input of `{merge}`"),
            )
            .label(format!("{role} names a model outside the merge"))
            .with(merge_span, format!("inputs: {}", inputs.join(", "))),
            Problem::NoBase { span, method } => {
                Diagnostic::new(Code::E0027, span, format!("`{method}` has no base"))
                    .label("nothing to take")
                    .help("take one of the inputs instead")
            }
            Problem::OrderRepeats { span, name } => Diagnostic::new(
                Code::E0012,
                span,
                format!("`{name}` appears twice in the order"),
            )
            .label("listed again"),
            Problem::OrderIncomplete { span, missing } => {
                let missing: Vec<String> = missing.iter().map(|m| format!("`{m}`")).collect();
                Diagnostic::new(
                    Code::E0012,
                    span,
                    format!("the order leaves out {}", missing.join(", ")),
                )
                .label("incomplete order")
                .help("an order lists every input of the merge once")
            }

            Problem::ObimOnly { span, what, method } => Diagnostic::new(
                Code::E0019,
                span,
                format!("`{what}` applies to `obim` merges only"),
            )
            .label(format!("`{method}` has no {what}"))
            .help("remove it, or use `obim`"),
            Problem::SelectInRule { span } => {
                Diagnostic::new(Code::E0019, span, "`select` belongs to the whole merge")
                    .label("inside a `layers` rule")
                    .help("move it to the merge's body")
            }
            Problem::NestedRule { span } => {
                Diagnostic::new(Code::E0019, span, "`layers` rules cannot be nested")
                    .label("nested rule")
                    .help("write a separate rule with a narrower pattern after this one; later rules win")
            }
            Problem::FieldOnText { span, kind } => {
                Diagnostic::new(Code::E0019, span, "`field` applies to `jsonl` data only")
                    .label("`text` sources read whole files")
                    .with(kind, "this source is `text`")
            }
            Problem::DensityIgnored { span, method } => Diagnostic::new(
                Code::W0003,
                span,
                format!("`density` has no effect in `{method}`"),
            )
            .label("ignored")
            .help("`ties`, `dare_ties` and `dare_linear` sparsify task vectors; `task_arithmetic` adds them whole"),
            Problem::UsingIgnored { span, merge } => Diagnostic::new(
                Code::W0003,
                span,
                format!("`using` has no effect: `{merge}` uses `magnitude` saliency everywhere"),
            )
            .label("calibration data not needed"),
            Problem::RevisionIgnored { span } => Diagnostic::new(
                Code::W0003,
                span,
                "a revision has no effect on a local directory",
            )
            .label("ignored")
            .help("revisions select a branch, tag or commit of a Hugging Face repository"),

            Problem::NoCalibrationData { span, input } => Diagnostic::new(
                Code::E0011,
                span,
                format!("input `{input}` has no calibration data for `obd` saliency"),
            )
            .label("no `using DATA`")
            .help(format!(
                "add `using DATA` (the expert's own data): `{input} retain ... using DATA`, or set `saliency magnitude`"
            )),
            Problem::RetentionOverBudget {
                span,
                merge,
                rule_line,
                ratios,
                kept,
            } => {
                let sum = round(ratios.iter().sum());
                let parts: Vec<String> = ratios.iter().map(|r| format!("{r}")).collect();
                let where_ = rule_line.map_or(String::new(), |line| {
                    format!(" for tensors matching the rule on line {line}")
                });
                let mut d = Diagnostic::new(
                    Code::E0013,
                    span,
                    format!("retention ratios of `{merge}` sum to {sum} > 1{where_}"),
                )
                .label(format!("{} = {sum}", parts.join(" + ")));
                let show = |r: Option<f64>| r.map_or_else(String::new, |r| format!("{r}"));
                // An input that sets no ratio here adds nothing: no label.
                for k in kept.into_iter().filter(|k| k.here.is_some()) {
                    let label = if k.here == k.merge_level {
                        format!("`{}` keeps {}", k.input, show(k.here))
                    } else {
                        format!(
                            "`{}` keeps {}, {} under this rule",
                            k.input,
                            show(k.merge_level),
                            show(k.here)
                        )
                    };
                    d = d.with(k.span, label);
                }
                d.note("OBIM gives each position to one input, in order: with Σ retain > 1 the last inputs get fewer positions than asked, or none; the paper reports a catastrophic drop here")
                    .help("lower the ratios so that they sum to at most 1 (the paper uses 0.40 + 0.45 + 0.10)")
            }

            Problem::AutoWithoutSelect { span, merge } => Diagnostic::new(
                Code::E0032,
                span,
                format!("`{merge}` has `auto` candidates but no `select`"),
            )
            .label("candidates with no judge")
            .help("add `select by loss(DATA, ...)` to the merge, naming held-out data sources"),
            Problem::SelectWithoutAuto { span, merge } => Diagnostic::new(
                Code::W0004,
                span,
                format!("`{merge}` has a `select` but nothing to choose"),
            )
            .label("no `auto` setting in this merge")
            .help("give a setting candidates, e.g. `retain auto [0.2, 0.3]`, or remove the `select`"),
            Problem::TooManyCandidates {
                merge,
                count,
                limit,
                sites,
            } => {
                let mut sites = sites.into_iter();
                let (span, values) = sites.next().unwrap_or_default();
                let mut d = Diagnostic::new(
                    Code::E0033,
                    span,
                    format!("`{merge}` has {count} candidates, more than {limit}"),
                )
                .label(format!("{values} values"));
                for (span, values) in sites {
                    d = d.with(span, format!("× {values} values"));
                }
                d.help("each candidate is a merge scored on the selection data; use fewer values, or raise the limit with `--max-candidates N`")
            }
            Problem::UnknownSearch { span, name } => {
                Diagnostic::new(Code::E0006, span, format!("unknown search `{name}`"))
                    .label("not a search strategy")
                    .help("`search coordinate budget N`: one `auto` setting at a time, over its values, while the judge improves, at most N candidates")
            }
            Problem::UnknownJudge { span, judge } => {
                Diagnostic::new(Code::E0006, span, format!("unknown judge `{judge}`"))
                    .label("not a judge")
                    .help("candidates are judged by `loss(DATA, ...)`, the mean next-token loss on held-out data (of the answers, for prompt/answer data), or by `accuracy(DATA, ...)`, greedy exact match on prompt/answer data")
            }
            Problem::SelectWithoutData { span, judge } => {
                Diagnostic::new(Code::E0007, span, format!("`select by {judge}()` names no data"))
                    .label("no data sources")
                    .help(format!("name held-out `data` sources: `select by {judge}(val_a, val_b)`"))
            }

            Problem::DataNotFound {
                span,
                name,
                path,
                kind,
            } => {
                let what = match kind {
                    DataKind::Text => "no file matches",
                    DataKind::Jsonl => "no such file",
                };
                Diagnostic::new(
                    Code::E0026,
                    span,
                    format!(
                        "data source `{name}` not found: {what} `{}`",
                        path.display()
                    ),
                )
                .label(what)
                .help("paths and globs are relative to the recipe's directory")
            }
            Problem::OutputOfModel { span, name } => Diagnostic::new(
                Code::E0004,
                span,
                format!("`{name}` is a model, not a merge"),
            )
            .label("an output writes the result of a merge")
            .help("a model directory is already a checkpoint; merge it to write a new one"),
            Problem::OutputsShareDirectory { span, path, other } => Diagnostic::new(
                Code::E0017,
                span,
                "two outputs write to the same directory",
            )
            .label(format!("`{}`", path.display()))
            .with(other, "this output writes there too")
            .help("give every output its own directory"),
            Problem::OutputOverModel {
                span,
                model,
                model_span,
            } => Diagnostic::new(
                Code::E0028,
                span,
                format!("this output would overwrite model `{model}`"),
            )
            .label("output directory")
            .with(model_span, "the model's directory")
            .help("write the output to a directory of its own"),
        }
    }
}

/// The label a problem inside a stage gets at the merge that uses the stage.
pub(super) fn in_stage_use(span: Span, stage: &str) -> Label {
    Label {
        span,
        message: format!("in this use of stage `{stage}`"),
    }
}

/// `` `a`, `b` or `c` ``.
fn or_list(words: &[&str]) -> String {
    let quoted: Vec<String> = words.iter().map(|w| format!("`{w}`")).collect();
    match quoted.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

fn method_names() -> String {
    Method::ALL
        .iter()
        .map(|m| m.name())
        .collect::<Vec<_>>()
        .join(", ")
}

fn param_names(method: Method) -> String {
    method
        .params()
        .iter()
        .map(|p| p.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Sums print rounded to 6 decimals, so float noise does not show.
fn round(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

/// `a` or `an` before `word`.
fn article(word: &str) -> &'static str {
    match word.chars().next() {
        Some('a' | 'e' | 'i' | 'o' | 'u') => "an",
        _ => "a",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnostic::Severity;
    use crate::recipe::MergeId;
    use crate::source::FileId;

    fn at(start: usize) -> Span {
        Span::new(FileId(0), start, start + 1)
    }

    fn secondary(d: &Diagnostic) -> Vec<(u32, &str)> {
        d.secondary
            .iter()
            .map(|l| (l.span.start, l.message.as_str()))
            .collect()
    }

    #[test]
    fn unknown_name_suggests_or_says_how_to_define_it() {
        let problem = |suggestion: Option<&str>| {
            Problem::UnknownName {
                span: at(3),
                name: "mth".into(),
                suggestion: suggestion.map(String::from),
            }
            .into_diagnostic()
        };
        let d = problem(Some("math"));
        assert_eq!(d.code, Code::E0002);
        assert_eq!(d.message, "unknown name `mth`");
        assert_eq!(d.primary.span, at(3));
        assert_eq!(d.primary.message, "not defined");
        assert_eq!(d.help.as_deref(), Some("did you mean `math`?"));
        let d = problem(None);
        assert_eq!(
            d.help.as_deref(),
            Some("define it with `model`, `data`, `merge` or `let`, or import a module that does")
        );
    }

    #[test]
    fn unknown_alias_without_suggestion_shows_the_import() {
        let d = Problem::UnknownAlias {
            span: at(0),
            alias: "lib".into(),
            suggestion: None,
        }
        .into_diagnostic();
        assert_eq!(
            d.help.as_deref(),
            Some("import the recipe first: `import \"./lib.obim\" as lib`")
        );
    }

    #[test]
    fn input_count_says_exactly_a_range_or_at_least() {
        let message = |count, method| {
            Problem::InputCount {
                span: at(0),
                merge: "m".into(),
                count,
                method,
            }
            .into_diagnostic()
            .message
        };
        assert_eq!(
            message(2, Method::Slerp),
            "`m` has 2 inputs; `slerp` needs exactly 1"
        );
        assert_eq!(
            message(0, Method::Ties),
            "`m` has 0 inputs; `ties` needs at least 1"
        );
        assert_eq!(
            message(1, Method::Slerp),
            "`m` has 1 input; `slerp` needs exactly 1"
        );
        assert_eq!(
            message(256, Method::Obim),
            "`m` has 256 inputs; `obim` needs 1 to 255"
        );
    }

    #[test]
    fn retention_labels_say_what_a_rule_changed() {
        let d = Problem::RetentionOverBudget {
            span: at(40),
            merge: "m".into(),
            rule_line: Some(7),
            ratios: vec![0.5, 0.7],
            kept: vec![
                Kept {
                    span: at(10),
                    input: "a".into(),
                    merge_level: Some(0.5),
                    here: Some(0.5),
                },
                Kept {
                    span: at(20),
                    input: "b".into(),
                    merge_level: Some(0.3),
                    here: Some(0.7),
                },
            ],
        }
        .into_diagnostic();
        assert_eq!(d.code, Code::E0013);
        assert_eq!(
            d.message,
            "retention ratios of `m` sum to 1.2 > 1 for tensors matching the rule on line 7"
        );
        assert_eq!(d.primary.message, "0.5 + 0.7 = 1.2");
        assert_eq!(
            secondary(&d),
            [
                (10, "`a` keeps 0.5"),
                (20, "`b` keeps 0.3, 0.7 under this rule")
            ]
        );
        assert_eq!(d.notes.len(), 1);
    }

    #[test]
    fn an_input_without_a_ratio_gets_no_empty_label() {
        let d = Problem::RetentionOverBudget {
            span: at(40),
            merge: "m".into(),
            rule_line: None,
            ratios: vec![0.6, 0.6],
            kept: vec![
                Kept {
                    span: at(10),
                    input: "a".into(),
                    merge_level: Some(0.6),
                    here: Some(0.6),
                },
                Kept {
                    span: at(20),
                    input: "sort".into(),
                    merge_level: None,
                    here: None,
                },
            ],
        }
        .into_diagnostic();
        assert_eq!(secondary(&d), [(10, "`a` keeps 0.6")]);
    }

    #[test]
    fn range_help_speaks_of_the_setting_itself() {
        let out = |name: &str| {
            Problem::OutOfRange {
                span: at(1),
                name: name.into(),
                kind: Kind::Unit,
                value: 2.0,
            }
            .into_diagnostic()
            .help
        };
        assert_eq!(out("weight"), None);
        assert!(out("t").is_some_and(|h| h.starts_with("t = 0")));
        assert!(out("retain").is_some_and(|h| h.starts_with("retain is")));
    }

    #[test]
    fn too_many_candidates_points_at_every_site() {
        let d = Problem::TooManyCandidates {
            merge: "m".into(),
            count: 80,
            limit: 64,
            sites: vec![(at(5), 10), (at(9), 8)],
        }
        .into_diagnostic();
        assert_eq!(d.message, "`m` has 80 candidates, more than 64");
        assert_eq!(d.primary.span, at(5));
        assert_eq!(d.primary.message, "10 values");
        assert_eq!(secondary(&d), [(9, "× 8 values")]);
    }

    #[test]
    fn merge_cycle_labels_the_other_members() {
        let d = Problem::MergeCycle {
            span: at(0),
            path: vec!["a".into(), "b".into(), "c".into(), "a".into()],
            members: vec![at(10), at(20)],
        }
        .into_diagnostic();
        assert_eq!(d.message, "merges depend on each other: a → b → c → a");
        assert_eq!(
            secondary(&d),
            [(10, "part of the cycle"), (20, "part of the cycle")]
        );
    }

    #[test]
    fn word_problems_list_the_allowed_words() {
        let d = Problem::NotOneOf {
            span: at(0),
            word: "bf17".into(),
            what: "an output dtype",
            allowed: &["bf16", "f16", "f32"],
            suggestion: Some("bf16".into()),
        }
        .into_diagnostic();
        assert_eq!(d.message, "`bf17` is not an output dtype");
        assert_eq!(d.primary.message, "expected `bf16`, `f16` or `f32`");
        assert_eq!(d.help.as_deref(), Some("did you mean `bf16`?"));
        assert_eq!(or_list(&["jsonl"]), "`jsonl`");
        assert_eq!(or_list(&[]), "");
    }

    #[test]
    fn warnings_are_warnings() {
        let unused = |kind| {
            Problem::Unused {
                span: at(0),
                name: "x".into(),
                kind,
            }
            .into_diagnostic()
        };
        let merge = unused(DefKind::Merge(MergeId(0)));
        assert_eq!(merge.severity(), Severity::Warning);
        assert_eq!(merge.message, "a merge `x` is never used");
        assert!(
            merge
                .help
                .as_deref()
                .is_some_and(|h| h.starts_with("add an `output`"))
        );
        assert_eq!(
            unused(DefKind::Let).help.as_deref(),
            Some("remove it, or prefix the name with `_` to keep it silently")
        );
        let select = Problem::SelectWithoutAuto {
            span: at(0),
            merge: "m".into(),
        };
        assert_eq!(select.into_diagnostic().code, Code::W0004);
    }

    #[test]
    fn a_stage_use_is_labelled_with_the_stage() {
        let label = in_stage_use(at(4), "sharpen");
        assert_eq!(label.span, at(4));
        assert_eq!(label.message, "in this use of stage `sharpen`");
    }
}
