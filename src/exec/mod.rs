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
    /// One part of a run split across processes or machines.
    pub part: Option<Part>,
}

/// A run split by shards (`obim run --part K/N`, then `obim run --assemble`):
/// each part computes and writes only its shards of every output into a
/// directory beside the output ([`parts_dir`]); the assembly checks that
/// every shard is there and whole, moves them into the output with the
/// index, config, tokenizer, report and card, and commits it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Part `k` of `n`, 1-based.
    Shards {
        k: usize,
        n: usize,
    },
    Assemble,
}

/// Where the parts of the output at `output` put their shards.
pub fn parts_dir(output: &std::path::Path) -> PathBuf {
    let mut name = output.file_name().unwrap_or_default().to_os_string();
    name.push(".obim-parts");
    output.with_file_name(name)
}
