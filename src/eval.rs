//! `obim eval`: greedy decoding with a KV cache and exact-match accuracy, with
//! the fixtures' conventions: `tokenizer(prompt)` (special tokens included),
//! up to max(answer tokens) + 2 new tokens, stop at an end-of-sequence token,
//! the decoded text before it must equal `answer`.

use crate::checkpoint::ModelInfo;
use crate::data::{DataError, Judged, Scored, Tokenizer};
use crate::model::ModelConfig;
use crate::model::blocks::{self, ForwardError, Sequence, Transformer, Weights};
use crate::model::stream;
use candle_core::Device;
use rayon::prelude::*;
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("`{dir}`: {source}")]
    Config {
        dir: PathBuf,
        source: crate::model::ConfigError,
    },
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error(transparent)]
    Data(#[from] DataError),
}

/// A prompt and its expected answer.
#[derive(Debug, Clone)]
pub struct Example {
    pub prompt: String,
    pub answer: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Score {
    pub file: String,
    pub examples: usize,
    pub correct: usize,
    pub accuracy: f64,
}

/// Mean next-token negative log-likelihood of a file's texts.
#[derive(Debug, Clone, Serialize)]
pub struct LossScore {
    pub file: String,
    pub texts: usize,
    /// Tokens predicted (each text's length − 1, or its answer's length).
    pub tokens: usize,
    /// What was scored: the whole text, or the answer given the prompt.
    pub scored: Judged,
    /// Mean over texts of each text's mean NLL, in nats.
    pub loss: f64,
    pub perplexity: f64,
}

/// What `obim eval --loss` scores in one file.
pub enum LossTexts {
    /// Whole texts.
    Texts(Vec<String>),
    /// Prompt/answer pairs: the answer's tokens given the prompt.
    Pairs(Vec<(String, String)>),
}

impl LossTexts {
    pub fn len(&self) -> usize {
        match self {
            LossTexts::Texts(t) => t.len(),
            LossTexts::Pairs(p) => p.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Logits of packed sequences are computed in groups of about this many
/// values (tokens × vocabulary), which bounds memory for large vocabularies.
const LOSS_GROUP_VALUES: usize = 1 << 24;

/// A loaded model ready to generate.
pub struct Generator {
    model: Transformer,
    tokenizer: Tokenizer,
    eos: Vec<u32>,
}

/// End-of-sequence ids: generation_config.json's, else config.json's, else `<eos>`/`</s>`.
fn eos_ids(model: &ModelInfo, tokenizer: &Tokenizer) -> Vec<u32> {
    let generation = std::fs::read_to_string(model.dir.join("generation_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    let from = |v: Option<&serde_json::Value>| -> Vec<u32> {
        match v {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|n| n as u32).into_iter().collect()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|n| n.as_u64().map(|n| n as u32))
                .collect(),
            _ => Vec::new(),
        }
    };
    let mut ids = from(generation.as_ref().and_then(|g| g.get("eos_token_id")));
    if ids.is_empty() {
        ids = from(model.config.get("eos_token_id"));
    }
    if ids.is_empty() {
        ids = ["<eos>", "</s>", "<|endoftext|>"]
            .iter()
            .filter_map(|t| tokenizer.token_id(t))
            .collect();
    }
    ids
}

impl Generator {
    pub fn load(model: &ModelInfo, device: &Device) -> Result<Generator, EvalError> {
        let cfg = ModelConfig::of(model).map_err(|source| EvalError::Config {
            dir: model.dir.clone(),
            source,
        })?;
        let tokenizer = Tokenizer::from_dir(&model.dir)?;
        let transformer = Transformer::load(cfg, &mut Weights::new(model, device.clone()))?;
        Ok(Generator {
            eos: eos_ids(model, &tokenizer),
            model: transformer,
            tokenizer,
        })
    }

    /// A generator over weights from `source` (a merge computed as it is
    /// read) with `model`'s config, tokenizer and end-of-sequence ids.
    pub fn from_source(
        model: &ModelInfo,
        cfg: ModelConfig,
        source: &mut dyn blocks::Source,
    ) -> Result<Generator, EvalError> {
        let tokenizer = Tokenizer::from_dir(&model.dir)?;
        Ok(Generator {
            eos: eos_ids(model, &tokenizer),
            model: Transformer::load(cfg, source)?,
            tokenizer,
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Greedy continuation of `prompt`: at most `budget` new tokens, without
    /// the end-of-sequence token that stops it.
    pub fn generate(&self, prompt: &[u32], budget: usize) -> Result<Vec<u32>, EvalError> {
        let mut caches = self.model.caches(1);
        let mut ids = prompt.to_vec();
        let mut seq = Sequence {
            start: 0,
            len: ids.len(),
            pos: 0,
        };
        let mut new = Vec::new();
        while new.len() < budget {
            let logits = self.model.forward(&ids, &[seq], Some(&mut caches))?;
            let last = logits
                .get(seq.len - 1)
                .and_then(|row| row.to_vec1::<f32>())
                .map_err(ForwardError::from)?;
            let next = blocks::argmax(&last) as u32;
            if self.eos.contains(&next) {
                break;
            }
            new.push(next);
            seq = Sequence {
                start: 0,
                len: 1,
                pos: seq.pos + seq.len,
            };
            ids = vec![next];
        }
        Ok(new)
    }

    /// Exact-match accuracy on `examples`; `done(n)` as examples finish.
    pub fn score(
        &self,
        file: &str,
        examples: &[Example],
        done: &(dyn Fn(usize) + Sync),
    ) -> Result<Score, EvalError> {
        let mut budget = 0;
        for e in examples {
            budget = budget.max(self.tokenizer.ids(&e.answer, false)?.len());
        }
        budget += 2;
        // Examples are independent: one per worker beats splitting small
        // matrix products across threads.
        let right = examples
            .par_iter()
            .map(|e| -> Result<bool, EvalError> {
                let prompt = self.tokenizer.encode(&e.prompt, None)?;
                let out = self.generate(&prompt, budget)?;
                done(1);
                Ok(self.tokenizer.decode(&out)? == e.answer)
            })
            .collect::<Result<Vec<bool>, EvalError>>()?;
        let correct = right.iter().filter(|&&r| r).count();
        Ok(Score {
            file: file.to_string(),
            examples: examples.len(),
            correct,
            accuracy: if examples.is_empty() {
                0.0
            } else {
                correct as f64 / examples.len() as f64
            },
        })
    }

    /// Each sequence's mean next-token negative log-likelihood (nats) of
    /// its tokens from `from` on; sequences that predict nothing (shorter
    /// than 2 tokens, or no token at or after `from`) are left out.
    pub fn losses(&self, sequences: &[Scored]) -> Result<Vec<f64>, EvalError> {
        self.losses_reporting(sequences, &|_| {})
    }

    /// [`Generator::losses`], with `done(n)` as sequences finish.
    fn losses_reporting(
        &self,
        sequences: &[Scored],
        done: &(dyn Fn(usize) + Sync),
    ) -> Result<Vec<f64>, EvalError> {
        let usable: Vec<&Scored> = sequences
            .iter()
            .filter(|s| s.ids.len() >= 2 && s.from < s.ids.len())
            .collect();
        // Sequences too short to predict anything are done at once.
        done(sequences.len() - usable.len());
        let ids: Vec<Vec<u32>> = usable.iter().map(|s| s.ids.clone()).collect();
        let per_group = (LOSS_GROUP_VALUES / self.model.cfg.vocab_size.max(1)).max(1);
        let mut losses = Vec::with_capacity(usable.len());
        for (seqs, packed) in stream::packed(&ids, per_group) {
            let logits = self.model.forward(&packed, &seqs, None)?;
            let picked = stream::log_prob(&logits, &stream::targets(&seqs, &packed))?;
            let from: Vec<usize> = usable[losses.len()..losses.len() + seqs.len()]
                .iter()
                .map(|s| s.from)
                .collect();
            losses.extend(stream::mean_per_sequence(&seqs, &picked, &from));
            done(seqs.len());
        }
        Ok(losses)
    }

    /// Mean loss and perplexity of texts (or of answers given their
    /// prompts); `done(n)` as texts finish.
    pub fn loss(
        &self,
        file: &str,
        texts: &LossTexts,
        done: &(dyn Fn(usize) + Sync),
    ) -> Result<LossScore, EvalError> {
        let (scored, sequences) = match texts {
            LossTexts::Texts(texts) => {
                let sequences = texts
                    .iter()
                    .map(|t| {
                        let ids = self.tokenizer.encode(t, None)?;
                        Ok(Scored { ids, from: 1 })
                    })
                    .collect::<Result<Vec<_>, DataError>>()?;
                (Judged::WholeText, sequences)
            }
            LossTexts::Pairs(pairs) => (
                Judged::AnswerGivenPrompt,
                crate::data::answer_sequences(pairs, &self.tokenizer, None)?,
            ),
        };
        if let LossTexts::Pairs(pairs) = texts {
            // Pairs with no answer token are never scored.
            done(pairs.len() - sequences.len());
        }
        let losses = self.losses_reporting(&sequences, done)?;
        let loss = losses.iter().sum::<f64>() / losses.len().max(1) as f64;
        Ok(LossScore {
            file: file.to_string(),
            texts: losses.len(),
            tokens: sequences
                .iter()
                .filter(|s| s.ids.len() >= 2)
                .map(|s| s.ids.len() - s.from.max(1))
                .sum(),
            scored,
            loss,
            perplexity: loss.exp(),
        })
    }

    /// Logits of one sequence (no cache), `[len, vocab]`.
    pub fn logits(&self, ids: &[u32]) -> Result<Vec<Vec<f32>>, EvalError> {
        let seqs = Sequence::pack([ids.len()]);
        let logits = self.model.forward(ids, &seqs, None)?;
        Ok(logits.to_vec2::<f32>().map_err(ForwardError::from)?)
    }
}

/// The examples of a jsonl file (`prompt` and `answer` fields), at most `limit`.
pub fn examples(path: &Path, limit: Option<usize>) -> Result<Vec<Example>, DataError> {
    let prompts = crate::data::jsonl_texts(path, "prompt")?;
    let answers = crate::data::jsonl_texts(path, "answer")?;
    let mut examples: Vec<Example> = prompts
        .into_iter()
        .zip(answers)
        .map(|(prompt, answer)| Example { prompt, answer })
        .collect();
    if let Some(n) = limit {
        examples.truncate(n);
    }
    Ok(examples)
}
