//! What the back end tells its caller, as it happens; the CLI draws it.

use std::path::PathBuf;

/// What the executor tells its caller; the CLI draws it.
#[derive(Debug, Clone)]
pub enum Event {
    /// One file of a hub model being downloaded.
    DownloadStarted {
        file: String,
        bytes: u64,
    },
    Downloaded {
        bytes: u64,
    },
    DownloadFinished,
    OutputStarted {
        path: PathBuf,
        tensors: usize,
        bytes: u64,
        shards: usize,
    },
    TensorWritten {
        name: String,
        bytes: u64,
    },
    OutputWritten {
        path: PathBuf,
        seconds: f64,
        bytes: u64,
    },
    /// Something the user should know that did not stop the run.
    Warning {
        message: String,
    },
    UpToDate {
        path: PathBuf,
    },
    CalibrationStarted {
        input: String,
        data: String,
        sequences: usize,
        tokens: usize,
    },
    Calibrated {
        input: String,
        data: String,
        tokens: u64,
        seconds: f64,
        /// Read from the cache, not computed.
        cached: bool,
    },
    /// One `auto` candidate of a merge, scored.
    CandidateScored {
        merge: String,
        candidate: String,
        /// Mean loss per selection data source, then their mean.
        losses: Vec<(String, f64)>,
        mean: f64,
        /// `select by accuracy`: the mean exact match over the sources.
        accuracy: Option<f64>,
        cached: bool,
    },
    Selected {
        merge: String,
        candidate: String,
        mean: f64,
        accuracy: Option<f64>,
        seconds: f64,
    },
}
