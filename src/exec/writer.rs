//! Writes one output: tensors computed by the [`Evaluator`] are encoded and
//! appended to staged shards on a thread of their own (tensor i is written
//! while tensor i + 1 is computed), the inputs' file hashes are computed on
//! another; then `config.json`, the tokenizer and generation files, the
//! typed [`Report`] and the model card (`card.rs`) are added and the staging
//! directory is renamed into place.

use super::error::ExecError;
use super::evaluator::Evaluator;
use super::event::Event;
use super::report::{InputRecord, RecipeRecord, Report, SolveRecord};
use super::select::Selection;
use super::stats::Statistics;
use super::{Part, RunOptions};
use crate::Compilation;
use crate::checkpoint::ModelInfo;
use crate::plan::{Plan, PlannedTensor};
use crate::recipe::{Dtype, ModelId, Output};
use crate::staging::{OutputLock, Staging};
use crate::tensors::{self, CheckpointWriter, TensorError, TensorSpec};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// One output to write, and what computing it needs.
pub(super) struct Job<'a> {
    pub c: &'a Compilation,
    pub plan: &'a Plan,
    pub output: &'a Output,
    /// The write step's hash.
    pub hash: &'a str,
    pub stats: &'a Statistics,
    pub selections: &'a BTreeMap<String, Selection>,
}

impl<'a> Job<'a> {
    /// The output's planned tensors, the checkpoint it takes its config and
    /// tokenizer from, and its dtype.
    fn planned(&self) -> Result<(&'a [PlannedTensor], &'a ModelInfo, Dtype), ExecError> {
        let tensors = self
            .plan
            .tensors
            .get(&self.output.merge)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let base = base_of(self.c, self.output)?;
        let dtype = self
            .output
            .dtype
            .unwrap_or_else(|| Dtype::of_checkpoint(base.dtype()));
        Ok((tensors, base, dtype))
    }
}

/// Writes `job`'s output into a staging directory and renames it into
/// place; `lock` is the output's, which the caller took.
pub(super) fn write_output(
    job: &Job,
    lock: OutputLock,
    options: &RunOptions,
    progress: &mut dyn FnMut(Event),
) -> Result<(), ExecError> {
    let started = Instant::now();
    let Job { c, output, .. } = *job;
    let (tensors, base, dtype) = job.planned()?;
    let staging = Staging::locked(lock, options.force)?;
    let mut eval = Evaluator::new(c, job.plan, job.stats, output.merge)
        .allowing_non_finite(options.allow_non_finite);
    let target = Target {
        dir: staging.dir(),
        dtype,
        shard_size: output.shard_size,
        output,
        tensors,
        part: None,
    };
    let mut assembled = PartRecord::default();
    let (shards, inputs) = if options.part == Some(Part::Assemble) {
        let (shards, parts) = assemble(&target, job.hash)?;
        assembled = parts;
        let infos = models_read(c, &eval);
        let stop = AtomicBool::new(false);
        let hashes = crate::provenance::models(
            &infos.iter().map(|(_, i)| *i).collect::<Vec<_>>(),
            &options.cache,
            &stop,
        )?;
        (shards, input_records(c, &infos, hashes))
    } else {
        stream_and_hash(c, &mut eval, target, options, progress)?
    };
    let tokenizer_dir = output
        .tokenizer
        .and_then(|t| c.recipe.shape_source(t))
        .and_then(|m| c.inventory.get(m))
        .map_or(&base.dir, |i| &i.dir);
    let vocabulary = c.inventory.vocabularies.get(&output.merge);
    write_config(
        staging.dir(),
        base,
        dtype,
        &c.recipe.merges[output.merge.0].slices,
        vocabulary.map(|v| v.size),
    )?;
    copy_side_files(&base.dir, tokenizer_dir, staging.dir())?;
    super::tokenizer::write_tokenizer(c, output, vocabulary.map(|v| &**v), staging.dir())?;
    let bytes = shard_bytes(tensors, dtype);
    let root = c.sources.get(c.recipe.root);
    let report = Report {
        obim_version: env!("CARGO_PKG_VERSION").into(),
        recipe: RecipeRecord {
            path: root.name.clone(),
            blake3: blake3::hash(root.text.as_bytes()).to_hex().to_string(),
            text: root.text.clone(),
        },
        merge: c.recipe.merges[output.merge.0].name.clone(),
        plan_hash: job.hash.to_string(),
        device: options.device.name().to_string(),
        threads: rayon::current_num_threads(),
        seconds: (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
        bytes,
        shards,
        inputs,
        positions_won: match options.part {
            Some(Part::Assemble) => std::mem::take(&mut assembled.positions_won),
            _ => positions_won(c, &eval),
        },
        selection: job.selections.clone(),
        regmean: match options.part {
            Some(Part::Assemble) => std::mem::take(&mut assembled.regmean),
            _ => solves(c, &eval),
        },
    };
    if let Some(message) = conditioning_warning(&report) {
        progress(Event::Warning { message });
    }
    let path = staging.dir().join(Report::FILE);
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&report).unwrap_or_default(),
    )
    .map_err(|source| TensorError::Write { path, source })?;
    let path = staging.dir().join("README.md");
    std::fs::write(&path, super::card::model_card(c, output.merge, &report))
        .map_err(|source| TensorError::Write { path, source })?;
    // Once the new output is in place nothing fails: an old output that
    // could not be removed stays beside it under a name of its own, which
    // the next run into this output removes; the caller is told.
    let committed = staging.commit()?;
    if options.part == Some(Part::Assemble) {
        // The output holds the shards now (linked): the parts are done.
        let _ = std::fs::remove_dir_all(super::parts_dir(&output.path));
    }
    if let Some(leftover) = committed {
        progress(Event::Warning {
            message: crate::errors::with_causes(&leftover),
        });
    }
    progress(Event::OutputWritten {
        path: output.path.clone(),
        seconds: started.elapsed().as_secs_f64(),
        bytes,
    });
    Ok(())
}

/// Part `k` of `n` of `job`'s output: computes and writes only its shards,
/// into the parts directory beside the output.
pub(super) fn write_part(
    job: &Job,
    k: usize,
    n: usize,
    options: &RunOptions,
    progress: &mut dyn FnMut(Event),
) -> Result<(), ExecError> {
    let Job { c, output, .. } = *job;
    let (tensors, _, dtype) = job.planned()?;
    let dir = super::parts_dir(&output.path);
    std::fs::create_dir_all(&dir).map_err(|source| TensorError::Write {
        path: dir.clone(),
        source,
    })?;
    let mut eval = Evaluator::new(c, job.plan, job.stats, output.merge)
        .allowing_non_finite(options.allow_non_finite);
    let target = Target {
        dir: &dir,
        dtype,
        shard_size: output.shard_size,
        output,
        tensors,
        part: Some((k, n)),
    };
    stream(&mut eval, target, options.cancel, progress)?;
    // What the assembly needs to know of this part: which plan wrote which
    // shards, and what the report gets from computing them.
    let mut layout = CheckpointWriter::new(&dir, dtype, specs(tensors, dtype), output.shard_size);
    let (_, range) = layout.part(k, n);
    let record = PartRecord {
        plan_hash: job.hash.to_string(),
        shards: layout.shard_files()[range]
            .iter()
            .map(|(name, _)| name.clone())
            .collect(),
        positions_won: positions_won(c, &eval),
        regmean: solves(c, &eval),
    };
    let path = dir.join(format!("part-{k}-of-{n}.json"));
    let staged = dir.join(format!("part-{k}-of-{n}.json.partial"));
    std::fs::write(&staged, serde_json::to_string(&record).unwrap_or_default())
        .and_then(|()| std::fs::rename(&staged, &path))
        .map_err(|source| TensorError::Write { path, source })?;
    Ok(())
}

/// What one part of a split run wrote (`part-K-of-N.json` in the parts
/// directory): the assembly takes only the shards of parts of its own plan.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct PartRecord {
    plan_hash: String,
    shards: Vec<String>,
    positions_won: BTreeMap<String, BTreeMap<String, BTreeMap<String, u64>>>,
    regmean: BTreeMap<String, BTreeMap<String, SolveRecord>>,
}

/// `--assemble`: every shard the parts of this plan (`hash`) wrote, checked
/// whole (its exact size) and linked into the staging directory, and the
/// index beside them; with what the parts' records give the report.
fn assemble(target: &Target, hash: &str) -> Result<(Vec<String>, PartRecord), ExecError> {
    let writer = CheckpointWriter::new(
        target.dir,
        target.dtype,
        specs(target.tensors, target.dtype),
        target.shard_size,
    );
    let parts = super::parts_dir(&target.output.path);
    let mut merged = PartRecord::default();
    let mut covered = std::collections::HashSet::new();
    for entry in std::fs::read_dir(&parts).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if !(name.starts_with("part-") && name.ends_with(".json")) {
            continue;
        }
        let Some(record) = std::fs::read_to_string(entry.path())
            .ok()
            .and_then(|t| serde_json::from_str::<PartRecord>(&t).ok())
            .filter(|r| r.plan_hash == hash)
        else {
            continue; // another plan's part, or unreadable: its shards do not count
        };
        covered.extend(record.shards);
        for (merge, tensors) in record.positions_won {
            merged
                .positions_won
                .entry(merge)
                .or_default()
                .extend(tensors);
        }
        for (merge, tensors) in record.regmean {
            merged.regmean.entry(merge).or_default().extend(tensors);
        }
    }
    let files = writer.shard_files();
    for (name, size) in &files {
        let from = parts.join(name);
        let found = std::fs::metadata(&from).map(|m| m.len()).ok();
        let problem = match found {
            _ if !covered.contains(name) => Some(
                "no part of this plan wrote it: run `obim run --part K/N` for every K first (parts of an earlier recipe do not count)".to_string(),
            ),
            Some(n) if n != *size => Some(format!("{n} bytes, expected {size}")),
            None => Some("missing from the parts directory".to_string()),
            _ => None,
        };
        if let Some(reason) = problem {
            return Err(TensorError::Tensor {
                path: from,
                tensor: name.clone(),
                reason,
            }
            .into());
        }
    }
    // Linked, not moved: until the output is committed the parts stay whole,
    // so a failed assembly loses nothing.
    for (name, _) in &files {
        let (from, to) = (parts.join(name), target.dir.join(name));
        std::fs::hard_link(&from, &to)
            .or_else(|_| std::fs::copy(&from, &to).map(|_| ()))
            .map_err(|source| TensorError::Write { path: to, source })?;
    }
    writer.write_index()?;
    let names = files.into_iter().map(|(n, _)| n).collect();
    Ok((names, merged))
}

fn specs(tensors: &[PlannedTensor], dtype: Dtype) -> Vec<TensorSpec> {
    tensors
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            shape: t.info.shape.clone(),
            bytes: (t.info.numel() * tensors::dtype_bytes(dtype)) as u64,
        })
        .collect()
}

/// The models (not merges) the output reads.
fn models_read<'c>(c: &'c Compilation, eval: &Evaluator) -> Vec<(ModelId, &'c ModelInfo)> {
    eval.models_read()
        .into_iter()
        .filter_map(|m| c.inventory.get(m).map(|i| (m, i)))
        .collect()
}

/// The report's record of each input read, with its files' hashes.
fn input_records(
    c: &Compilation,
    models: &[(ModelId, &ModelInfo)],
    hashes: Vec<Vec<crate::provenance::FileHash>>,
) -> Vec<InputRecord> {
    models
        .iter()
        .zip(hashes)
        .map(|((m, info), files)| {
            let declared = &c.recipe.models[m.0];
            InputRecord {
                name: declared.name.clone(),
                source: declared.source.clone(),
                path: Some(info.dir.display().to_string()),
                files,
            }
        })
        .collect()
}

/// Streams the tensors into the staged shards while the inputs' weight
/// files are hashed on a thread of their own (for the report); returns the
/// shard names and the records of the inputs read.
fn stream_and_hash(
    c: &Compilation,
    eval: &mut Evaluator,
    target: Target,
    options: &RunOptions,
    progress: &mut dyn FnMut(Event),
) -> Result<(Vec<String>, Vec<InputRecord>), ExecError> {
    let models = models_read(c, eval);
    let infos: Vec<&ModelInfo> = models.iter().map(|(_, i)| *i).collect();
    let stop = AtomicBool::new(false);
    let (shards, hashes) = std::thread::scope(|scope| {
        let hashing = scope.spawn(|| crate::provenance::models(&infos, &options.cache, &stop));
        let shards = stream(eval, target, options.cancel, progress);
        if shards.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        (shards, hashing.join())
    });
    let shards = shards?;
    let hashes = hashes.map_err(|_| ExecError::Thread("input hashing"))??;
    Ok((shards, input_records(c, &models, hashes)))
}

/// The checkpoint whose config, tokenizer and dtype the output takes: the
/// merge's base, else its first input (through merges to a model).
fn base_of<'c>(c: &'c Compilation, output: &Output) -> Result<&'c ModelInfo, ExecError> {
    let recipe = &c.recipe;
    let merge = &recipe.merges[output.merge.0];
    // A stacked merge is shaped like its first slice's first source, as in mergekit.
    let first_source = merge
        .slices
        .first()
        .and_then(|s| s.sources.first())
        .and_then(|s| match s.input {
            None => merge.base,
            Some(i) => merge.inputs.get(i).map(|x| x.model),
        });
    let model = first_source
        .or_else(|| merge.shape_input())
        .and_then(|b| recipe.shape_source(b));
    let declared = model.map(|m| &recipe.models[m.0]);
    model
        .and_then(|m| c.inventory.get(m))
        .ok_or_else(|| ExecError::ModelUnavailable {
            model: declared.map_or_else(|| merge.name.clone(), |m| m.name.clone()),
            span: declared.map_or(merge.span, |m| m.span),
        })
}

fn shard_bytes(tensors: &[PlannedTensor], dtype: Dtype) -> u64 {
    tensors
        .iter()
        .map(|t| (t.info.numel() * tensors::dtype_bytes(dtype)) as u64)
        .sum()
}

/// Where the tensors go.
struct Target<'a> {
    dir: &'a Path,
    dtype: Dtype,
    shard_size: u64,
    output: &'a Output,
    tensors: &'a [PlannedTensor],
    /// Part `k` of `n`: only its shards.
    part: Option<(usize, usize)>,
}

/// Computes every tensor and writes it into the staged shards; returns the
/// shard file names.
fn stream(
    eval: &mut Evaluator,
    target: Target,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(Event),
) -> Result<Vec<String>, ExecError> {
    let Target {
        dir,
        dtype,
        shard_size,
        output,
        tensors,
        part,
    } = target;
    let mut writer = CheckpointWriter::new(dir, dtype, specs(tensors, dtype), shard_size);
    let tensors = match part {
        Some((k, n)) => &tensors[writer.part(k, n).0],
        None => tensors,
    };
    progress(Event::OutputStarted {
        path: output.path.clone(),
        tensors: tensors.len(),
        bytes: shard_bytes(tensors, dtype),
        shards: writer.shard_count(),
    });
    std::thread::scope(|scope| {
        // Two byte buffers take turns between this thread and the writer's.
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
        let computed = (|| -> Result<(), ExecError> {
            let mut free = vec![Vec::new(), Vec::new()];
            for t in tensors {
                if cancel.load(Ordering::Relaxed) {
                    return Err(ExecError::Interrupted(output.path.clone()));
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
            .map_err(|_| ExecError::Thread("shard writer"))?;
        computed?;
        Ok(written?)
    })
}

/// The base's config.json with the output dtype and vocabulary size, and
/// for a stacked merge its layers: `num_hidden_layers`, and every per-layer list (such as
/// `layer_types`) rebuilt from the layers the output's come from.
fn write_config(
    dir: &Path,
    base: &ModelInfo,
    dtype: Dtype,
    slices: &[crate::recipe::Slice],
    vocab_size: Option<usize>,
) -> Result<(), ExecError> {
    let mut config = base.config.clone();
    if let Some(object) = config.as_object_mut() {
        if let Some(size) = vocab_size {
            object.insert("vocab_size".into(), size.into());
        }
        let from: Vec<usize> = slices
            .iter()
            .filter_map(|s| s.sources.first())
            .flat_map(|s| s.start..s.end)
            .collect();
        let layers = object
            .get("num_hidden_layers")
            .and_then(serde_json::Value::as_u64)
            .map(|n| n as usize);
        if let (false, Some(layers)) = (from.is_empty(), layers) {
            // Per-layer lists (`layer_types`, `mlp_only_layers`, ...): named
            // for layers and one entry per layer.
            for (_, value) in object.iter_mut().filter(|(k, _)| k.contains("layer")) {
                if let Some(list) = value.as_array().filter(|l| l.len() == layers) {
                    *value = from
                        .iter()
                        .map(|i| list.get(*i).cloned().unwrap_or_default())
                        .collect();
                }
            }
            object.insert("num_hidden_layers".into(), from.len().into());
        }
        let has_dtype = object.contains_key("dtype");
        if has_dtype || !object.contains_key("torch_dtype") {
            object.insert("dtype".into(), dtype.config_name().into());
        }
        if object.contains_key("torch_dtype") {
            object.insert("torch_dtype".into(), dtype.config_name().into());
        }
    }
    let path = dir.join("config.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&config).unwrap_or_default() + "\n",
    )
    .map_err(|source| TensorError::Write { path, source }.into())
}

/// The tokenizer files (from `tokenizer`) and `generation_config.json` (from the base).
fn copy_side_files(base: &Path, tokenizer: &Path, out: &Path) -> Result<(), ExecError> {
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

/// RegMean's solves, by merge and tensor.
fn solves(c: &Compilation, eval: &Evaluator) -> BTreeMap<String, BTreeMap<String, SolveRecord>> {
    eval.solves()
        .iter()
        .map(|(id, per_tensor)| {
            let tensors = per_tensor
                .iter()
                .map(|(tensor, s)| {
                    let record = SolveRecord {
                        ridge: s.ridge,
                        condition: s.condition,
                    };
                    (tensor.clone(), record)
                })
                .collect();
            (c.recipe.merges[id.0].name.clone(), tensors)
        })
        .collect()
}

/// Above this (a lower bound of) condition number, f64 keeps fewer than
/// about 4 of its 16 digits in RegMean's solve.
const BADLY_CONDITIONED: f64 = 1e12;

/// Says which RegMean layers needed a ridge or are badly conditioned.
fn conditioning_warning(report: &Report) -> Option<String> {
    let mut ridged = Vec::new();
    let mut ill = Vec::new();
    for (merge, tensors) in &report.regmean {
        for (tensor, s) in tensors {
            if s.ridge > 0.0 {
                ridged.push((merge, tensor, s.ridge));
            } else if s.condition > BADLY_CONDITIONED {
                ill.push((merge, tensor, s.condition));
            }
        }
    }
    let worst = |v: &[(&String, &String, f64)]| {
        v.iter()
            .max_by(|a, b| a.2.total_cmp(&b.2))
            .map(|(m, t, x)| format!("`{m}` `{t}`: {x:.1e}"))
    };
    let mut parts = Vec::new();
    if let Some(w) = worst(&ridged) {
        parts.push(format!(
            "{} RegMean layers' Gram sums were not positive definite and got a ridge (largest, relative to the mean diagonal, {w})",
            ridged.len()
        ));
    }
    if let Some(w) = worst(&ill) {
        parts.push(format!(
            "{} RegMean layers are badly conditioned (condition ≥ {}, worst {w})",
            ill.len(),
            BADLY_CONDITIONED
        ));
    }
    (!parts.is_empty()).then(|| {
        format!(
            "{}; a smaller `alpha` (or `alpha auto`) keeps the systems well posed; every layer is in obim-report.json",
            parts.join("; ")
        )
    })
}

/// The evaluator's OBIM counts, by merge, tensor and input name.
fn positions_won(
    c: &Compilation,
    eval: &Evaluator,
) -> BTreeMap<String, BTreeMap<String, BTreeMap<String, u64>>> {
    let recipe = &c.recipe;
    eval.positions_won()
        .iter()
        .map(|(id, per_tensor)| {
            let merge = &recipe.merges[id.0];
            let tensors = per_tensor
                .iter()
                .map(|(tensor, counts)| {
                    let by_input = merge
                        .inputs
                        .iter()
                        .map(|i| recipe.input_name(i.model).to_string())
                        .zip(counts.iter().copied())
                        .collect();
                    (tensor.clone(), by_input)
                })
                .collect();
            (merge.name.clone(), tensors)
        })
        .collect()
}
