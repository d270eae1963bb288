//! Runtime errors as typed data. Each variant names what failed (model,
//! file, tensor, dtype, shapes) and keeps the error it came from; the driver
//! wraps errors in [`ExecError::InStep`] with the recipe span of the plan
//! step that failed, so [`ExecError::to_diagnostic`] can render a runtime
//! error with the same ariadne renderer as a check error. Every variant has
//! a code with an `obim explain` entry (E0101–E0112).

use crate::calibrate::CalibrationError;
use crate::checkpoint::{CheckpointError, TensorDtype};
use crate::codes::Code;
use crate::data::DataError;
use crate::diagnostic::Diagnostic;
use crate::merge::MergeError;
use crate::model::ConfigError;
use crate::model::blocks::ForwardError;
use crate::source::Span;
use crate::tensors::TensorError;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// E0101
    #[error(
        "model `{model}` is not available locally: it is neither a directory nor in the Hugging Face cache"
    )]
    ModelUnavailable { model: String, span: Span },
    /// E0102
    #[error("model `{model}` ({file}): tensor `{tensor}` is missing")]
    TensorMissing {
        model: String,
        file: PathBuf,
        tensor: String,
        span: Span,
    },
    /// E0103
    #[error(
        "model `{model}` ({file}): tensor `{tensor}`: dtype {dtype} cannot be merged (bf16, f16 and f32 can)"
    )]
    Unmergeable {
        model: String,
        file: PathBuf,
        tensor: String,
        dtype: TensorDtype,
        span: Span,
    },
    /// E0112
    #[error("model `{model}` ({file}): tensor `{tensor}` holds NaN or infinite values")]
    NonFinite {
        model: String,
        file: PathBuf,
        tensor: String,
        span: Span,
    },
    /// E0103: operands of a streamed merge that do not fit together.
    #[error("tensor `{tensor}`: its inputs' dtypes or sizes cannot be merged")]
    Operands { tensor: String },
    /// E0104 (reading), E0105 (writing), E0106 (an existing output),
    /// E0111 (an output another run is writing).
    #[error(transparent)]
    Files(#[from] TensorError),
    /// E0107
    #[error(transparent)]
    Merge(#[from] MergeError),
    /// E0108
    #[error("interrupted; `{0}` was left as it was")]
    Interrupted(PathBuf),
    /// E0109
    #[error("calibrating `{input}` on `{data}`")]
    Calibration {
        input: String,
        data: String,
        source: Box<CalibrationFailure>,
    },
    /// E0110
    #[error("choosing the settings of `{merge}`")]
    Selection {
        merge: String,
        source: Box<SelectionFailure>,
    },
    /// E0105: a thread of the writer or of the input hashing stopped.
    #[error("the {0} thread stopped unexpectedly")]
    Thread(&'static str),
    /// E0104: a merge materialised in the cache could not be opened again.
    #[error("cannot open the merge materialised in the cache")]
    Materialised(#[source] CheckpointError),
    /// Context: the plan step (and its recipe span) in which `source` happened.
    #[error("{step}")]
    InStep {
        step: String,
        span: Span,
        source: Box<ExecError>,
    },
}

/// Why calibration statistics could not be had.
#[derive(Debug, thiserror::Error)]
pub enum CalibrationFailure {
    #[error("the model is not available locally")]
    Unavailable,
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Calibrate(#[from] CalibrationError),
    #[error("its statistics were not computed")]
    NotComputed,
    #[error("tensor `{tensor}`: the forward pass has no linear module `{module}`")]
    NoModule { tensor: String, module: String },
}

/// Why a selection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SelectionFailure {
    #[error("its base is not available locally")]
    BaseUnavailable,
    #[error("cannot run the merge forward")]
    Config(#[source] ConfigError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("data `{0}` has no text of 2 tokens or more")]
    TooShort(String),
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error("decoding the answers")]
    Eval(#[source] crate::eval::EvalError),
    #[error("every candidate's loss is NaN or infinite")]
    NoFiniteLoss,
}

impl ExecError {
    /// Wraps the error in the plan step `step` whose recipe span is `span`.
    pub fn in_step(self, step: impl Into<String>, span: Span) -> ExecError {
        ExecError::InStep {
            step: step.into(),
            span,
            source: Box::new(self),
        }
    }

    /// The error inside every [`ExecError::InStep`].
    pub fn innermost(&self) -> &ExecError {
        match self {
            ExecError::InStep { source, .. } => source.innermost(),
            e => e,
        }
    }

    pub fn code(&self) -> Code {
        match self {
            ExecError::InStep { source, .. } => source.code(),
            ExecError::ModelUnavailable { .. } => Code::E0101,
            ExecError::TensorMissing { .. } => Code::E0102,
            ExecError::Unmergeable { .. } | ExecError::Operands { .. } => Code::E0103,
            ExecError::NonFinite { .. } => Code::E0112,
            ExecError::Files(TensorError::Read { .. } | TensorError::Tensor { .. })
            | ExecError::Materialised(_) => Code::E0104,
            ExecError::Files(TensorError::Write { .. } | TensorError::Rename { .. })
            | ExecError::Thread(_) => Code::E0105,
            ExecError::Files(TensorError::OutputExists(_)) => Code::E0106,
            ExecError::Files(TensorError::Busy { .. }) => Code::E0111,
            ExecError::Merge(_) => Code::E0107,
            ExecError::Interrupted(_) => Code::E0108,
            ExecError::Calibration { .. } => Code::E0109,
            ExecError::Selection { .. } => Code::E0110,
        }
    }

    /// The recipe span of the error itself, if it has one (a model's declaration).
    fn own_span(&self) -> Option<Span> {
        match self {
            ExecError::ModelUnavailable { span, .. }
            | ExecError::TensorMissing { span, .. }
            | ExecError::Unmergeable { span, .. }
            | ExecError::NonFinite { span, .. } => Some(*span),
            _ => None,
        }
    }

    fn help(&self) -> Option<&'static str> {
        Some(match self.innermost() {
            ExecError::ModelUnavailable { .. } => {
                "check the path (relative to the recipe file), or download the model with `huggingface-cli download ORG/NAME`"
            }
            ExecError::Files(TensorError::OutputExists(_)) => {
                "pass --force to replace it, or write to another path"
            }
            ExecError::Files(TensorError::Busy { .. }) => {
                "wait for the other run to finish, or write to another path"
            }
            ExecError::Unmergeable { .. } => "convert the checkpoint to bf16, f16 or f32",
            ExecError::NonFinite { .. } => {
                "the checkpoint is damaged or was saved from a diverged run; `--allow-non-finite` merges it anyway"
            }
            ExecError::Interrupted(_) => "run the recipe again to finish it",
            _ => return None,
        })
    }

    /// The error as a diagnostic: the innermost span is the primary label,
    /// the enclosing steps are secondary labels, the message is the whole
    /// chain of causes.
    pub fn to_diagnostic(&self) -> Diagnostic {
        let mut steps = Vec::new();
        let mut current = self;
        while let ExecError::InStep { step, span, source } = current {
            steps.push((*span, step.as_str()));
            current = source;
        }
        let message = crate::errors::with_causes(current);
        let (primary, rest) = match (current.own_span(), steps.split_last()) {
            (Some(span), _) => (span, &steps[..]),
            (None, Some((last, rest))) => (last.0, rest),
            (None, None) => (Span::default(), &steps[..]),
        };
        let mut d = Diagnostic::new(self.code(), primary, message);
        match (current.own_span(), steps.last()) {
            (Some(_), _) => d = d.label("the model, declared here"),
            (None, Some((_, step))) => d = d.label(format!("while running `{step}`")),
            (None, None) => {}
        }
        for (span, step) in rest.iter().rev() {
            d = d.with(*span, format!("while running `{step}`"));
        }
        if let Some(help) = self.help() {
            d = d.help(help);
        }
        d
    }
}
