//! Choosing among a merge's `auto` candidates (`select by loss(data, ...)`).
//! The driver builds a [`Selector`], calibrates what its pending candidates
//! need, and asks it to score them; the selector never calls back up.
//!
//! Each candidate is merged and scored without writing a checkpoint: a
//! forward pass streams through the merge layer by layer, asking for each
//! tensor as it needs it, so memory holds one merged layer plus the
//! activations. The score is the mean next-token loss of each selection data
//! source (the mean over its texts of each text's mean), then the mean over
//! sources; the lowest wins, the earlier candidate on ties. Candidates go
//! through the layers in lockstep, so each input tensor is read once per
//! layer for all of them. OBD statistics are shared by all candidates, and
//! scores are cached by the candidate's plan hash and the exact token ids, so
//! adding a candidate scores only it. Candidates are scored in f32; the
//! written output is then rounded to its dtype.

use super::RunOptions;
use super::error::{ExecError, SelectionFailure};
use super::evaluator::{Evaluator, SharedInputs};
use super::event::Event;
use super::stats::Statistics;
use crate::Compilation;
use crate::data;
use crate::model::ModelConfig;
use crate::model::blocks::{self, ForwardError, Source};
use crate::model::stream;
use crate::plan::{Plan, Variant};
use crate::recipe::MergeId;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
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

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Selection {
    pub candidates: Vec<CandidateScore>,
    /// Index into `candidates`.
    pub winner: usize,
    pub seconds: f64,
}

/// One candidate (an index into the plan's variants of the merge) and its
/// score once known.
struct Candidate {
    variant: usize,
    label: String,
    score: Option<CandidateScore>,
    /// Where its score is cached.
    path: PathBuf,
}

/// The selection of one merge's settings.
pub(super) struct Selector<'a> {
    c: &'a Compilation,
    id: MergeId,
    started: Instant,
    config: ModelConfig,
    /// The token sequences of each selection data source.
    sources: Vec<(String, Vec<Vec<u32>>)>,
    candidates: Vec<Candidate>,
}

impl<'a> Selector<'a> {
    /// Reads the selection data and every cached score of merge `id`'s
    /// candidates (the plan's variants of it).
    pub(super) fn new(
        c: &'a Compilation,
        plan: &Plan,
        id: MergeId,
        cache: &Path,
    ) -> Result<Self, ExecError> {
        let started = Instant::now();
        let recipe = &c.recipe;
        let merge = &recipe.merges[id.0];
        let fail = |source| ExecError::Selection {
            merge: merge.name.clone(),
            source: Box::new(source),
        };
        let base = merge
            .shape_input()
            .and_then(|b| recipe.shape_source(b))
            .and_then(|m| c.inventory.get(m))
            .ok_or_else(|| fail(SelectionFailure::BaseUnavailable))?;
        let config = ModelConfig::of(base).map_err(|e| fail(SelectionFailure::Config(e)))?;
        let tokenizer =
            data::Tokenizer::from_dir(&base.dir).map_err(|e| fail(SelectionFailure::Data(e)))?;
        let mut sources = Vec::new();
        for d in merge.select.iter().flat_map(|s| &s.data) {
            let source = &recipe.data[d.0];
            let seqs: Vec<Vec<u32>> = data::sequences(source, &tokenizer)
                .map_err(|e| fail(SelectionFailure::Data(e)))?
                .into_iter()
                .filter(|s| s.len() >= 2)
                .collect();
            if seqs.is_empty() {
                return Err(fail(SelectionFailure::TooShort(source.name.clone())));
            }
            sources.push((source.name.clone(), seqs));
        }
        let mut selector = Selector {
            c,
            id,
            started,
            config,
            sources,
            candidates: Vec::new(),
        };
        let all = selector.tokens();
        for (index, variant) in variants(plan, id).iter().enumerate() {
            let path = variant.score_path(cache, &all);
            let cached = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| serde_json::from_str::<CandidateScore>(&t).ok())
                .map(|s| CandidateScore {
                    cached: true,
                    candidate: variant.label.clone(),
                    ..s
                });
            selector.candidates.push(Candidate {
                variant: index,
                label: variant.label.clone(),
                score: cached,
                path,
            });
        }
        Ok(selector)
    }

    fn tokens(&self) -> Vec<Vec<u32>> {
        self.sources
            .iter()
            .flat_map(|(_, s)| s.iter().cloned())
            .collect()
    }

    /// Whether some candidate is not in the cache (so the driver must
    /// calibrate what the merge needs before [`Selector::score`]).
    pub(super) fn has_pending(&self) -> bool {
        self.candidates.iter().any(|c| c.score.is_none())
    }

    /// Scores every pending candidate (all advance through the layers in
    /// lockstep, so each input tensor is read once per layer for all of
    /// them) and caches the scores.
    pub(super) fn score(
        &mut self,
        plan: &Plan,
        stats: &Statistics,
        options: &RunOptions,
    ) -> Result<(), ExecError> {
        let id = self.id;
        let merge_name = self.c.recipe.merges[id.0].name.clone();
        let all = self.tokens();
        let shared = SharedInputs::default();
        let mut merged: Vec<MergedSource> = self
            .candidates
            .iter()
            .filter(|c| c.score.is_none())
            .map(|c| {
                let tensors = &variants(plan, id)[c.variant].tensors;
                MergedSource {
                    eval: Evaluator::new(self.c, plan, stats, id)
                        .allowing_non_finite(options.allow_non_finite)
                        .with_variant(id, tensors)
                        .with_shared(shared.clone()),
                    merge: id,
                    names: tensors.iter().map(|t| t.name.clone()).collect(),
                    device: options.device.candle().clone(),
                }
            })
            .collect();
        if merged.is_empty() {
            return Ok(());
        }
        let mut refs: Vec<&mut dyn Source> =
            merged.iter_mut().map(|m| m as &mut dyn Source).collect();
        let losses = stream::nll_many(&self.config, &mut refs, &all, &mut || {
            shared.borrow_mut().clear()
        })
        .map_err(|e| match e {
            // A fault of an input found while merging (a NaN, a bad tensor)
            // is reported as itself, not as a failed selection.
            ForwardError::Source(source) => match source.downcast::<ExecError>() {
                Ok(exec) => *exec,
                Err(other) => ExecError::Selection {
                    merge: merge_name.clone(),
                    source: Box::new(SelectionFailure::Forward(ForwardError::Source(other))),
                },
            },
            e => ExecError::Selection {
                merge: merge_name.clone(),
                source: Box::new(SelectionFailure::Forward(e)),
            },
        })?;
        drop(refs);
        drop(merged);
        let pending = self.candidates.iter_mut().filter(|c| c.score.is_none());
        for (candidate, losses) in pending.zip(losses) {
            let mut per_source = Vec::new();
            let mut at = 0;
            for (name, seqs) in &self.sources {
                let part = &losses[at..at + seqs.len()];
                per_source.push((name.clone(), part.iter().sum::<f64>() / part.len() as f64));
                at += seqs.len();
            }
            let mean = per_source.iter().map(|(_, l)| l).sum::<f64>() / per_source.len() as f64;
            let score = CandidateScore {
                candidate: candidate.label.clone(),
                losses: per_source,
                mean,
                cached: false,
            };
            if let Some(dir) = candidate.path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            // A cache that cannot be written only costs a rescore next time.
            let _ = std::fs::write(
                &candidate.path,
                serde_json::to_string(&score).unwrap_or_default(),
            );
            candidate.score = Some(score);
        }
        Ok(())
    }

    /// The winner (an index into the plan's variants of the merge) and the
    /// record of the selection. Call after [`Selector::score`].
    pub(super) fn finish(
        self,
        progress: &mut dyn FnMut(Event),
    ) -> Result<(usize, Selection), ExecError> {
        let merge = &self.c.recipe.merges[self.id.0];
        let (indices, scored): (Vec<usize>, Vec<CandidateScore>) = self
            .candidates
            .into_iter()
            .filter_map(|c| Some((c.variant, c.score?)))
            .unzip();
        for score in &scored {
            progress(Event::CandidateScored {
                merge: merge.name.clone(),
                candidate: score.candidate.clone(),
                losses: score.losses.clone(),
                mean: score.mean,
                cached: score.cached,
            });
        }
        let means: Vec<f64> = scored.iter().map(|s| s.mean).collect();
        let winner = lowest_finite(&means).ok_or_else(|| ExecError::Selection {
            merge: merge.name.clone(),
            source: Box::new(SelectionFailure::NoFiniteLoss),
        })?;
        let selection = Selection {
            candidates: scored,
            winner,
            seconds: self.started.elapsed().as_secs_f64(),
        };
        if let Some(w) = selection.candidates.get(winner) {
            progress(Event::Selected {
                merge: merge.name.clone(),
                candidate: w.candidate.clone(),
                mean: w.mean,
                seconds: selection.seconds,
            });
        }
        Ok((indices[winner], selection))
    }
}

/// The lowest finite loss, the earlier on ties; a NaN or ±∞ never wins.
fn lowest_finite(means: &[f64]) -> Option<usize> {
    means
        .iter()
        .enumerate()
        .filter(|(_, m)| m.is_finite())
        .min_by(|(i, a), (j, b)| a.total_cmp(b).then(i.cmp(j)))
        .map(|(i, _)| i)
}

/// The plan's candidates of merge `id`.
fn variants(plan: &Plan, id: MergeId) -> &[Variant] {
    plan.variants.get(&id).map_or(&[], Vec::as_slice)
}

/// A merge computed tensor by tensor as a forward pass asks for it.
struct MergedSource<'a> {
    eval: Evaluator<'a>,
    merge: MergeId,
    names: HashSet<String>,
    device: candle_core::Device,
}

impl Source for MergedSource<'_> {
    fn get(&mut self, name: &str, shape: &[usize]) -> blocks::Result<Tensor> {
        let values = self
            .eval
            .output_tensor(self.merge, name)
            .map_err(|e| ForwardError::Source(Box::new(e)))?;
        // Moved, not copied; no buffer is kept for reuse (see release_buffers).
        self.eval.release_buffers();
        Ok(Tensor::from_vec(values, shape, &self.device)?)
    }

    fn has(&self, name: &str) -> bool {
        self.names.contains(name)
    }
}

#[cfg(test)]
mod tests {
    use super::lowest_finite;

    #[test]
    fn non_finite_losses_never_win() {
        assert_eq!(lowest_finite(&[f64::NAN, 2.0, 1.5, 1.5]), Some(2));
        assert_eq!(lowest_finite(&[f64::NEG_INFINITY, 3.0]), Some(1));
        assert_eq!(lowest_finite(&[f64::NAN, f64::INFINITY]), None);
        assert_eq!(lowest_finite(&[]), None);
    }
}
