//! Choosing among a merge's `auto` candidates (`select by loss(data, ...)`).
//! Each candidate is merged and scored without writing a checkpoint: a
//! forward pass streams through the merge layer by layer, asking for each
//! tensor as it needs it, so memory holds one merged layer plus the
//! activations. The score is the mean next-token loss of each selection data
//! source (the mean over its texts of each text's mean), then the mean over
//! sources; the lowest wins, the earlier candidate on ties. Candidates go
//! through the layers in lockstep, so each input tensor is read once per
//! layer for all of them (memory: one merged layer per candidate plus their
//! activations, and the inputs' current layer). OBD statistics
//! are shared by all candidates, and scores are cached by the candidate's
//! plan hash and the exact token ids, so adding a candidate scores only it.
//! Candidates are scored in f32; the written output is then rounded to its dtype.

use crate::Compilation;
use crate::data;
use crate::model::ModelConfig;
use crate::model::blocks::{self, ForwardError, Source};
use crate::model::stream;
use crate::plan::{Plan, StepKind};
use crate::recipe::{Merge, MergeId};
use crate::run::{self, Evaluator, Event, RunError, RunOptions, Statistics};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CandidateScore {
    pub candidate: String,
    /// Mean loss per selection data source.
    pub losses: Vec<(String, f64)>,
    pub mean: f64,
    #[serde(skip)]
    pub cached: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Selection {
    pub candidates: Vec<CandidateScore>,
    /// Index into `candidates`.
    pub winner: usize,
    pub seconds: f64,
}

/// A merge computed tensor by tensor as a forward pass asks for it.
struct MergedSource<'a> {
    eval: Evaluator<'a>,
    merge: MergeId,
    names: HashSet<String>,
    device: Device,
}

impl Source for MergedSource<'_> {
    fn get(&mut self, name: &str, shape: &[usize]) -> blocks::Result<Tensor> {
        let values = self
            .eval
            .output_tensor(self.merge, name)
            .map_err(|e| ForwardError::Source(e.to_string()))?;
        // Moved, not copied; no buffer is kept for reuse (see release_buffers).
        self.eval.release_buffers();
        Ok(Tensor::from_vec(values, shape, &self.device)?)
    }

    fn has(&self, name: &str) -> bool {
        self.names.contains(name)
    }
}

/// Scores every candidate of merge `id` and returns the winner (the merge
/// with the winning values in place) and the selection's record.
pub fn select(
    c: &Compilation,
    id: MergeId,
    options: &RunOptions,
    stats: &mut Statistics,
    progress: &mut dyn FnMut(Event),
) -> Result<(Merge, Selection), RunError> {
    let started = Instant::now();
    let recipe = &c.recipe;
    let merge = &recipe.merges[id.0];
    let fail = |reason: String| RunError::Selection {
        merge: merge.name.clone(),
        reason,
    };
    let select = merge
        .select
        .as_ref()
        .ok_or_else(|| fail("no `select`".into()))?;
    let base = merge
        .base
        .or_else(|| merge.inputs.first().map(|i| i.model))
        .and_then(|b| recipe.shape_source(b))
        .and_then(|m| c.inventory.get(m))
        .ok_or_else(|| fail("its base is not available locally".into()))?;
    let cfg =
        ModelConfig::of(base).map_err(|e| fail(format!("cannot run the merge forward: {e}")))?;
    let tokenizer = data::Tokenizer::from_dir(&base.dir).map_err(|e| fail(e.to_string()))?;
    let mut sources = Vec::new();
    for d in &select.data {
        let source = &recipe.data[d.0];
        let seqs: Vec<Vec<u32>> = data::sequences(source, &tokenizer)
            .map_err(|e| fail(e.to_string()))?
            .into_iter()
            .filter(|s| s.len() >= 2)
            .collect();
        if seqs.is_empty() {
            return Err(fail(format!(
                "data `{}` has no text of 2 tokens or more",
                source.name
            )));
        }
        sources.push((source.name.clone(), seqs));
    }
    let all: Vec<Vec<u32>> = sources
        .iter()
        .flat_map(|(_, s)| s.iter().cloned())
        .collect();
    let choices = merge.candidates();
    let mut scores: Vec<Option<CandidateScore>> = Vec::with_capacity(choices.len());
    // Candidates not in the cache: their recipes, plans and cache paths.
    let mut pending = Vec::new();
    for (i, choice) in choices.iter().enumerate() {
        let mut c2 = c.clone();
        c2.recipe.merges[id.0] = merge.with_candidate(choice);
        let p2 = Plan::lower(&c2.recipe, &c2.inventory);
        let label = merge.describe(choice);
        let path = score_path(&options.cache, &p2, id, &all);
        let cached = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str::<CandidateScore>(&t).ok());
        match cached {
            Some(mut s) => {
                s.cached = true;
                s.candidate = label;
                scores.push(Some(s));
            }
            None => {
                run::calibrate_for(&c2, &p2, id, options, stats, progress)?;
                scores.push(None);
                pending.push((i, label, path, c2, p2));
            }
        }
    }
    // Every pending candidate advances through the layers in lockstep, so
    // each input tensor is read once per layer for all of them.
    let shared = run::SharedInputs::default();
    let stats: &Statistics = stats;
    let mut merged: Vec<MergedSource> = pending
        .iter()
        .map(|(_, _, _, c2, p2)| MergedSource {
            eval: Evaluator::new(c2, p2, stats, id).with_shared(shared.clone()),
            merge: id,
            names: p2
                .tensors
                .get(&id)
                .map(|ts| ts.iter().map(|t| t.name.clone()).collect())
                .unwrap_or_default(),
            device: Device::Cpu,
        })
        .collect();
    let mut refs: Vec<&mut dyn Source> = merged.iter_mut().map(|m| m as &mut dyn Source).collect();
    let losses = stream::nll_many(&cfg, &mut refs, &all, &mut || shared.borrow_mut().clear())
        .map_err(|e| fail(e.to_string()))?;
    for ((i, label, path, _, _), losses) in pending.iter().zip(losses) {
        let mut per_source = Vec::new();
        let mut at = 0;
        for (name, seqs) in &sources {
            let part = &losses[at..at + seqs.len()];
            per_source.push((name.clone(), part.iter().sum::<f64>() / part.len() as f64));
            at += seqs.len();
        }
        let mean = per_source.iter().map(|(_, l)| l).sum::<f64>() / per_source.len() as f64;
        let s = CandidateScore {
            candidate: label.clone(),
            losses: per_source,
            mean,
            cached: false,
        };
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = std::fs::write(path, serde_json::to_string(&s).unwrap_or_default());
        scores[*i] = Some(s);
    }
    drop(refs);
    drop(merged);
    let scores: Vec<(&Vec<usize>, CandidateScore)> =
        choices.iter().zip(scores.into_iter().flatten()).collect();
    for (_, score) in &scores {
        progress(Event::CandidateScored {
            merge: merge.name.clone(),
            candidate: score.candidate.clone(),
            losses: score.losses.clone(),
            mean: score.mean,
            cached: score.cached,
        });
    }
    let mut winner = 0;
    for (i, (_, s)) in scores.iter().enumerate() {
        if s.mean < scores[winner].1.mean {
            winner = i;
        }
    }
    let chosen = merge.with_candidate(scores[winner].0);
    let selection = Selection {
        candidates: scores.into_iter().map(|(_, s)| s).collect(),
        winner,
        seconds: started.elapsed().as_secs_f64(),
    };
    progress(Event::Selected {
        merge: merge.name.clone(),
        candidate: selection.candidates[winner].candidate.clone(),
        mean: selection.candidates[winner].mean,
        seconds: selection.seconds,
    });
    Ok((chosen, selection))
}

/// Where a candidate's score is cached: its merge step's hash (settings,
/// inputs, statistics) and the selection tokens.
fn score_path(cache: &std::path::Path, plan: &Plan, id: MergeId, tokens: &[Vec<u32>]) -> PathBuf {
    let mut h = blake3::Hasher::new();
    h.update(b"obim candidate loss v1\0");
    h.update(plan.step_hash(StepKind::Merge(id)).as_bytes());
    crate::calibrate::hash_tokens(&mut h, tokens);
    cache
        .join("scores")
        .join(format!("{}.json", &h.finalize().to_hex()[..32]))
}
