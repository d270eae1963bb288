//! The output vocabulary of a merge whose inputs' tokenizers differ
//! (fine-tunes that added chat or tool tokens), as mergekit 0.1.5 builds it
//! (`tokenizer/build.py`, `tokenizer/embed.py`): `tokenizer base` keeps the
//! base's, `tokenizer MODEL` that model's, `tokenizer union` the base's
//! plus every other model's tokens (added tokens with their settings, the
//! first model's on a clash); `token` lines add tokens and say where their
//! rows come from. Each model's embedding and head rows are then put at
//! their token's id in the output vocabulary; a token a model lacks gets,
//! for that model, the row of the one model that has it, else the base's,
//! else the mean of the models that have it (zero when none has).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use tokenizers::{AddedToken, Tokenizer};

use crate::checkpoint::ModelInfo;
use crate::recipe::ModelId;
use crate::source::Span;

#[derive(Debug, thiserror::Error)]
pub enum VocabError {
    #[error("`{path}`: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error(
        "`token \"{token}\"` takes a row from `{model}`, which is not one of this merge's models"
    )]
    NotAnInput {
        token: String,
        model: String,
        span: Span,
    },
    #[error("`token \"{token}\"` takes `{model}`'s row of {wanted}, which `{model}` does not have")]
    NoSuchToken {
        token: String,
        model: String,
        wanted: String,
        span: Span,
    },
}

impl VocabError {
    /// The recipe text the error is about, where it is a `token` line's.
    pub fn span(&self) -> Option<Span> {
        match self {
            VocabError::Tokenizer { .. } => None,
            VocabError::NotAnInput { span, .. } | VocabError::NoSuchToken { span, .. } => {
                Some(*span)
            }
        }
    }
}

/// Where the output's vocabulary comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VocabSource {
    Base,
    Union,
    Model(ModelId),
}

/// An output's vocabulary as the recipe asks for it: `tokenizer union |
/// base | MODEL`, its `token` lines and `pad_to_multiple_of`.
#[derive(Debug, Clone, PartialEq)]
pub struct VocabSpec {
    pub source: VocabSource,
    pub tokens: Vec<TokenRule>,
    pub pad_to_multiple_of: Option<usize>,
}

/// `token "TEXT" [zero | from MODEL ["TOKEN" | ID]] [force]`.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRule {
    pub token: String,
    pub source: TokenSource,
    /// Every model gets this row, even those that have the token.
    pub force: bool,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TokenSource {
    /// The token is added; models lacking it are filled as any other token.
    Default,
    Zero,
    /// The model's row of the same token.
    Model(ModelId, String),
    /// The model's row of another token, by text or by id.
    ModelToken(ModelId, String, TokenRef),
}

#[derive(Debug, Clone, PartialEq)]
pub enum TokenRef {
    Text(String),
    Id(u32),
}

impl std::fmt::Display for TokenRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenRef::Text(t) => write!(f, "token {t:?}"),
            TokenRef::Id(i) => write!(f, "token id {i}"),
        }
    }
}

/// One model's tokens, by string, with their ids below its `vocab_size`.
#[derive(Clone)]
struct ModelVocab {
    tokens: HashMap<String, u32>,
    added: Vec<(u32, AddedToken)>,
}

fn read_tokenizer(info: &ModelInfo) -> Result<Tokenizer, VocabError> {
    let path = info.dir.join("tokenizer.json");
    Tokenizer::from_file(&path).map_err(|e| VocabError::Tokenizer {
        path,
        message: e.to_string(),
    })
}

/// A model's tokens below its config's `vocab_size` (as mergekit strips them).
fn vocab_of(tokenizer: &Tokenizer, info: &ModelInfo) -> ModelVocab {
    let size = info
        .config
        .get("vocab_size")
        .and_then(serde_json::Value::as_u64)
        .map_or(u32::MAX, |n| n.min(u32::MAX as u64) as u32);
    let tokens = tokenizer
        .get_vocab(true)
        .into_iter()
        .filter(|(_, id)| *id < size)
        .collect();
    let mut added: Vec<(u32, AddedToken)> = tokenizer
        .get_added_tokens_decoder()
        .into_iter()
        .filter(|(id, _)| *id < size)
        .collect();
    added.sort_by_key(|(id, _)| *id);
    ModelVocab { tokens, added }
}

/// How one output token's rows are made, resolved against the models.
#[derive(Debug, Clone)]
enum Resolved {
    Zero,
    /// Model `model`'s row `row`.
    Row {
        model: ModelId,
        row: u32,
    },
    /// The rows of the models that have the token, averaged.
    Mean,
}

/// The output vocabulary of one merge and how each model's rows map onto it.
#[derive(Clone)]
pub struct Vocabulary {
    /// The output's tokenizer.
    pub tokenizer: Tokenizer,
    /// Tokens of the output's tokenizer.
    pub tokens: usize,
    /// Rows of the output's embedding and head (tokens, padded).
    pub size: usize,
    /// Added tokens the output has that its source tokenizer did not.
    pub new_added: Vec<(u32, AddedToken)>,
    /// The models whose tokenizers differ from the output's (ids or tokens).
    pub differing: Vec<ModelId>,
    /// Per model: for each output id, the model's own id of that token.
    rows: HashMap<ModelId, Vec<Option<u32>>>,
    /// Per output id: the `token` line's source and whether it is forced.
    rules: HashMap<u32, (Resolved, bool)>,
    base: Option<ModelId>,
    fingerprint: String,
}

impl Vocabulary {
    /// The vocabulary for a merge of `models` (the base first, if any), the
    /// output's tokenizer coming from `source_info`. A model without a
    /// readable `tokenizer.json` is taken to have the first model's tokens
    /// (as mergekit assumes the base's).
    pub fn build(
        models: &[(ModelId, &ModelInfo)],
        base: Option<ModelId>,
        spec: &VocabSpec,
        source_info: &ModelInfo,
    ) -> Result<Vocabulary, VocabError> {
        let mut tokenizer = read_tokenizer(source_info)?;
        let source_vocab = vocab_of(&tokenizer, source_info);
        let mut vocabs: Vec<(ModelId, ModelVocab)> = Vec::new();
        for (id, info) in models {
            let own = read_tokenizer(info).ok().map(|t| vocab_of(&t, info));
            let vocab = own
                .or_else(|| vocabs.first().map(|(_, v)| v.clone()))
                .unwrap_or_else(|| source_vocab.clone());
            vocabs.push((*id, vocab));
        }
        let failed = |e: tokenizers::Error| VocabError::Tokenizer {
            path: source_info.dir.join("tokenizer.json"),
            message: e.to_string(),
        };
        if spec.source == VocabSource::Union {
            let base_tokens = &source_vocab.tokens;
            let mut seen: HashSet<String> = HashSet::new();
            let mut added: Vec<AddedToken> = Vec::new();
            let mut plain: Vec<String> = Vec::new();
            for (_, v) in &vocabs {
                let added_here: HashSet<&str> =
                    v.added.iter().map(|(_, t)| t.content.as_str()).collect();
                let mut own: Vec<(&String, &u32)> = v.tokens.iter().collect();
                own.sort_by_key(|(_, id)| **id);
                for (tok, _) in own {
                    if !added_here.contains(tok.as_str())
                        && !base_tokens.contains_key(tok)
                        && seen.insert(tok.clone())
                    {
                        plain.push(tok.clone());
                    }
                }
                for (_, t) in &v.added {
                    if !added.iter().any(|a| a.content == t.content) {
                        added.push(t.clone());
                    }
                }
            }
            let plain: Vec<AddedToken> = plain
                .into_iter()
                .map(|t| AddedToken::from(t, false))
                .collect();
            tokenizer.add_tokens(plain).map_err(failed)?;
            for t in added {
                let result = if t.special {
                    tokenizer.add_special_tokens([t])
                } else {
                    tokenizer.add_tokens([t])
                };
                result.map_err(failed)?;
            }
        }
        // `token` lines add the tokens the vocabulary lacks (normal tokens).
        for rule in &spec.tokens {
            if tokenizer.token_to_id(&rule.token).is_none() {
                tokenizer
                    .add_tokens([AddedToken::from(rule.token.clone(), false)])
                    .map_err(failed)?;
            }
        }
        let out = tokenizer.get_vocab(true);
        let tokens = out.values().map(|id| *id as usize + 1).max().unwrap_or(0);
        let size = match spec.pad_to_multiple_of {
            Some(m) if m > 0 => tokens.div_ceil(m) * m,
            _ => tokens,
        };
        let before: HashSet<&str> = source_vocab
            .added
            .iter()
            .map(|(_, t)| t.content.as_str())
            .collect();
        let mut new_added: Vec<(u32, AddedToken)> = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| !before.contains(t.content.as_str()))
            .collect();
        new_added.sort_by_key(|(id, _)| *id);
        let rows: HashMap<ModelId, Vec<Option<u32>>> = vocabs
            .iter()
            .map(|(id, v)| {
                let mut map = vec![None; tokens];
                for (tok, new) in &out {
                    map[*new as usize] = v.tokens.get(tok).copied();
                }
                (*id, map)
            })
            .collect();
        let differing = vocabs
            .iter()
            .filter(|(id, v)| {
                v.tokens.len() != tokens
                    || rows[id]
                        .iter()
                        .enumerate()
                        .any(|(i, r)| *r != Some(i as u32))
            })
            .map(|(id, _)| *id)
            .collect();
        let mut rules = HashMap::new();
        for rule in &spec.tokens {
            let Some(id) = tokenizer.token_to_id(&rule.token) else {
                continue;
            };
            let model_vocab = |m: ModelId, name: &str| {
                vocabs
                    .iter()
                    .find(|(id, _)| *id == m)
                    .map(|(_, v)| v)
                    .ok_or_else(|| VocabError::NotAnInput {
                        token: rule.token.clone(),
                        model: name.to_string(),
                        span: rule.span,
                    })
            };
            let missing = |name: &str, wanted: String| VocabError::NoSuchToken {
                token: rule.token.clone(),
                model: name.to_string(),
                wanted,
                span: rule.span,
            };
            let resolved = match &rule.source {
                TokenSource::Default => Resolved::Mean,
                TokenSource::Zero => Resolved::Zero,
                TokenSource::Model(m, name) => {
                    let row = model_vocab(*m, name)?
                        .tokens
                        .get(&rule.token)
                        .copied()
                        .ok_or_else(|| missing(name, format!("token {:?}", rule.token)))?;
                    Resolved::Row { model: *m, row }
                }
                TokenSource::ModelToken(m, name, token) => {
                    let v = model_vocab(*m, name)?;
                    let row = match token {
                        TokenRef::Text(t) => v.tokens.get(t).copied(),
                        TokenRef::Id(i) => {
                            let rows = models
                                .iter()
                                .find(|(id, _)| id == m)
                                .and_then(|(_, info)| vocabulary_rows(info));
                            Some(*i).filter(|i| rows.is_none_or(|r| (*i as usize) < r))
                        }
                    };
                    Resolved::Row {
                        model: *m,
                        row: row.ok_or_else(|| missing(name, token.to_string()))?,
                    }
                }
            };
            if !matches!(rule.source, TokenSource::Default) || rule.force {
                rules.insert(id, (resolved, rule.force));
            }
        }
        let mut fingerprint = blake3::Hasher::new();
        let mut by_id: Vec<(&String, &u32)> = out.iter().collect();
        by_id.sort_by_key(|(_, id)| **id);
        for (tok, id) in by_id {
            fingerprint.update(&id.to_le_bytes());
            fingerprint.update(tok.as_bytes());
            fingerprint.update(&[0]);
        }
        fingerprint.update(format!("{size} {base:?} {rules:?}").as_bytes());
        Ok(Vocabulary {
            tokenizer,
            tokens,
            size,
            new_added,
            differing,
            rows,
            rules,
            base,
            fingerprint: fingerprint.finalize().to_hex().to_string(),
        })
    }

    /// Changes whenever the output's tokens, rows or fill rules do.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Each operand's tensor (rows of `cols` values, one per token of its
    /// model) rebuilt with the output's rows: its own where it has the
    /// token, else the row mergekit gives it; rows past the tokens (with
    /// `pad_to_multiple_of`) are the mean of the model's token rows.
    pub fn align(&self, operands: &mut [(ModelId, Vec<f32>)], cols: usize) -> Result<(), String> {
        let models: Vec<ModelId> = operands.iter().map(|(m, _)| *m).collect();
        let empty = vec![None; self.tokens];
        let map = |m: ModelId| self.rows.get(&m).unwrap_or(&empty);
        for (m, values) in operands.iter() {
            let have = values.len() / cols.max(1);
            if let Some(r) = map(*m).iter().flatten().find(|r| **r as usize >= have) {
                return Err(format!(
                    "its tokenizer has token id {r}, but the tensor has {have} rows"
                ));
            }
        }
        let row_of = |model: ModelId, r: u32| -> Option<&[f32]> {
            let k = models.iter().position(|m| *m == model)?;
            let r = r as usize;
            operands[k].1.get(r * cols..(r + 1) * cols)
        };
        let mean_of = |i: usize, present: &[usize]| {
            let mut mean = vec![0f32; cols];
            for k in present {
                let r = map(models[*k])[i].unwrap_or(0) as usize;
                for (m, v) in mean
                    .iter_mut()
                    .zip(&operands[*k].1[r * cols..(r + 1) * cols])
                {
                    *m += v;
                }
            }
            mean.iter_mut()
                .for_each(|m| *m /= present.len().max(1) as f32);
            mean
        };
        // The row a model lacking token `i` (or every model, when forced) gets.
        let mut fill: Vec<Option<Vec<f32>>> = Vec::with_capacity(self.tokens);
        for i in 0..self.tokens {
            let present: Vec<usize> = (0..models.len())
                .filter(|k| map(models[*k])[i].is_some())
                .collect();
            let rule = self.rules.get(&(i as u32));
            let forced = rule.is_some_and(|(_, force)| *force);
            if present.len() == models.len() && !forced {
                fill.push(None);
                continue;
            }
            let row = match rule {
                Some((Resolved::Zero, _)) => vec![0.0; cols],
                Some((Resolved::Row { model, row }, _)) => match row_of(*model, *row) {
                    Some(r) => r.to_vec(),
                    None => return Err(format!("row {row} is past the tensor's rows")),
                },
                Some((Resolved::Mean, _)) | None => match present.len() {
                    0 => vec![0.0; cols],
                    1 => {
                        let k = present[0];
                        row_of(models[k], map(models[k])[i].unwrap_or(0))
                            .map(<[f32]>::to_vec)
                            .unwrap_or_default()
                    }
                    _ => match self
                        .base
                        .filter(|_| rule.is_none())
                        .and_then(|b| present.iter().find(|k| models[**k] == b))
                    {
                        Some(k) => row_of(models[*k], map(models[*k])[i].unwrap_or(0))
                            .map(<[f32]>::to_vec)
                            .unwrap_or_default(),
                        None => mean_of(i, &present),
                    },
                },
            };
            fill.push(Some(row));
        }
        for (m, values) in operands.iter_mut() {
            let mut out = vec![0f32; self.size * cols];
            let (token_rows, padding) = out.split_at_mut(self.tokens * cols);
            for (i, row) in token_rows.chunks_mut(cols.max(1)).enumerate() {
                let forced = self.rules.get(&(i as u32)).is_some_and(|(_, f)| *f);
                let own = map(*m)[i].filter(|_| !forced || fill[i].is_none());
                match (own, &fill[i]) {
                    (Some(r), _) => {
                        let r = r as usize;
                        row.copy_from_slice(&values[r * cols..(r + 1) * cols]);
                    }
                    (_, Some(f)) => row.copy_from_slice(f),
                    (None, None) => {}
                }
            }
            if !padding.is_empty() {
                let mut mean = vec![0f64; cols];
                for row in token_rows.chunks(cols.max(1)) {
                    for (m, v) in mean.iter_mut().zip(row) {
                        *m += f64::from(*v);
                    }
                }
                let mean: Vec<f32> = mean
                    .iter()
                    .map(|m| (m / self.tokens.max(1) as f64) as f32)
                    .collect();
                for row in padding.chunks_mut(cols.max(1)) {
                    row.copy_from_slice(&mean);
                }
            }
            *values = out;
        }
        Ok(())
    }
}

/// The models (after the first) whose tokenizer has other tokens or ids than
/// the first model's; a model without a readable tokenizer is not compared.
pub fn differing_tokenizers(models: &[(ModelId, &ModelInfo)]) -> Vec<ModelId> {
    let vocab = |info: &ModelInfo| read_tokenizer(info).ok().map(|t| vocab_of(&t, info).tokens);
    let Some(((_, first), rest)) = models.split_first() else {
        return Vec::new();
    };
    let Some(reference) = vocab(first) else {
        return Vec::new();
    };
    rest.iter()
        .filter(|(_, info)| vocab(info).is_some_and(|v| v != reference))
        .map(|(id, _)| *id)
        .collect()
}

/// The rows of a model's embedding (its first vocabulary tensor's).
fn vocabulary_rows(info: &ModelInfo) -> Option<usize> {
    info.tensors
        .iter()
        .find(|(name, _)| is_vocabulary_tensor(name))
        .and_then(|(_, t)| t.shape.first().copied())
}

impl std::fmt::Debug for Vocabulary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vocabulary")
            .field("tokens", &self.tokens)
            .field("size", &self.size)
            .field("new_added", &self.new_added.len())
            .finish()
    }
}

/// Whether a tensor has one row per token (embeddings, the output head).
pub fn is_vocabulary_tensor(name: &str) -> bool {
    [
        "embed_tokens.weight",
        "lm_head.weight",
        "embed_in.weight",
        "embed_out.weight",
        "wte.weight",
    ]
    .iter()
    .any(|s| name.ends_with(s))
}

/// Chat templates by name (mergekit's `chat_template: chatml` and so on),
/// as mergekit 0.1.5 ships them.
pub const CHAT_TEMPLATES: &[(&str, &str)] = &[
    ("alpaca", include_str!("../templates/chat/alpaca.jinja")),
    ("chatml", include_str!("../templates/chat/chatml.jinja")),
    ("exaone", include_str!("../templates/chat/exaone.jinja")),
    ("llama3", include_str!("../templates/chat/llama3.jinja")),
    ("mistral", include_str!("../templates/chat/mistral.jinja")),
];

/// The output's chat template (`chat_template NAME | auto | "TEXT"`).
#[derive(Debug, Clone, PartialEq)]
pub enum ChatTemplate {
    /// The template most of the merge's models have.
    Auto,
    Named(&'static str),
    Text(String),
}

impl ChatTemplate {
    /// What the template is, for the output's content hash.
    pub fn key(&self) -> String {
        match self {
            ChatTemplate::Auto => "auto".into(),
            ChatTemplate::Named(name) => format!("name:{name}"),
            ChatTemplate::Text(text) => format!("text:{text}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn family() -> Vec<(ModelId, ModelInfo)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/goldens/vocab");
        ["base", "tools", "chat"]
            .iter()
            .enumerate()
            .map(|(i, m)| {
                (
                    ModelId(i),
                    crate::checkpoint::open_dir(&dir.join(m)).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn experts_that_added_tokens_are_told_apart() {
        let models = family();
        let refs: Vec<(ModelId, &ModelInfo)> = models.iter().map(|(i, m)| (*i, m)).collect();
        assert_eq!(differing_tokenizers(&refs), [ModelId(1), ModelId(2)]);
        assert!(differing_tokenizers(&refs[..1]).is_empty());
    }

    /// Rows by token, mergekit's fill for the tokens a model lacks, and
    /// the mean of the token rows in padding rows.
    #[test]
    fn rows_are_aligned_by_token() {
        let models = family();
        let refs: Vec<(ModelId, &ModelInfo)> = models.iter().map(|(i, m)| (*i, m)).collect();
        let spec = VocabSpec {
            source: VocabSource::Union,
            tokens: Vec::new(),
            pad_to_multiple_of: Some(8),
        };
        let v = Vocabulary::build(&refs, Some(ModelId(0)), &spec, refs[0].1).unwrap();
        assert_eq!((v.tokens, v.size), (105, 112));
        // One column; each model's row r holds 1000·model + r.
        let rows = [100, 102, 103];
        let mut operands: Vec<(ModelId, Vec<f32>)> = (0..3)
            .map(|m| {
                (
                    ModelId(m),
                    (0..rows[m]).map(|r| (1000 * m + r) as f32).collect(),
                )
            })
            .collect();
        v.align(&mut operands, 1).unwrap();
        let tool_call = v.tokenizer.token_to_id("<tool_call>").unwrap() as usize;
        let user = v.tokenizer.token_to_id("<|user|>").unwrap() as usize;
        for (_, values) in &operands {
            assert_eq!(values.len(), 112);
            // Only tools has `<tool_call>` (its id 100): every model gets its row.
            assert_eq!(values[tool_call], 1100.0);
            // Only chat has `<|user|>` (its id 100).
            assert_eq!(values[user], 2100.0);
        }
        // A shared token keeps each model's own row.
        assert_eq!(operands[2].1[5], 2005.0);
        // Padding: the mean of the model's 105 token rows.
        let base = &operands[0].1;
        let mean = base[..105].iter().map(|x| f64::from(*x)).sum::<f64>() / 105.0;
        assert!((f64::from(base[111]) - mean).abs() < 1e-3);
        // A tensor with fewer rows than its tokenizer has tokens is an error.
        let mut short = vec![(ModelId(1), vec![0.0; 50]), (ModelId(0), vec![0.0; 100])];
        assert!(v.align(&mut short, 1).is_err());
    }
}
