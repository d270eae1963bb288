//! The executor: runs a plan's `write` steps. For every output it streams
//! tensor by tensor: each tensor of the output's merge is computed from the
//! same tensor of its inputs, recursively through earlier merges (a merge
//! used by a later one streams into it, one tensor at a time), converted to
//! the output dtype and appended to the current shard (on a writer thread,
//! while the next tensor is computed). A pointwise merge of models (linear,
//! task arithmetic) goes from the mapped shards to output bytes chunk by
//! chunk, with no whole-tensor f32 buffers. Inputs are mmap'd and read per
//! tensor; memory holds a few tensors, never a model. The executor emits
//! [`Event`]s and never prints.

use crate::Compilation;
use crate::calibrate::{self, ActStats};
use crate::checkpoint::{ModelInfo, TensorInfo};
use crate::data;
use crate::merge::{self, Merged, ObdStats, TensorContext};
use crate::methods::Method;
use crate::plan::{Plan, PlannedTensor, StepKind};
use crate::recipe::{
    DataId, Dtype, InputRef, MergeId, ModelId, Output, Saliency, TakeFrom, TensorSettings,
};
use crate::tensors::{self, CheckpointWriter, Shards, Staging, TensorError, TensorSpec};
use memmap2::Mmap;
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Tensor(#[from] TensorError),
    #[error(transparent)]
    Merge(#[from] merge::MergeError),
    #[error("model `{model}` ({file}): tensor `{tensor}`: {reason}")]
    Input {
        model: String,
        file: PathBuf,
        tensor: String,
        reason: String,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error("interrupted; `{0}` was left as it was")]
    Interrupted(PathBuf),
    #[error("choosing the settings of `{merge}`: {reason}")]
    Selection { merge: String, reason: String },
    #[error("calibrating `{input}` on `{data}`: {reason}")]
    Calibration {
        input: String,
        data: String,
        reason: String,
    },
}

pub struct RunOptions<'a> {
    /// Replace existing outputs.
    pub force: bool,
    /// Set when the user asks to stop (Ctrl-C): checked between tensors.
    pub cancel: &'a AtomicBool,
    /// Where cached results live (materialised merges, calibration statistics).
    pub cache: PathBuf,
    /// Shown in the report.
    pub device: String,
}

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
        cached: bool,
    },
    Selected {
        merge: String,
        candidate: String,
        mean: f64,
        seconds: f64,
    },
}

/// Calibration statistics by input and data source, for the merges being run.
#[derive(Default)]
pub struct Statistics {
    stats: HashMap<(InputRef, DataId), (ActStats, String)>,
}

/// What `--dry-run` reports for each output.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputState {
    /// Written by the same plan: nothing to do.
    UpToDate,
    /// Exists, from another plan: needs `--force`.
    Exists,
    Missing,
}

/// The state of every output of the plan, in plan order.
pub fn output_states(c: &Compilation, plan: &Plan) -> Vec<(PathBuf, String, OutputState)> {
    writes(plan)
        .into_iter()
        .map(|(index, hash)| {
            let o = &c.recipe.outputs[index];
            let state = if previous_plan_hash(&o.path).as_deref() == Some(hash.as_str()) {
                OutputState::UpToDate
            } else if o.path.exists() {
                OutputState::Exists
            } else {
                OutputState::Missing
            };
            (o.path.clone(), hash, state)
        })
        .collect()
}

fn writes(plan: &Plan) -> Vec<(usize, String)> {
    plan.steps()
        .into_iter()
        .filter_map(|s| match s.kind {
            StepKind::Write(i) => Some((i, s.hash.clone())),
            _ => None,
        })
        .collect()
}

fn previous_plan_hash(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("obim-report.json")).ok()?;
    let report: serde_json::Value = serde_json::from_str(&text).ok()?;
    report.get("plan_hash")?.as_str().map(String::from)
}

/// Runs every output of the plan. Outputs already written by the same plan
/// are left alone (and reported as up to date) unless `force` is set.
pub fn run(
    c: &Compilation,
    plan: &Plan,
    options: &RunOptions,
    progress: &mut dyn FnMut(Event),
) -> Result<(), RunError> {
    preflight(c, plan)?;
    let mut stats = Statistics::default();
    // Merges with `auto` settings are replaced by their winners as they are
    // chosen; the plan is lowered again each time.
    let mut current = (c.clone(), plan.clone());
    let mut selections = BTreeMap::new();
    for (index, hash) in writes(plan) {
        let output = &c.recipe.outputs[index];
        if !options.force && previous_plan_hash(&output.path).as_deref() == Some(hash.as_str()) {
            progress(Event::UpToDate {
                path: output.path.clone(),
            });
            continue;
        }
        choose(
            &mut current,
            output.merge,
            options,
            &mut stats,
            &mut selections,
            progress,
        )?;
        let (c, plan) = &current;
        calibrate_for(c, plan, output.merge, options, &mut stats, progress)?;
        write_output(
            c,
            plan,
            output,
            &hash,
            options,
            &stats,
            &selections,
            progress,
        )?;
    }
    Ok(())
}

/// Computes merge `merge` of a recipe (choosing its `auto` settings and
/// calibrating as needed) and writes it whole, in f32, into the cache;
/// returns the checkpoint. This is what `obim eval RECIPE:MERGE` evaluates.
pub fn materialise_merge(
    c: &Compilation,
    plan: &Plan,
    merge: MergeId,
    options: &RunOptions,
    progress: &mut dyn FnMut(Event),
) -> Result<ModelInfo, RunError> {
    preflight(c, plan)?;
    let mut stats = Statistics::default();
    let mut current = (c.clone(), plan.clone());
    choose(
        &mut current,
        merge,
        options,
        &mut stats,
        &mut BTreeMap::new(),
        progress,
    )?;
    let (c, plan) = &current;
    materialise(c, plan, merge, options, &mut stats, progress)
}

/// Chooses the settings of `merge` and of the merges it depends on, where
/// they have `auto` candidates (dependencies first).
fn choose(
    current: &mut (Compilation, Plan),
    merge: MergeId,
    options: &RunOptions,
    stats: &mut Statistics,
    selections: &mut BTreeMap<String, crate::select::Selection>,
    progress: &mut dyn FnMut(Event),
) -> Result<(), RunError> {
    let deps: Vec<MergeId> = current.0.recipe.merges[merge.0]
        .dependencies()
        .filter_map(|d| match d {
            InputRef::Merge(m) => Some(m),
            InputRef::Model(_) => None,
        })
        .collect();
    for dep in deps {
        choose(current, dep, options, stats, selections, progress)?;
    }
    if current.0.recipe.merges[merge.0].autos.is_empty() {
        return Ok(());
    }
    let (winner, selection) = crate::select::select(&current.0, merge, options, stats, progress)?;
    selections.insert(winner.name.clone(), selection);
    current.0.recipe.merges[merge.0] = winner;
    current.1 = Plan::lower(&current.0.recipe, &current.0.inventory);
    Ok(())
}

/// For `--dry-run`: each calibration the outputs need, and whether the cache
/// already holds its statistics.
pub fn calibration_states(c: &Compilation, plan: &Plan, cache: &Path) -> Vec<String> {
    let mut needed = Vec::new();
    for (index, _) in writes(plan) {
        calibrations(c, plan, c.recipe.outputs[index].merge, &mut needed);
    }
    needed
        .into_iter()
        .map(|(input, data)| {
            let recipe = &c.recipe;
            let what = format!(
                "calibrate:{}@{}",
                recipe.input_name(input),
                recipe.data[data.0].name
            );
            let state = match input {
                InputRef::Merge(_) => {
                    "computed after the merge is materialised in the cache".to_string()
                }
                InputRef::Model(m) => match c.inventory.get(m) {
                    None => "model not available locally".to_string(),
                    Some(info) => {
                        let sequences = data::Tokenizer::from_dir(&info.dir)
                            .and_then(|t| data::sequences(&recipe.data[data.0], &t));
                        match sequences {
                            Err(e) => format!("cannot tokenize: {e}"),
                            Ok(seqs) => {
                                let key = calibrate::cache_key(info, &seqs);
                                let tokens: usize = seqs.iter().map(Vec::len).sum();
                                if calibrate::cache_path(cache, &key).is_file() {
                                    format!("in the cache ({tokens} tokens)")
                                } else {
                                    format!(
                                        "would be computed ({} sequences, {tokens} tokens)",
                                        seqs.len()
                                    )
                                }
                            }
                        }
                    }
                },
            };
            format!("{what}: {state}")
        })
        .collect()
}

/// The (input, data) pairs whose statistics OBD needs to compute `merge`,
/// including the merges it depends on.
fn calibrations(c: &Compilation, plan: &Plan, merge: MergeId, out: &mut Vec<(InputRef, DataId)>) {
    let m = &c.recipe.merges[merge.0];
    for dep in m.dependencies() {
        if let InputRef::Merge(inner) = dep {
            calibrations(c, plan, inner, out);
        }
    }
    if m.method != Method::Obim {
        return;
    }
    for t in plan
        .tensors
        .get(&merge)
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        if t.settings.take.is_some() || t.saliency().0 != Saliency::Obd {
            continue;
        }
        for (input, settings) in m.inputs.iter().zip(&t.settings.inputs) {
            if let Some(data) = settings.using
                && !out.contains(&(input.model, data))
            {
                out.push((input.model, data));
            }
        }
    }
}

/// Computes (or reads from the cache) every statistic `merge` needs. An
/// input that is itself a merge is first written whole into the cache.
pub(crate) fn calibrate_for(
    c: &Compilation,
    plan: &Plan,
    merge: MergeId,
    options: &RunOptions,
    stats: &mut Statistics,
    progress: &mut dyn FnMut(Event),
) -> Result<(), RunError> {
    let mut needed = Vec::new();
    calibrations(c, plan, merge, &mut needed);
    for (input, data) in needed {
        if stats.stats.contains_key(&(input, data)) {
            continue;
        }
        let recipe = &c.recipe;
        let source = &recipe.data[data.0];
        let fail = |reason: String| RunError::Calibration {
            input: recipe.input_name(input).to_string(),
            data: source.name.clone(),
            reason,
        };
        let info = match input {
            InputRef::Model(m) => c
                .inventory
                .get(m)
                .cloned()
                .ok_or_else(|| fail("the model is not available locally".into()))?,
            InputRef::Merge(m) => materialise(c, plan, m, options, stats, progress)?,
        };
        // The model's own tokenizer, else its base's.
        let tokenizer_dir = if info.dir.join("tokenizer.json").is_file() {
            info.dir.clone()
        } else {
            recipe
                .shape_source(input)
                .and_then(|m| c.inventory.get(m))
                .map_or_else(|| info.dir.clone(), |i| i.dir.clone())
        };
        let tokenizer =
            data::Tokenizer::from_dir(&tokenizer_dir).map_err(|e| fail(e.to_string()))?;
        let sequences = data::sequences(source, &tokenizer).map_err(|e| fail(e.to_string()))?;
        let key = calibrate::cache_key(&info, &sequences);
        let path = calibrate::cache_path(&options.cache, &key);
        let started = Instant::now();
        let (result, cached) = match ActStats::load(&path, "") {
            Ok(s) => (s, true),
            Err(_) => {
                progress(Event::CalibrationStarted {
                    input: recipe.input_name(input).to_string(),
                    data: source.name.clone(),
                    sequences: sequences.len(),
                    tokens: sequences.iter().map(Vec::len).sum(),
                });
                let s = calibrate::calibrate(&info, &sequences, &candle_core::Device::Cpu)
                    .map_err(|e| fail(e.to_string()))?;
                s.save(&path).map_err(|e| fail(e.to_string()))?;
                (s, false)
            }
        };
        progress(Event::Calibrated {
            input: recipe.input_name(input).to_string(),
            data: source.name.clone(),
            tokens: result.tokens,
            seconds: started.elapsed().as_secs_f64(),
            cached,
        });
        stats.stats.insert((input, data), (result, key));
    }
    Ok(())
}

/// Writes a merge whole into the cache (keyed by its plan step's hash) so
/// that it can be calibrated, and opens it.
fn materialise(
    c: &Compilation,
    plan: &Plan,
    merge: MergeId,
    options: &RunOptions,
    stats: &mut Statistics,
    progress: &mut dyn FnMut(Event),
) -> Result<ModelInfo, RunError> {
    let step = plan.step_hash(StepKind::Merge(merge)).to_string();
    let dir = options
        .cache
        .join("merges")
        .join(&step[..step.len().min(32)]);
    if previous_plan_hash(&dir).as_deref() != Some(step.as_str()) {
        calibrate_for(c, plan, merge, options, stats, progress)?;
        let output = Output {
            merge,
            path: dir.clone(),
            written: dir.display().to_string(),
            dtype: Some(Dtype::F32),
            shard_size: u64::MAX,
            tokenizer: None,
            span: c.recipe.merges[merge.0].span,
        };
        let forced = RunOptions {
            force: true,
            cancel: options.cancel,
            cache: options.cache.clone(),
            device: options.device.clone(),
        };
        write_output(
            c,
            plan,
            &output,
            &step,
            &forced,
            stats,
            &BTreeMap::new(),
            progress,
        )?;
    }
    crate::checkpoint::open_dir(&dir).map_err(|e| RunError::Unsupported(e.to_string()))
}

/// Before any tensor is computed: every input must be available locally with
/// float tensors (names and shapes were checked by `open`).
fn preflight(c: &Compilation, plan: &Plan) -> Result<(), RunError> {
    for (&id, tensors) in &plan.tensors {
        let merge = &c.recipe.merges[id.0];
        for input in merge.dependencies() {
            let Some(model) = c.recipe.shape_source(input) else {
                continue;
            };
            let Some(info) = c.inventory.get(model) else {
                return Err(RunError::Unsupported(format!(
                    "model `{}` is not available locally: it is neither a directory nor in the Hugging Face cache",
                    c.recipe.models[model.0].name
                )));
            };
            for t in tensors {
                let input_err = |reason: String| RunError::Input {
                    model: c.recipe.models[model.0].name.clone(),
                    file: info.dir.clone(),
                    tensor: t.name.clone(),
                    reason,
                };
                // Names and shapes were compared with the base by the open
                // stage (E0024, E0025); what it does not know is what can be merged.
                let Some(found) = info.tensors.get(&t.name) else {
                    continue;
                };
                if tensors::float_width(&found.dtype).is_none() {
                    return Err(input_err(format!(
                        "dtype {} cannot be merged (bf16, f16 and f32 can)",
                        found.dtype
                    )));
                }
            }
        }
    }
    Ok(())
}

fn output_dtype(output: &Output, base: &ModelInfo) -> Dtype {
    output.dtype.unwrap_or(match base.dtype() {
        Some("F16") => Dtype::F16,
        Some("F32") => Dtype::F32,
        _ => Dtype::Bf16,
    })
}

#[expect(
    clippy::too_many_arguments,
    reason = "what one output needs: the plan, the statistics and the selections made for it"
)]
fn write_output(
    c: &Compilation,
    plan: &Plan,
    output: &Output,
    hash: &str,
    options: &RunOptions,
    stats: &Statistics,
    selections: &BTreeMap<String, crate::select::Selection>,
    progress: &mut dyn FnMut(Event),
) -> Result<(), RunError> {
    let started = Instant::now();
    let recipe = &c.recipe;
    let merge = &recipe.merges[output.merge.0];
    let tensors = plan
        .tensors
        .get(&output.merge)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let base_model = merge
        .base
        .or_else(|| merge.inputs.first().map(|i| i.model))
        .and_then(|b| recipe.shape_source(b));
    let Some(base_info) = base_model.and_then(|b| c.inventory.get(b)) else {
        return Err(RunError::Unsupported(format!(
            "merge `{}`: its base is not available locally",
            merge.name
        )));
    };
    let dtype = output_dtype(output, base_info);
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            shape: t.info.shape.clone(),
            bytes: (t.info.numel() * tensors::dtype_bytes(dtype)) as u64,
        })
        .collect();
    let total: u64 = specs.iter().map(|s| s.bytes).sum();
    let staging = Staging::new(&output.path, options.force)?;
    let mut writer = CheckpointWriter::new(staging.dir(), dtype, specs, output.shard_size);
    progress(Event::OutputStarted {
        path: output.path.clone(),
        tensors: tensors.len(),
        bytes: total,
        shards: writer.shard_count(),
    });
    let mut eval = Evaluator::new(c, plan, stats, output.merge);
    // The inputs' file hashes (for the report) are computed on a thread of
    // their own while the merge runs.
    let models: std::collections::BTreeSet<ModelId> = eval
        .uses
        .keys()
        .filter_map(|i| match i {
            InputRef::Model(m) => Some(*m),
            InputRef::Merge(_) => None,
        })
        .collect();
    let models: Vec<(ModelId, &ModelInfo)> = models
        .into_iter()
        .filter_map(|m| c.inventory.get(m).map(|i| (m, i)))
        .collect();
    let infos: Vec<&ModelInfo> = models.iter().map(|(_, i)| *i).collect();
    let stop = AtomicBool::new(false);
    let (merged, hashes) = std::thread::scope(|scope| {
        let hashing = scope.spawn(|| crate::provenance::models(&infos, &options.cache, &stop));
        // The shards are written on a thread of their own, tensor i while
        // tensor i + 1 is computed; two byte buffers take turns.
        let (to_writer, written_rx) = std::sync::mpsc::sync_channel::<(&str, Vec<u8>, usize)>(0);
        let (free_tx, free_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let writing = scope.spawn(move || -> Result<Vec<String>, TensorError> {
            for _ in tensors {
                // A closed channel: the computing side failed, and its error
                // is the one reported.
                let Ok((name, bytes, len)) = written_rx.recv() else {
                    return Ok(Vec::new());
                };
                writer.write(name, &bytes[..len])?;
                let _ = free_tx.send(bytes);
            }
            writer.finish()
        });
        let computed = (|| -> Result<(), RunError> {
            let mut free = vec![Vec::new(), Vec::new()];
            for t in tensors {
                if options.cancel.load(Ordering::Relaxed) {
                    return Err(RunError::Interrupted(output.path.clone()));
                }
                let mut bytes = free
                    .pop()
                    .or_else(|| free_rx.recv().ok())
                    .unwrap_or_default();
                let len = eval
                    .encoded(output.merge, &t.name, dtype, &mut bytes)?
                    .len();
                if to_writer.send((&t.name, bytes, len)).is_err() {
                    break; // the writer failed: its error follows
                }
                progress(Event::TensorWritten {
                    name: t.name.clone(),
                    bytes: len as u64,
                });
            }
            Ok(())
        })();
        drop(to_writer);
        let written = writing
            .join()
            .map_err(|_| RunError::Unsupported("the shard writer failed".into()));
        let merged = computed.and_then(|()| Ok(written??));
        if merged.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        (merged, hashing.join())
    });
    let shard_files = merged?;
    let hashes =
        hashes.map_err(|_| RunError::Unsupported("hashing the inputs failed".into()))??;
    let tokenizer_dir = output
        .tokenizer
        .and_then(|t| recipe.shape_source(t))
        .and_then(|m| c.inventory.get(m))
        .map_or(&base_info.dir, |i| &i.dir);
    write_config(staging.dir(), base_info, dtype)?;
    copy_side_files(&base_info.dir, tokenizer_dir, staging.dir())?;
    let inputs: Vec<(ModelId, Vec<crate::provenance::FileHash>)> =
        models.iter().map(|(m, _)| *m).zip(hashes).collect();
    let report = report(
        c,
        output,
        hash,
        &eval,
        &inputs,
        &shard_files,
        total,
        started.elapsed().as_secs_f64(),
        options,
        selections,
    );
    let path = staging.dir().join("obim-report.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&report).unwrap_or_default(),
    )
    .map_err(|source| TensorError::Write { path, source })?;
    staging.commit()?;
    progress(Event::OutputWritten {
        path: output.path.clone(),
        seconds: started.elapsed().as_secs_f64(),
        bytes: total,
    });
    Ok(())
}

/// Computes tensors into owned buffers (merges update them in place). A
/// model or merge that one tensor's computation needs several times is read
/// or computed once and kept until its last use.
pub(crate) struct Evaluator<'a> {
    c: &'a Compilation,
    plan: &'a Plan,
    stats: &'a Statistics,
    shards: Shards,
    /// How often each input is used while computing one tensor of the output.
    uses: HashMap<InputRef, usize>,
    remaining: HashMap<InputRef, usize>,
    memo: HashMap<InputRef, Vec<f32>>,
    /// OBIM: positions each input won, per merge and tensor.
    won: BTreeMap<MergeId, BTreeMap<String, Vec<u64>>>,
    /// Buffers of earlier tensors, reused so that large tensors do not
    /// fault fresh pages in every time.
    pool: Vec<Vec<f32>>,
    /// Model tensors shared with other evaluators (a selection's candidates).
    shared: Option<SharedInputs>,
}

/// Model tensors read once for several evaluators, until cleared.
pub(crate) type SharedInputs =
    std::rc::Rc<std::cell::RefCell<HashMap<(ModelId, String), Vec<f32>>>>;

impl<'a> Evaluator<'a> {
    fn buffer(&mut self) -> Vec<f32> {
        self.pool.pop().unwrap_or_default()
    }

    /// Keeps a finished buffer for reuse (a few, the largest).
    fn recycle(&mut self, buffer: Vec<f32>) {
        self.pool.push(buffer);
        self.pool.sort_by_key(Vec::capacity);
        if self.pool.len() > 8 {
            self.pool.remove(0);
        }
    }

    pub(crate) fn new(
        c: &'a Compilation,
        plan: &'a Plan,
        stats: &'a Statistics,
        output: MergeId,
    ) -> Self {
        let mut uses = HashMap::new();
        count_uses(c, output, &mut uses);
        Evaluator {
            c,
            plan,
            stats,
            shards: Shards::default(),
            uses,
            remaining: HashMap::new(),
            memo: HashMap::new(),
            won: BTreeMap::new(),
            pool: Vec::new(),
            shared: None,
        }
    }

    /// Drops the buffers kept for reuse (a selection's candidates each have
    /// an evaluator; their pools together would hold many large tensors).
    pub(crate) fn release_buffers(&mut self) {
        self.pool.clear();
    }

    /// Reads model tensors through `shared` (and leaves them there).
    pub(crate) fn with_shared(mut self, shared: SharedInputs) -> Self {
        self.shared = Some(shared);
        self
    }

    /// The merged values of tensor `name` of `merge`.
    pub(crate) fn output_tensor(
        &mut self,
        merge: MergeId,
        name: &str,
    ) -> Result<Vec<f32>, RunError> {
        self.memo.clear();
        self.remaining = self.uses.clone();
        self.merge(merge, name)
    }

    fn tensor(&mut self, input: InputRef, name: &str) -> Result<Vec<f32>, RunError> {
        let left = self.remaining.get(&input).copied().unwrap_or(1);
        self.remaining.insert(input, left.saturating_sub(1));
        if self.memo.contains_key(&input) {
            if left > 1 {
                let mut copy = self.buffer();
                if let Some(v) = self.memo.get(&input) {
                    copy.clone_from(v);
                }
                return Ok(copy);
            }
            return Ok(self.memo.remove(&input).unwrap_or_default());
        }
        let values = match input {
            InputRef::Model(m) => self.load(m, name)?,
            InputRef::Merge(m) => self.merge(m, name)?,
        };
        if left > 1 {
            let mut copy = self.buffer();
            copy.clone_from(&values);
            self.memo.insert(input, copy);
        }
        Ok(values)
    }

    fn load(&mut self, model: ModelId, name: &str) -> Result<Vec<f32>, RunError> {
        let Some(shared) = self.shared.clone() else {
            return self.read(model, name);
        };
        let key = (model, name.to_string());
        if let Some(values) = shared.borrow().get(&key) {
            let mut copy = self.buffer();
            copy.clone_from(values);
            return Ok(copy);
        }
        let values = self.read(model, name)?;
        shared.borrow_mut().insert(key, values.clone());
        Ok(values)
    }

    /// One model tensor from its shard, as f32.
    fn read(&mut self, model: ModelId, name: &str) -> Result<Vec<f32>, RunError> {
        let (map, range, t) = self.mapped(model, name)?;
        let mut values = self.buffer();
        let converted = tensors::to_f32_into(&map[range], &t.dtype, &mut values);
        drop(map);
        self.shards.release(t);
        converted
            .then_some(values)
            .ok_or_else(|| self.undecodable(model, name, t))
    }

    /// The mapped bytes of one model tensor, and where they come from.
    fn mapped(
        &mut self,
        model: ModelId,
        name: &str,
    ) -> Result<(Arc<Mmap>, std::ops::Range<usize>, &'a TensorInfo), RunError> {
        let recipe = &self.c.recipe;
        let info = self.c.inventory.get(model).ok_or_else(|| {
            RunError::Unsupported(format!(
                "model `{}` is not available locally",
                recipe.models[model.0].name
            ))
        })?;
        let t = info.tensors.get(name).ok_or_else(|| RunError::Input {
            model: recipe.models[model.0].name.clone(),
            file: info.dir.clone(),
            tensor: name.to_string(),
            reason: "missing".into(),
        })?;
        let (map, range) = self.shards.bytes(name, t)?;
        Ok((map, range, t))
    }

    fn undecodable(&self, model: ModelId, name: &str, t: &TensorInfo) -> RunError {
        RunError::Input {
            model: self.c.recipe.models[model.0].name.clone(),
            file: t.file.clone(),
            tensor: name.to_string(),
            reason: format!("dtype {} cannot be merged", t.dtype),
        }
    }

    /// Tensor `name` of merge `id`, encoded in `dtype` into the front of
    /// `out`. A pointwise merge of models (linear, task arithmetic) streams
    /// from the mapped shards chunk by chunk; any other computes whole f32
    /// tensors first.
    pub(crate) fn encoded<'o>(
        &mut self,
        id: MergeId,
        name: &str,
        dtype: Dtype,
        out: &'o mut Vec<u8>,
    ) -> Result<&'o [u8], RunError> {
        if let Some((pointwise, models)) = self.pointwise(id, name) {
            let mut mapped = Vec::with_capacity(models.len());
            for &m in &models {
                mapped.push(self.mapped(m, name)?);
            }
            let operands: Vec<(&[u8], &str)> = mapped
                .iter()
                .map(|(map, range, t)| (&map[range.clone()], t.dtype.as_str()))
                .collect();
            // The preflight and the open stage checked dtypes and shapes.
            let encoded = tensors::merge_streamed(&operands, dtype, out, |first, rest| {
                pointwise.apply(first, rest)
            })
            .ok_or_else(|| {
                RunError::Unsupported(format!(
                    "tensor `{name}`: its inputs' dtypes or sizes cannot be merged"
                ))
            })?;
            for (_, _, t) in mapped {
                self.shards.release(t);
            }
            return Ok(encoded);
        }
        let values = self.output_tensor(id, name)?;
        let encoded = tensors::from_f32_into(&values, dtype, out);
        self.recycle(values);
        Ok(encoded)
    }

    /// The pointwise form of merge `id` at tensor `name` and the models it
    /// reads (in operand order), when every operand is a model.
    fn pointwise(&self, id: MergeId, name: &str) -> Option<(merge::Pointwise, Vec<ModelId>)> {
        let merge = &self.c.recipe.merges[id.0];
        let pointwise = merge::Pointwise::of(merge.method, &self.settings(id, name).0)?;
        let base = if pointwise.uses_base() {
            Some(merge.base?)
        } else {
            None
        };
        let models = base
            .into_iter()
            .chain(merge.inputs.iter().map(|i| i.model))
            .map(|input| match input {
                InputRef::Model(m) => Some(m),
                InputRef::Merge(_) => None,
            })
            .collect::<Option<Vec<ModelId>>>()?;
        Some((pointwise, models))
    }

    /// The settings and shape the plan fixed for tensor `name` of merge `id`.
    fn settings(
        &self,
        id: MergeId,
        name: &str,
    ) -> (TensorSettings, Vec<usize>, Option<&'a PlannedTensor>) {
        let planned: Option<&PlannedTensor> = self
            .plan
            .tensors
            .get(&id)
            .and_then(|ts| ts.iter().find(|t| t.name == name));
        let settings = planned.map_or_else(
            || self.c.recipe.merges[id.0].tensor_settings(name),
            |t| t.settings.clone(),
        );
        let shape = planned.map(|t| t.info.shape.clone()).unwrap_or_default();
        (settings, shape, planned)
    }

    fn merge(&mut self, id: MergeId, name: &str) -> Result<Vec<f32>, RunError> {
        let merge = &self.c.recipe.merges[id.0];
        let (settings, shape, planned) = self.settings(id, name);
        // A `take` needs only the tensor it takes.
        let wanted = |i: usize| settings.take.is_none_or(|t| t == TakeFrom::Input(i));
        let base = match merge.base {
            Some(b) if settings.take.is_none_or(|t| t == TakeFrom::Base) => {
                Some(self.tensor(b, name)?)
            }
            _ => None,
        };
        let mut inputs = Vec::with_capacity(merge.inputs.len());
        for (i, input) in merge.inputs.iter().enumerate() {
            inputs.push(if wanted(i) {
                self.tensor(input.model, name)?
            } else {
                Vec::new()
            });
        }
        let obd = self.obd(id, name, &settings, planned)?;
        let ctx = TensorContext {
            name,
            shape: &shape,
            obd: &obd,
        };
        let Merged { values, won, spare } =
            merge::merge_tensor(merge.method, &settings, base, inputs, &ctx)?;
        for buffer in spare {
            self.recycle(buffer);
        }
        if let Some(won) = won {
            self.won
                .entry(id)
                .or_default()
                .insert(name.to_string(), won);
        }
        Ok(values)
    }
}

impl<'a> Evaluator<'a> {
    /// Each input's OBD statistics for tensor `name` (`None`: magnitude).
    fn obd(
        &self,
        id: MergeId,
        name: &str,
        settings: &TensorSettings,
        planned: Option<&PlannedTensor>,
    ) -> Result<Vec<Option<ObdStats<'a>>>, RunError> {
        let merge = &self.c.recipe.merges[id.0];
        let uses_obd = merge.method == Method::Obim
            && settings.take.is_none()
            && planned.is_some_and(|t| t.saliency().0 == Saliency::Obd);
        if !uses_obd {
            return Ok(vec![None; merge.inputs.len()]);
        }
        let stats: &'a Statistics = self.stats;
        merge
            .inputs
            .iter()
            .zip(&settings.inputs)
            .map(|(input, s)| {
                let Some(data) = s.using else { return Ok(None) };
                let missing = |what: String| RunError::Calibration {
                    input: self.c.recipe.input_name(input.model).to_string(),
                    data: self.c.recipe.data[data.0].name.clone(),
                    reason: what,
                };
                let (found, _) = stats
                    .stats
                    .get(&(input.model, data))
                    .ok_or_else(|| missing("statistics were not computed".into()))?;
                if name.ends_with(".bias") {
                    return Ok(Some(ObdStats::Tokens(found.tokens as f64)));
                }
                let module = name.strip_suffix(".weight").unwrap_or(name);
                let sums = found.sums.get(module).ok_or_else(|| {
                    missing(format!(
                        "tensor `{name}`: the forward pass has no linear module `{module}`"
                    ))
                })?;
                Ok(Some(ObdStats::Columns(sums)))
            })
            .collect()
    }
}

/// How often each input is requested while one tensor of `merge` is computed
/// (a merge's own inputs are counted once, when it is first computed).
fn count_uses(c: &Compilation, merge: MergeId, uses: &mut HashMap<InputRef, usize>) {
    for dep in c.recipe.merges[merge.0].dependencies() {
        let count = uses.entry(dep).or_default();
        *count += 1;
        if let (1, InputRef::Merge(m)) = (*count, dep) {
            count_uses(c, m, uses);
        }
    }
}

fn dtype_config_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::Bf16 => "bfloat16",
        Dtype::F16 => "float16",
        Dtype::F32 => "float32",
    }
}

/// The base's config.json with the output dtype.
fn write_config(dir: &Path, base: &ModelInfo, dtype: Dtype) -> Result<(), RunError> {
    let mut config = base.config.clone();
    if let Some(object) = config.as_object_mut() {
        let has_dtype = object.contains_key("dtype");
        if has_dtype || !object.contains_key("torch_dtype") {
            object.insert("dtype".into(), dtype_config_name(dtype).into());
        }
        if object.contains_key("torch_dtype") {
            object.insert("torch_dtype".into(), dtype_config_name(dtype).into());
        }
    }
    let path = dir.join("config.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&config).unwrap_or_default() + "\n",
    )
    .map_err(|source| TensorError::Write { path, source }.into())
}

fn copy_side_files(base: &Path, tokenizer: &Path, out: &Path) -> Result<(), RunError> {
    let copies = crate::hub::TOKENIZER_FILES
        .iter()
        .map(|f| (tokenizer, *f))
        .chain([(base, "generation_config.json")]);
    for (dir, file) in copies {
        let from = dir.join(file);
        if from.is_file() {
            let to = out.join(file);
            std::fs::copy(&from, &to).map_err(|source| TensorError::Write { path: to, source })?;
        }
    }
    Ok(())
}

#[expect(
    clippy::too_many_arguments,
    reason = "the report gathers everything the run knows"
)]
fn report(
    c: &Compilation,
    output: &Output,
    hash: &str,
    eval: &Evaluator,
    inputs: &[(ModelId, Vec<crate::provenance::FileHash>)],
    shards: &[String],
    bytes: u64,
    seconds: f64,
    options: &RunOptions,
    selections: &BTreeMap<String, crate::select::Selection>,
) -> serde_json::Value {
    let recipe = &c.recipe;
    let root = c.sources.get(recipe.root);
    let inputs: Vec<serde_json::Value> = inputs
        .iter()
        .map(|(id, files)| {
            let m = &recipe.models[id.0];
            json!({
                "name": m.name,
                "source": m.source,
                "path": c.inventory.get(*id).map(|i| i.dir.display().to_string()),
                "files": files,
            })
        })
        .collect();
    let won: serde_json::Map<String, serde_json::Value> = eval
        .won
        .iter()
        .map(|(id, per_tensor)| {
            let merge = &recipe.merges[id.0];
            let names: Vec<&str> = merge
                .inputs
                .iter()
                .map(|i| recipe.input_name(i.model))
                .collect();
            let tensors: serde_json::Map<String, serde_json::Value> = per_tensor
                .iter()
                .map(|(t, counts)| {
                    (
                        t.clone(),
                        names
                            .iter()
                            .zip(counts)
                            .map(|(n, c)| (n.to_string(), json!(c)))
                            .collect::<serde_json::Map<_, _>>()
                            .into(),
                    )
                })
                .collect();
            (merge.name.clone(), tensors.into())
        })
        .collect();
    json!({
        "obim_version": env!("CARGO_PKG_VERSION"),
        "recipe": {"path": root.name, "blake3": blake3::hash(root.text.as_bytes()).to_hex().to_string(), "text": root.text},
        "merge": recipe.merges[output.merge.0].name,
        "plan_hash": hash,
        "device": options.device,
        "threads": rayon::current_num_threads(),
        "seconds": (seconds * 1000.0).round() / 1000.0,
        "bytes": bytes,
        "shards": shards,
        "inputs": inputs,
        "positions_won": won,
        "selection": selections,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linear (with no base) and task arithmetic over models stream from the
    /// shards; a sparsifying merge, a `take` and a merge of a merge do not.
    #[test]
    fn which_merges_stream() {
        let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/demo");
        let dir = std::env::temp_dir().join(format!("obim-streams-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let recipe = dir.join("r.obim");
        let model = |name: &str, m: &str| format!("{name} = \"{}\"\n", demo.join(m).display());
        let text = [
            model("base llama", "base"),
            model("model add", "expert_add"),
            model("model sort", "expert_sort"),
            "merge lin = linear { add weight 1  sort weight 1 }\n".into(),
            "merge ta = task_arithmetic(base: llama) { add weight 1  sort weight 1 layers \"*norm*\" { take base } }\n".into(),
            "merge ti = ties(base: llama, density: 0.5) { add weight 1  sort weight 1 }\n".into(),
            "merge nested = task_arithmetic(base: llama) { lin weight 1 }\n".into(),
            "output lin -> \"a\"\noutput ta -> \"b\"\noutput ti -> \"c\"\noutput nested -> \"d\"\n".into(),
        ]
        .concat();
        std::fs::write(&recipe, text).unwrap();
        let c = crate::compile_file(&recipe).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let plan = c.plan().expect("the recipe checks");
        let stats = Statistics::default();
        let merge =
            |name: &str| MergeId(c.recipe.merges.iter().position(|m| m.name == name).unwrap());
        let streams = |name: &str, tensor: &str| {
            let eval = Evaluator::new(&c, &plan, &stats, merge(name));
            eval.pointwise(merge(name), tensor).is_some()
        };
        let weight = "model.layers.0.mlp.up_proj.weight";
        let norm = "model.layers.0.input_layernorm.weight";
        assert!(streams("lin", weight));
        assert!(streams("ta", weight));
        assert!(!streams("ta", norm), "a `take` is no merge");
        assert!(!streams("ti", weight));
        assert!(!streams("nested", weight));
    }
}
