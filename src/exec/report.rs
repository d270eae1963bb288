//! `obim-report.json`: the typed record of one written output (recipe,
//! plan hash, inputs and their file hashes, OBIM's positions, selection),
//! which the writer writes, the model card reads, and the driver reads back
//! to tell whether an output is up to date.

use super::select::Selection;
use crate::provenance::FileHash;
use crate::recipe::ModelSource;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// `obim-report.json`: what was written, from what, how.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub obim_version: String,
    pub recipe: RecipeRecord,
    /// The merge written.
    pub merge: String,
    /// The content hash of the plan's write step: an output with the same
    /// hash is up to date.
    pub plan_hash: String,
    pub device: String,
    pub threads: usize,
    pub seconds: f64,
    pub bytes: u64,
    pub shards: Vec<String>,
    pub inputs: Vec<InputRecord>,
    /// OBIM: merge → tensor → input → positions the input won.
    pub positions_won: BTreeMap<String, BTreeMap<String, BTreeMap<String, u64>>>,
    /// `auto` merges: every candidate's score and the winner, by merge.
    pub selection: BTreeMap<String, Selection>,
    /// RegMean: merge → linear layer's weight → how its system was solved.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub regmean: BTreeMap<String, BTreeMap<String, SolveRecord>>,
}

/// How RegMean solved one linear layer's system.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct SolveRecord {
    /// The ridge added to the sum of the Gram matrices, relative to its
    /// mean diagonal (0: none was needed).
    pub ridge: f64,
    /// (largest / smallest Cholesky pivot)²: a lower bound of its condition number.
    pub condition: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecipeRecord {
    pub path: String,
    pub blake3: String,
    pub text: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InputRecord {
    pub name: String,
    pub source: ModelSource,
    pub path: Option<String>,
    pub files: Vec<FileHash>,
}

impl Report {
    pub const FILE: &'static str = "obim-report.json";

    /// The report of the output in `dir`, if it has a readable one.
    pub fn read(dir: &Path) -> Option<Report> {
        let text = std::fs::read_to_string(dir.join(Report::FILE)).ok()?;
        serde_json::from_str(&text).ok()
    }
}
