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
//! layer for all of them, and candidates that differ only in the factor on
//! their task vectors (λ, OBIM's `scale`) share the merge itself: it is
//! computed once at factor 1, and each candidate's tensor is
//! base + f·(that − base). OBD statistics are shared by all candidates, and
//! scores are cached by the candidate's plan hash and the exact token ids, so
//! adding a candidate scores only it. Candidates are scored in f32; the
//! written output is then rounded to its dtype.

use super::RunOptions;
use super::error::{ExecError, SelectionFailure};
use super::evaluator::{Evaluator, SharedInputs};
use super::event::Event;
use super::stats::Statistics;
use crate::Compilation;
use crate::checkpoint::ModelInfo;
use crate::data::{self, JudgedSource};
use crate::eval::{EvalError, Example, Generator};
use crate::model::ModelConfig;
use crate::model::blocks::{self, ForwardError, Source};
use crate::model::stream;
use crate::plan::{Plan, Variant};
use crate::recipe::{Judge, MergeId};
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
    /// `select by accuracy`: exact match per source, and their mean.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracies: Option<Vec<(String, f64)>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    #[serde(skip)]
    pub cached: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Selection {
    /// What the loss scores of each source: the whole text, or the answer
    /// given the prompt (prompt/answer data).
    #[serde(default)]
    pub scored: Vec<(String, data::Judged)>,
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

impl Candidate {
    /// Keeps a fresh score and caches it (a cache that cannot be written
    /// only costs a rescore next time).
    fn keep(&mut self, score: CandidateScore) {
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = std::fs::write(
            &self.path,
            serde_json::to_string(&score).unwrap_or_default(),
        );
        self.score = Some(score);
    }
}

/// The selection of one merge's settings.
pub(super) struct Selector<'a> {
    c: &'a Compilation,
    id: MergeId,
    started: Instant,
    config: ModelConfig,
    /// The base, whose tokenizer and end-of-sequence ids decode answers.
    base: ModelInfo,
    judge: Judge,
    /// Each selection data source, as scored.
    sources: Vec<JudgedSource>,
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
        let sources = match &merge.select {
            Some(select) => data::selection_sources(recipe, select, &tokenizer)
                .map_err(|e| fail(SelectionFailure::Data(e)))?,
            None => Vec::new(),
        };
        if let Some(empty) = sources.iter().find(|s| s.seqs.is_empty()) {
            return Err(fail(SelectionFailure::TooShort(empty.name.clone())));
        }
        let judge = merge.select.as_ref().map_or(Judge::Loss, |s| s.judge);
        let mut selector = Selector {
            c,
            id,
            started,
            config,
            base: base.clone(),
            judge,
            sources,
            candidates: Vec::new(),
        };
        selector.sync(plan, cache);
        Ok(selector)
    }

    /// Takes in the plan's variants of the merge not yet among the
    /// candidates (a search adds them as it goes), with their cached scores.
    pub(super) fn sync(&mut self, plan: &Plan, cache: &Path) {
        for (index, variant) in variants(plan, self.id)
            .iter()
            .enumerate()
            .skip(self.candidates.len())
        {
            let path = variant.score_path(cache, self.judge, &self.sources);
            let cached = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| serde_json::from_str::<CandidateScore>(&t).ok())
                .map(|s| CandidateScore {
                    cached: true,
                    candidate: variant.label.clone(),
                    ..s
                });
            self.candidates.push(Candidate {
                variant: index,
                label: variant.label.clone(),
                score: cached,
                path,
            });
        }
    }

    /// How good variant `index`'s score is, smaller better (the judge's
    /// order: loss; or accuracy, then loss); `None` until it is scored or
    /// when its loss is not finite.
    pub(super) fn rank(&self, index: usize) -> Option<(f64, f64)> {
        let score = self.candidates.get(index)?.score.as_ref()?;
        if !score.mean.is_finite() {
            return None;
        }
        Some(match self.judge {
            Judge::Loss => (score.mean, 0.0),
            Judge::Accuracy => (-score.accuracy.unwrap_or(0.0), score.mean),
        })
    }

    /// Every source's token ids and first scored token, in order.
    fn sequences(&self) -> (Vec<Vec<u32>>, Vec<usize>) {
        let all = self.sources.iter().flat_map(|s| &s.seqs);
        (
            all.clone().map(|s| s.ids.clone()).collect(),
            all.map(|s| s.from).collect(),
        )
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
        if self.judge == Judge::Accuracy {
            return self.score_by_accuracy(plan, stats, options);
        }
        let id = self.id;
        let merge_name = self.c.recipe.merges[id.0].name.clone();
        let (all, from) = self.sequences();
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
        let losses = stream::nll_many(&self.config, &mut refs, &all, &from, &mut || {
            shared.borrow_mut().clear()
        })
        .map_err(|e| selection_error(&merge_name, SelectionFailure::Forward(e)))?;
        drop(refs);
        drop(merged);
        let pending = self.candidates.iter_mut().filter(|c| c.score.is_none());
        for (candidate, losses) in pending.zip(losses) {
            let mut per_source = Vec::new();
            let mut at = 0;
            for source in &self.sources {
                let part = &losses[at..at + source.seqs.len()];
                per_source.push((
                    source.name.clone(),
                    part.iter().sum::<f64>() / part.len() as f64,
                ));
                at += source.seqs.len();
            }
            let mean = per_source.iter().map(|(_, l)| l).sum::<f64>() / per_source.len() as f64;
            candidate.keep(CandidateScore {
                candidate: candidate.label.clone(),
                losses: per_source,
                mean,
                accuracies: None,
                accuracy: None,
                cached: false,
            });
        }
        Ok(())
    }

    /// `select by accuracy`: each pending candidate is merged whole in
    /// memory (one at a time), decodes every source's prompts greedily as
    /// `obim eval` does, and is scored by exact match, with the loss of the
    /// answers for ties.
    fn score_by_accuracy(
        &mut self,
        plan: &Plan,
        stats: &Statistics,
        options: &RunOptions,
    ) -> Result<(), ExecError> {
        let id = self.id;
        let merge_name = self.c.recipe.merges[id.0].name.clone();
        let failed = |e: EvalError| {
            let failure = match e {
                EvalError::Forward(e) => SelectionFailure::Forward(e),
                e => SelectionFailure::Eval(e),
            };
            selection_error(&merge_name, failure)
        };
        for candidate in self.candidates.iter_mut().filter(|c| c.score.is_none()) {
            let tensors = &variants(plan, id)[candidate.variant].tensors;
            let mut merged = MergedSource {
                eval: Evaluator::new(self.c, plan, stats, id)
                    .allowing_non_finite(options.allow_non_finite),
                merge: id,
                names: tensors.iter().map(|t| t.name.clone()).collect(),
                device: options.device.candle().clone(),
            };
            merged.eval = merged.eval.with_variant(id, tensors);
            let generator = Generator::from_source(&self.base, self.config.clone(), &mut merged)
                .map_err(failed)?;
            drop(merged);
            let mut losses = Vec::new();
            let mut accuracies = Vec::new();
            for source in &self.sources {
                let examples: Vec<Example> = source
                    .pairs
                    .iter()
                    .map(|(prompt, answer)| Example {
                        prompt: prompt.clone(),
                        answer: answer.clone(),
                    })
                    .collect();
                let score = generator
                    .score(&source.name, &examples, &|_| {})
                    .map_err(failed)?;
                accuracies.push((source.name.clone(), score.accuracy));
                let l = generator.losses(&source.seqs).map_err(failed)?;
                losses.push((
                    source.name.clone(),
                    l.iter().sum::<f64>() / l.len().max(1) as f64,
                ));
            }
            let mean = |v: &[(String, f64)]| v.iter().map(|(_, x)| x).sum::<f64>() / v.len() as f64;
            candidate.keep(CandidateScore {
                candidate: candidate.label.clone(),
                mean: mean(&losses),
                accuracy: Some(mean(&accuracies)),
                losses,
                accuracies: Some(accuracies),
                cached: false,
            });
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
                accuracy: score.accuracy,
                cached: score.cached,
            });
        }
        let means: Vec<f64> = scored.iter().map(|s| s.mean).collect();
        let winner = match self.judge {
            Judge::Loss => lowest_finite(&means),
            Judge::Accuracy => {
                let accuracies: Vec<f64> =
                    scored.iter().map(|s| s.accuracy.unwrap_or(0.0)).collect();
                most_accurate(&accuracies, &means)
            }
        };
        let winner = winner.ok_or_else(|| ExecError::Selection {
            merge: merge.name.clone(),
            source: Box::new(SelectionFailure::NoFiniteLoss),
        })?;
        let selection = Selection {
            scored: self
                .sources
                .iter()
                .map(|s| (s.name.clone(), s.judged))
                .collect(),
            candidates: scored,
            winner,
            seconds: self.started.elapsed().as_secs_f64(),
        };
        if let Some(w) = selection.candidates.get(winner) {
            progress(Event::Selected {
                merge: merge.name.clone(),
                candidate: w.candidate.clone(),
                mean: w.mean,
                accuracy: w.accuracy,
                seconds: selection.seconds,
            });
        }
        Ok((indices[winner], selection))
    }
}

/// A failed selection of `merge`; a fault of an input found while merging
/// (a NaN, a bad tensor) is reported as itself, not as a failed selection.
fn selection_error(merge: &str, failure: SelectionFailure) -> ExecError {
    let failure = match failure {
        SelectionFailure::Forward(ForwardError::Source(source)) => {
            match source.downcast::<ExecError>() {
                Ok(exec) => return *exec,
                Err(other) => SelectionFailure::Forward(ForwardError::Source(other)),
            }
        }
        other => other,
    };
    ExecError::Selection {
        merge: merge.to_string(),
        source: Box::new(failure),
    }
}

/// The highest accuracy, ties to the lowest finite loss, then the earlier;
/// a candidate whose loss is NaN or ±∞ never wins.
fn most_accurate(accuracies: &[f64], losses: &[f64]) -> Option<usize> {
    (0..accuracies.len())
        .filter(|&i| losses[i].is_finite())
        .min_by(|&i, &j| {
            accuracies[j]
                .total_cmp(&accuracies[i])
                .then(losses[i].total_cmp(&losses[j]))
                .then(i.cmp(&j))
        })
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
