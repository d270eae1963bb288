//! Calibration data: reading a `data` source's texts, sampling them, and
//! turning them into token ids with the model's `tokenizer.json`.
//!
//! - `jsonl(path) { field }`: one text per line, the string in `field`.
//! - `text(glob)`: every matching file (sorted by path), split at blank lines
//!   into paragraphs; one text per non-blank paragraph.
//! - `samples N`: when the source has more than N texts, N of them are drawn
//!   without replacement by a seeded shuffle (SplitMix64 keyed by `seed`) and
//!   kept in source order; without `samples`, every text is used.
//! - Tokenization is `tokenizer(text)` of transformers: the tokenizer's own
//!   special tokens (its post-processor, e.g. `<bos>`), no padding. A sequence
//!   longer than `seq_len` tokens is truncated to its first `seq_len` tokens.

use crate::merge::kernels::uniform;
use crate::recipe::{Data, DataKind};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read `{path}`")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{path}` is not a valid glob")]
    Glob {
        path: PathBuf,
        source: glob::PatternError,
    },
    #[error("`{path}` line {line}: {reason}")]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("`{0}` holds no text")]
    Empty(PathBuf),
    #[error("tokenizer `{path}`")]
    Tokenizer {
        path: PathBuf,
        source: tokenizers::Error,
    },
}

/// The texts of a jsonl file's `field`, one per non-empty line.
pub fn jsonl_texts(path: &Path, field: &str) -> Result<Vec<String>, DataError> {
    let text = read(path)?;
    let mut texts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let fail = |reason: String| DataError::Line {
            path: path.to_path_buf(),
            line: i + 1,
            reason,
        };
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| fail(format!("not JSON: {e}")))?;
        match value.get(field) {
            Some(serde_json::Value::String(s)) => texts.push(s.clone()),
            Some(_) => return Err(fail(format!("field `{field}` is not a string"))),
            None => return Err(fail(format!("no field `{field}`"))),
        }
    }
    if texts.is_empty() {
        return Err(DataError::Empty(path.to_path_buf()));
    }
    Ok(texts)
}

/// Each line's `prompt` and `answer`, when every non-empty line of the
/// jsonl file has both as strings; `None` otherwise.
pub fn jsonl_pairs(path: &Path) -> Result<Option<Vec<(String, String)>>, DataError> {
    let text = read(path)?;
    let mut pairs = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else {
            return Ok(None);
        };
        match (value.get("prompt"), value.get("answer")) {
            (Some(serde_json::Value::String(p)), Some(serde_json::Value::String(a))) => {
                pairs.push((p.clone(), a.clone()));
            }
            _ => return Ok(None),
        }
    }
    Ok((!pairs.is_empty()).then_some(pairs))
}

/// A sequence to score: its token ids, and the first of them whose
/// prediction counts (1 for a whole text; for prompt/answer data the first
/// answer token, so that the loss is the answer's given the prompt).
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub ids: Vec<u32>,
    pub from: usize,
}

/// How a source's texts are scored by a loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Judged {
    /// Every token of the text after the first.
    WholeText,
    /// The answer's tokens, given the prompt (jsonl with `prompt` and `answer`).
    AnswerGivenPrompt,
}

impl Judged {
    pub fn describe(self) -> &'static str {
        match self {
            Judged::WholeText => "whole text",
            Judged::AnswerGivenPrompt => "answer given the prompt",
        }
    }
}

/// Prompt/answer pairs as scored sequences: `tokenizer(prompt + answer)`,
/// scored from the length of `tokenizer(prompt)` on, truncated to
/// `max_len` tokens. A pair with no answer token left is dropped.
pub fn answer_sequences(
    pairs: &[(String, String)],
    tokenizer: &Tokenizer,
    max_len: Option<usize>,
) -> Result<Vec<Scored>, DataError> {
    let mut out = Vec::with_capacity(pairs.len());
    for (prompt, answer) in pairs {
        let alone = tokenizer.encode(prompt, None)?;
        let ids = tokenizer.encode(&format!("{prompt}{answer}"), max_len)?;
        // The prompt's tokens as they stand in the whole text (a token that
        // spans the boundary, or an end token the tokenizer appends to the
        // prompt alone, belongs to the answer).
        let from = alone
            .iter()
            .zip(&ids)
            .take_while(|(a, b)| a == b)
            .count()
            .max(1);
        if ids.len() > from {
            out.push(Scored { ids, from });
        }
    }
    Ok(out)
}

/// Whole texts as scored sequences (texts of fewer than 2 tokens dropped).
pub fn text_sequences(sequences: Vec<Vec<u32>>) -> Vec<Scored> {
    sequences
        .into_iter()
        .filter(|ids| ids.len() >= 2)
        .map(|ids| Scored { ids, from: 1 })
        .collect()
}

/// What a loss judge scores of a `data` source: a jsonl source whose every
/// line has `prompt` and `answer` strings by the answer given the prompt,
/// any other by the whole text of its `field`. Sampled as for calibration.
pub fn judged_sequences(
    data: &Data,
    tokenizer: &Tokenizer,
) -> Result<(Judged, Vec<Scored>), DataError> {
    let (judged, seqs, _) = judged_source(data, tokenizer)?;
    Ok((judged, seqs))
}

type Judging = (Judged, Vec<Scored>, Vec<(String, String)>);

/// [`judged_sequences`], with the sampled prompt/answer pairs.
fn judged_source(data: &Data, tokenizer: &Tokenizer) -> Result<Judging, DataError> {
    if data.kind == DataKind::Jsonl
        && let Some(pairs) = jsonl_pairs(&data.path)?
    {
        let pairs = sample(pairs, data.samples, data.seed);
        let seqs = answer_sequences(&pairs, tokenizer, Some(data.seq_len as usize))?;
        return Ok((Judged::AnswerGivenPrompt, seqs, pairs));
    }
    let seqs = text_sequences(sequences(data, tokenizer)?);
    Ok((Judged::WholeText, seqs, Vec::new()))
}

/// One data source of a `select by loss(...)`, as every candidate is scored on it.
#[derive(Debug, Clone)]
pub struct JudgedSource {
    pub name: String,
    pub judged: Judged,
    pub seqs: Vec<Scored>,
    /// Prompt/answer data: the (sampled) pairs, for exact match.
    pub pairs: Vec<(String, String)>,
}

/// The sources a merge's `select` scores candidates on, tokenized with the
/// base's tokenizer: the one definition used by the run and by the plan's
/// `chosen` line (whose cache keys must agree).
pub fn selection_sources(
    recipe: &crate::recipe::Recipe,
    select: &crate::recipe::Select,
    tokenizer: &Tokenizer,
) -> Result<Vec<JudgedSource>, DataError> {
    select
        .data
        .iter()
        .map(|d| {
            let source = &recipe.data[d.0];
            let (judged, seqs, pairs) = judged_source(source, tokenizer)?;
            Ok(JudgedSource {
                name: source.name.clone(),
                judged,
                seqs,
                pairs,
            })
        })
        .collect()
}

/// Feeds scored sequences (ids, lengths and first scored token) into a cache key.
pub fn hash_scored(h: &mut blake3::Hasher, seqs: &[Scored]) {
    for s in seqs {
        h.update(&(s.ids.len() as u64).to_le_bytes());
        h.update(&(s.from as u64).to_le_bytes());
        for id in &s.ids {
            h.update(&id.to_le_bytes());
        }
    }
}

fn read(path: &Path) -> Result<String, DataError> {
    std::fs::read_to_string(path).map_err(|source| DataError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The texts of a source, before sampling.
pub fn source_texts(data: &Data) -> Result<Vec<String>, DataError> {
    match data.kind {
        DataKind::Jsonl => jsonl_texts(&data.path, &data.field),
        DataKind::Text => {
            let pattern = data.path.to_string_lossy();
            let mut files: Vec<PathBuf> = glob::glob(&pattern)
                .map_err(|source| DataError::Glob {
                    path: data.path.clone(),
                    source,
                })?
                .filter_map(Result::ok)
                .filter(|p| p.is_file())
                .collect();
            files.sort();
            let mut texts = Vec::new();
            for file in &files {
                let text = read(file)?;
                let mut paragraph = String::new();
                for line in text.lines().chain(std::iter::once("")) {
                    if line.trim().is_empty() {
                        if !paragraph.trim().is_empty() {
                            texts.push(std::mem::take(&mut paragraph));
                        }
                        paragraph.clear();
                    } else {
                        paragraph.push_str(line);
                        paragraph.push('\n');
                    }
                }
            }
            if texts.is_empty() {
                return Err(DataError::Empty(data.path.clone()));
            }
            Ok(texts)
        }
    }
}

/// `samples` of the texts, drawn by a seeded shuffle and kept in order.
pub fn sample<T>(texts: Vec<T>, samples: Option<u64>, seed: u64) -> Vec<T> {
    let n = texts.len();
    let Some(k) = samples.map(|s| s as usize).filter(|&k| k < n) else {
        return texts;
    };
    // The first k steps of a Fisher–Yates shuffle.
    let mut index: Vec<usize> = (0..n).collect();
    for i in 0..k {
        let j = i + (uniform(seed, i as u64) * (n - i) as f64) as usize;
        index.swap(i, j.min(n - 1));
    }
    let mut chosen = index[..k].to_vec();
    chosen.sort_unstable();
    let mut texts: Vec<Option<T>> = texts.into_iter().map(Some).collect();
    chosen.into_iter().filter_map(|i| texts[i].take()).collect()
}

/// A model's tokenizer, from its `tokenizer.json`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl Tokenizer {
    pub fn from_dir(dir: &Path) -> Result<Tokenizer, DataError> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| DataError::Tokenizer {
            path: path.clone(),
            source: e,
        })?;
        Ok(Tokenizer { inner, path })
    }

    /// `tokenizer(text)`: with the tokenizer's special tokens, truncated to
    /// `max_len` tokens when given.
    pub fn encode(&self, text: &str, max_len: Option<usize>) -> Result<Vec<u32>, DataError> {
        let mut ids = self.ids(text, true)?;
        if let Some(max) = max_len {
            ids.truncate(max);
        }
        Ok(ids)
    }

    /// Token ids without special tokens.
    pub fn ids(&self, text: &str, special: bool) -> Result<Vec<u32>, DataError> {
        let encoding = self
            .inner
            .encode(text, special)
            .map_err(|e| DataError::Tokenizer {
                path: self.path.clone(),
                source: e,
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, DataError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| DataError::Tokenizer {
                path: self.path.clone(),
                source: e,
            })
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// The token sequences of a data source for a model's tokenizer.
pub fn sequences(data: &Data, tokenizer: &Tokenizer) -> Result<Vec<Vec<u32>>, DataError> {
    let texts = sample(source_texts(data)?, data.samples, data.seed);
    texts
        .iter()
        .map(|t| tokenizer.encode(t, Some(data.seq_len as usize)))
        .collect()
}
