//! The back end: runs a [`Plan`](crate::plan::Plan). The driver alone owns
//! the order of the work — calibrate, select, merge, write — and the
//! recursion between calibrating an input and materialising the merge that
//! input is. The stages under it never call back up:
//!
//! | module | owns |
//! | --- | --- |
//! | `driver` | the order calibrate → select → merge → write, `--dry-run` states, calibration ⇄ materialisation |
//! | `stats` | calibration statistics by input and data source, and OBD's view of them per tensor |
//! | `evaluator` | computing one tensor of a merge from its inputs (mmap'd reads, streamed pointwise merges, memoised shared inputs) |
//! | `select` | scoring the candidates the driver hands it on held-out data, and choosing the winner |
//! | `writer` | the shard-writing thread, `config.json`, side files and the typed [`Report`] |
//! | `tokenizer` | the output vocabulary's `tokenizer.json` and added tokens, the chat template |
//! | `error` | [`ExecError`]: typed runtime errors with codes and recipe spans |
//! | `event` | [`Event`]s for the caller to draw; the back end never prints |

mod card;
mod driver;
mod error;
mod evaluator;
mod event;
mod report;
mod select;
mod stats;
mod tokenizer;
mod writer;

pub use driver::{OutputState, calibration_states, materialise_merge, output_states, run};
pub use error::{CalibrationFailure, ExecError, SelectionFailure};
pub use event::Event;
pub use report::{InputRecord, RecipeRecord, Report};
pub use select::{CandidateScore, Selection};

use crate::device::Device;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

/// How to run: what the command line decided.
pub struct RunOptions<'a> {
    /// Replace existing outputs.
    pub force: bool,
    /// Set when the user asks to stop (Ctrl-C, SIGTERM, SIGHUP): checked between tensors.
    pub cancel: &'a AtomicBool,
    /// Where cached results live (materialised merges, calibration statistics, scores).
    pub cache: PathBuf,
    /// Where forward passes run (calibration, selection).
    pub device: &'a Device,
    /// Merge inputs with NaN or ±∞ values instead of stopping (E0112).
    pub allow_non_finite: bool,
}
