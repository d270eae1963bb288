//! The driver: the one place that orders the work of a run. For every
//! output it chooses the `auto` settings of the merges it needs
//! (dependencies first), computes the calibration statistics they need
//! (materialising a merge in the cache when a merge is itself calibrated),
//! then writes the output. Outputs already written by the same plan are
//! left alone unless `--force`.

use super::error::{CalibrationFailure, ExecError};
use super::event::Event;
use super::report::Report;
use super::select::{Selection, Selector};
use super::stats::Statistics;
use super::writer;
use super::{Part, RunOptions};
use crate::Compilation;
use crate::calibrate::{self, ActStats, Grams, Moments};
use crate::checkpoint::ModelInfo;
use crate::data;
use crate::plan::{Plan, StepKind, calibrate_step_id};
use crate::recipe::{DataId, Dtype, InputRef, MergeId, Output};
use crate::staging::OutputLock;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

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
            let state = if written_by(&o.path, &hash) {
                OutputState::UpToDate
            } else if exists(&o.path) {
                OutputState::Exists
            } else {
                OutputState::Missing
            };
            (o.path.clone(), hash, state)
        })
        .collect()
}

/// The plan's write steps: output index and step hash.
fn writes(plan: &Plan) -> Vec<(usize, String)> {
    plan.steps()
        .into_iter()
        .filter_map(|s| match s.kind {
            StepKind::Write(i) => Some((i, s.hash.clone())),
            _ => None,
        })
        .collect()
}

/// Something is at `path` (a dangling link too), as staging sees it.
fn exists(path: &Path) -> bool {
    path.symlink_metadata().is_ok()
}

/// Whether `dir` holds an output written by the plan step with `hash`.
fn written_by(dir: &Path, hash: &str) -> bool {
    Report::read(dir).is_some_and(|r| r.plan_hash == hash)
}

/// Runs every output of the plan.
pub fn run(
    c: &Compilation,
    plan: &Plan,
    options: &RunOptions,
    progress: &mut dyn FnMut(Event),
) -> Result<(), ExecError> {
    preflight(c, plan)?;
    let step = |o: &Output| format!("write:{}", o.written);
    if let Some(Part::Shards { k, n }) = options.part {
        // Parts run side by side: no output lock; each writes only its own
        // shard files.
        let mut driver = Driver::new(c, plan, options, progress);
        for (index, hash) in writes(plan) {
            let output = &c.recipe.outputs[index];
            driver
                .part(output, &hash, k, n)
                .map_err(|e| e.in_step(step(output), output.span))?;
        }
        return Ok(());
    }
    // Every output is locked for the whole run, before anything is
    // computed: a second run into one of them fails at once (E0111)
    // instead of after its calibration and selection.
    let mut locked = Vec::new();
    for (index, hash) in writes(plan) {
        let output = &c.recipe.outputs[index];
        let lock = OutputLock::acquire(&output.path)
            .map_err(|e| ExecError::from(e).in_step(step(output), output.span))?;
        locked.push((output, hash, lock));
    }
    let mut driver = Driver::new(c, plan, options, progress);
    for (output, hash, lock) in locked {
        driver
            .output(output, &hash, lock)
            .map_err(|e| e.in_step(step(output), output.span))?;
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
) -> Result<ModelInfo, ExecError> {
    preflight(c, plan)?;
    let m = &c.recipe.merges[merge.0];
    let mut driver = Driver::new(c, plan, options, progress);
    driver
        .choose(merge)
        .and_then(|()| driver.materialise(merge))
        .map_err(|e| e.in_step(format!("merge:{}", m.name), m.span))
}

/// The state of one run: the plan as selection has made it so far (each
/// merge with `auto` settings gets its winner once chosen), the statistics
/// computed, the selections made.
struct Driver<'c, 'o, 'p> {
    c: &'c Compilation,
    plan: Plan,
    options: &'o RunOptions<'o>,
    stats: Statistics,
    selections: BTreeMap<String, Selection>,
    progress: &'p mut dyn FnMut(Event),
}

impl<'c, 'o, 'p> Driver<'c, 'o, 'p> {
    fn new(
        c: &'c Compilation,
        plan: &Plan,
        options: &'o RunOptions<'o>,
        progress: &'p mut dyn FnMut(Event),
    ) -> Self {
        Driver {
            c,
            plan: plan.clone(),
            options,
            stats: Statistics::default(),
            selections: BTreeMap::new(),
            progress,
        }
    }

    /// Writes `output`, its settings chosen and its statistics computed.
    fn write(&mut self, output: &Output, hash: &str, how: Written) -> Result<(), ExecError> {
        let Driver {
            c,
            plan,
            options,
            stats,
            selections,
            progress,
        } = self;
        let job = writer::Job {
            c,
            plan,
            output,
            hash,
            stats,
            selections,
        };
        match how {
            Written::Whole(lock) => writer::write_output(&job, lock, options, &mut **progress),
            Written::Part(k, n) => writer::write_part(&job, k, n, options, &mut **progress),
        }
    }

    /// Part `k` of `n` of one output: its shards only.
    fn part(&mut self, output: &Output, hash: &str, k: usize, n: usize) -> Result<(), ExecError> {
        self.choose(output.merge)?;
        self.calibrate_for(output.merge)?;
        self.write(output, hash, Written::Part(k, n))
    }

    /// Chooses, calibrates and writes one output, whose lock the run holds.
    fn output(&mut self, output: &Output, hash: &str, lock: OutputLock) -> Result<(), ExecError> {
        if !self.options.force && written_by(&output.path, hash) {
            (self.progress)(Event::UpToDate {
                path: output.path.clone(),
            });
            return Ok(());
        }
        // Refused before any selection or calibration, not after them.
        if !self.options.force && exists(&output.path) {
            return Err(crate::tensors::TensorError::OutputExists(output.path.clone()).into());
        }
        self.choose(output.merge)?;
        // The assembly of a split run computes no tensor.
        if self.options.part != Some(Part::Assemble) {
            self.calibrate_for(output.merge)?;
        }
        self.write(output, hash, Written::Whole(lock))
    }

    /// Chooses the settings of `merge` and of the merges it depends on,
    /// where they have `auto` candidates (dependencies first), and puts each
    /// winner in place in the plan.
    fn choose(&mut self, merge: MergeId) -> Result<(), ExecError> {
        let c = self.c;
        let m = &c.recipe.merges[merge.0];
        for dep in m.dependencies() {
            if let InputRef::Merge(inner) = dep {
                self.choose(inner)?;
            }
        }
        if m.autos.is_empty() || self.selections.contains_key(&m.name) {
            return Ok(());
        }
        let span = m.select.as_ref().map_or(m.span, |s| s.span);
        let in_step = |e: ExecError| e.in_step(format!("select:{}", m.name), span);
        let mut selector =
            Selector::new(c, &self.plan, merge, &self.options.cache).map_err(in_step)?;
        self.score_pending(merge, &mut selector).map_err(in_step)?;
        if let Some(search) = m.searched() {
            self.coordinate_search(merge, search.budget, &mut selector)
                .map_err(in_step)?;
        }
        let (winner, selection) = selector.finish(self.progress).map_err(in_step)?;
        self.selections.insert(m.name.clone(), selection);
        self.plan.choose(merge, winner);
        Ok(())
    }

    /// Scores the selector's candidates that are not in the cache.
    fn score_pending(&mut self, merge: MergeId, selector: &mut Selector) -> Result<(), ExecError> {
        if selector.has_pending() {
            // `auto` values are numbers: every candidate needs the same
            // statistics (computed once; later calls find them).
            self.calibrate_for(merge)?;
            selector.score(&self.plan, &self.stats, self.options)?;
        }
        Ok(())
    }

    /// Coordinate descent over the merge's `auto` sites from the plan's
    /// start candidate: each site in turn is tried at all its values with
    /// the others held, and moves to the best if it beats the current
    /// point; rounds repeat while one improves, until `budget` candidates
    /// have been scored (cached ones count, so a rerun walks the same path
    /// from the cache and a larger budget goes on from where it stopped).
    fn coordinate_search(
        &mut self,
        merge: MergeId,
        budget: usize,
        selector: &mut Selector,
    ) -> Result<(), ExecError> {
        let c = self.c;
        let sites: Vec<usize> = c.recipe.merges[merge.0]
            .autos
            .iter()
            .map(|a| a.values.len())
            .collect();
        let Some(start) = self.plan.variants.get(&merge).and_then(|v| v.first()) else {
            return Ok(());
        };
        let mut current = (start.choice.clone(), 0usize);
        let mut scored = 1;
        loop {
            let mut improved = false;
            for (site, &values) in sites.iter().enumerate() {
                let mut tried = vec![current.1];
                for value in (0..values).filter(|&v| v != current.0[site]) {
                    if scored >= budget {
                        break;
                    }
                    let mut choice = current.0.clone();
                    choice[site] = value;
                    let before = self.plan.variants.get(&merge).map_or(0, Vec::len);
                    let index = self
                        .plan
                        .add_variant(&c.recipe, &c.inventory, merge, choice);
                    if index >= before {
                        scored += 1;
                    }
                    tried.push(index);
                }
                selector.sync(&self.plan, &self.options.cache);
                self.score_pending(merge, selector)?;
                let best = tried
                    .iter()
                    .copied()
                    .filter_map(|i| Some((selector.rank(i)?, i)))
                    .min_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
                if let Some((_, i)) = best
                    && i != current.1
                {
                    current = (self.plan.variants[&merge][i].choice.clone(), i);
                    improved = true;
                }
            }
            if !improved || scored >= budget {
                return Ok(());
            }
        }
    }

    /// Computes (or reads from the cache) every statistic `merge` needs. An
    /// input that is itself a merge is first written whole into the cache.
    fn calibrate_for(&mut self, merge: MergeId) -> Result<(), ExecError> {
        let c = self.c;
        for (input, data, moments) in calibrations(c, &self.plan, merge) {
            let in_step = |e: ExecError| {
                e.in_step(
                    calibrate_step_id(&c.recipe, input, data, moments),
                    c.recipe.data[data.0].span,
                )
            };
            match moments {
                Moments::Diagonal if !self.stats.contains(input, data) => {
                    let stats = self.calibrate(input, data, moments).map_err(in_step)?;
                    let Calibration::Diagonal(stats) = stats else {
                        unreachable!("asked for Σ x²")
                    };
                    self.stats.insert(input, data, stats);
                }
                Moments::Gram if !self.stats.contains_grams(input, data) => {
                    let grams = self.calibrate(input, data, moments).map_err(in_step)?;
                    let Calibration::Gram(grams) = grams else {
                        unreachable!("asked for Σ x xᵀ")
                    };
                    self.stats.insert_grams(input, data, grams);
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The statistics of `input` on `data`, from the cache or computed.
    fn calibrate(
        &mut self,
        input: InputRef,
        data: DataId,
        moments: Moments,
    ) -> Result<Calibration, ExecError> {
        let c = self.c;
        let recipe = &c.recipe;
        let source = &recipe.data[data.0];
        let fail = |failure: CalibrationFailure| ExecError::Calibration {
            input: recipe.input_name(input).to_string(),
            data: source.name.clone(),
            source: Box::new(failure),
        };
        let info = match input {
            InputRef::Model(m) => c
                .inventory
                .get(m)
                .cloned()
                .ok_or_else(|| fail(CalibrationFailure::Unavailable))?,
            InputRef::Merge(m) => self.materialise(m)?,
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
        let tokenizer = data::Tokenizer::from_dir(&tokenizer_dir).map_err(|e| fail(e.into()))?;
        let sequences = data::sequences(source, &tokenizer).map_err(|e| fail(e.into()))?;
        let key = calibrate::moments_key(moments, &info, &sequences);
        let started = Instant::now();
        let cached = match moments {
            Moments::Diagonal => {
                ActStats::load(&calibrate::cache_path(&self.options.cache, &key), "")
                    .ok()
                    .map(Calibration::Diagonal)
            }
            Moments::Gram => Grams::load(&calibrate::gram_path(&self.options.cache, &key))
                .ok()
                .map(Calibration::Gram),
        };
        let was_cached = cached.is_some();
        let result = match cached {
            Some(result) => result,
            None => {
                (self.progress)(Event::CalibrationStarted {
                    input: recipe.input_name(input).to_string(),
                    data: source.name.clone(),
                    sequences: sequences.len(),
                    tokens: sequences.iter().map(Vec::len).sum(),
                });
                let device = self.options.device.candle();
                match moments {
                    Moments::Diagonal => {
                        let s = calibrate::calibrate(&info, &sequences, device)
                            .map_err(|e| fail(e.into()))?;
                        s.save(&calibrate::cache_path(&self.options.cache, &key))
                            .map_err(|e| fail(e.into()))?;
                        Calibration::Diagonal(s)
                    }
                    Moments::Gram => {
                        let dir = calibrate::gram_path(&self.options.cache, &key);
                        Calibration::Gram(
                            calibrate::gram(&info, &sequences, device, &dir)
                                .map_err(|e| fail(e.into()))?,
                        )
                    }
                }
            }
        };
        (self.progress)(Event::Calibrated {
            input: recipe.input_name(input).to_string(),
            data: source.name.clone(),
            tokens: match &result {
                Calibration::Diagonal(s) => s.tokens,
                Calibration::Gram(g) => g.tokens,
            },
            seconds: started.elapsed().as_secs_f64(),
            cached: was_cached,
        });
        Ok(result)
    }

    /// Writes a merge whole into the cache (keyed by its plan step's hash)
    /// so that it can be calibrated, and opens it.
    fn materialise(&mut self, merge: MergeId) -> Result<ModelInfo, ExecError> {
        let step = self.plan.step_hash(StepKind::Merge(merge)).to_string();
        let dir = self
            .options
            .cache
            .join("merges")
            .join(&step[..step.len().min(32)]);
        if !written_by(&dir, &step) {
            // Another run materialising the same merge (or another part of
            // this split run) holds the lock: wait for it, then use what it
            // wrote.
            let lock = loop {
                match OutputLock::acquire(&dir) {
                    Ok(lock) => break lock,
                    Err(crate::tensors::TensorError::Busy { .. })
                        if !self
                            .options
                            .cancel
                            .load(std::sync::atomic::Ordering::Relaxed) =>
                    {
                        std::thread::sleep(std::time::Duration::from_millis(500));
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            if written_by(&dir, &step) {
                drop(lock);
                return crate::checkpoint::open_dir(&dir).map_err(ExecError::Materialised);
            }
            self.calibrate_for(merge)?;
            let output = Output {
                merge,
                path: dir.clone(),
                written: dir.display().to_string(),
                dtype: Some(Dtype::F32),
                shard_size: u64::MAX,
                tokenizer: None,
                vocabulary: None,
                chat_template: None,
                span: self.c.recipe.merges[merge.0].span,
            };
            let forced = RunOptions {
                force: true,
                cache: self.options.cache.clone(),
                part: None,
                ..*self.options
            };
            let job = writer::Job {
                c: self.c,
                plan: &self.plan,
                output: &output,
                hash: &step,
                stats: &self.stats,
                selections: &BTreeMap::new(),
            };
            writer::write_output(&job, lock, &forced, self.progress)?;
        }
        crate::checkpoint::open_dir(&dir).map_err(ExecError::Materialised)
    }
}

/// How an output is written: whole, under its lock, or one part of a split run.
enum Written {
    Whole(OutputLock),
    Part(usize, usize),
}

/// What one calibration gives.
enum Calibration {
    Diagonal(ActStats),
    Gram(Grams),
}

/// For `--dry-run`: each calibration the outputs need, and whether the cache
/// already holds its statistics.
pub fn calibration_states(c: &Compilation, plan: &Plan, cache: &Path) -> Vec<String> {
    let mut needed = Vec::new();
    for (index, _) in writes(plan) {
        for pair in calibrations(c, plan, c.recipe.outputs[index].merge) {
            if !needed.contains(&pair) {
                needed.push(pair);
            }
        }
    }
    needed
        .into_iter()
        .map(|(input, data, moments)| {
            let recipe = &c.recipe;
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
                                let key = calibrate::moments_key(moments, info, &seqs);
                                let tokens: usize = seqs.iter().map(Vec::len).sum();
                                let cached = match moments {
                                    Moments::Diagonal => {
                                        calibrate::cache_path(cache, &key).is_file()
                                    }
                                    Moments::Gram => calibrate::gram_path(cache, &key)
                                        .join("index.json")
                                        .is_file(),
                                };
                                if cached {
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
            format!(
                "{}: {state}",
                calibrate_step_id(&c.recipe, input, data, moments)
            )
        })
        .collect()
}

/// The (input, data, moments) the statistics OBD and RegMean need to
/// compute `merge`, the merges it depends on first, each once.
fn calibrations(c: &Compilation, plan: &Plan, merge: MergeId) -> Vec<(InputRef, DataId, Moments)> {
    let mut out = Vec::new();
    collect_calibrations(c, plan, merge, &mut out);
    out
}

fn collect_calibrations(
    c: &Compilation,
    plan: &Plan,
    merge: MergeId,
    out: &mut Vec<(InputRef, DataId, Moments)>,
) {
    let m = &c.recipe.merges[merge.0];
    for dep in m.dependencies() {
        if let InputRef::Merge(inner) = dep {
            collect_calibrations(c, plan, inner, out);
        }
    }
    for t in plan
        .tensors
        .get(&merge)
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let Some((using, moments)) = t.op.calibration() else {
            continue;
        };
        for (input, using) in m.inputs.iter().zip(using) {
            if let Some(data) = *using
                && !out.contains(&(input.model, data, moments))
            {
                out.push((input.model, data, moments));
            }
        }
    }
}

/// Before any tensor is computed: every input must be available locally
/// with float tensors (names and shapes were checked by `open`).
fn preflight(c: &Compilation, plan: &Plan) -> Result<(), ExecError> {
    for (&id, tensors) in &plan.tensors {
        let merge = &c.recipe.merges[id.0];
        let step = format!("merge:{}", merge.name);
        for input in merge.dependencies() {
            let Some(model) = c.recipe.shape_source(input) else {
                continue;
            };
            let declared = &c.recipe.models[model.0];
            let Some(info) = c.inventory.get(model) else {
                return Err(ExecError::ModelUnavailable {
                    model: declared.name.clone(),
                    span: declared.span,
                }
                .in_step(step, merge.span));
            };
            // Names and shapes were compared with the base by the open
            // stage (E0024, E0025); what it does not know is what can be merged.
            for t in tensors {
                let Some(found) = info.tensors.get(&t.name) else {
                    continue;
                };
                if found.dtype.float_width().is_none() {
                    return Err(ExecError::Unmergeable {
                        model: declared.name.clone(),
                        file: found.file.clone(),
                        tensor: t.name.clone(),
                        dtype: found.dtype,
                        span: declared.span,
                    }
                    .in_step(step, merge.span));
                }
            }
        }
    }
    Ok(())
}
