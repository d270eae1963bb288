//! The output's tokenizer files beyond the copied ones: with an output
//! vocabulary, its `tokenizer.json` and the added tokens in
//! `tokenizer_config.json`; with `chat_template`, the template (in
//! `chat_template.jinja`, as transformers 5 and mergekit write it, and in
//! place of a template `tokenizer_config.json` already holds).

use super::error::ExecError;
use crate::Compilation;
use crate::recipe::Output;
use crate::tensors::TensorError;
use crate::vocab::{CHAT_TEMPLATES, ChatTemplate, Vocabulary};
use serde_json::{Map, Value};
use std::path::Path;

/// Writes `vocabulary`'s tokenizer and `output`'s chat template into `dir`,
/// over the tokenizer files copied there.
pub(super) fn write_tokenizer(
    c: &Compilation,
    output: &Output,
    vocabulary: Option<&Vocabulary>,
    dir: &Path,
) -> Result<(), ExecError> {
    let config_path = dir.join("tokenizer_config.json");
    let mut config: Option<Map<String, Value>> = std::fs::read_to_string(&config_path)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok());
    if let Some(v) = vocabulary {
        let path = dir.join("tokenizer.json");
        v.tokenizer
            .save(&path, true)
            .map_err(|e| TensorError::Write {
                path,
                source: std::io::Error::other(e.to_string()),
            })?;
        // transformers 4 lists every added token in `added_tokens_decoder`.
        if let Some(Value::Object(decoder)) = config
            .as_mut()
            .and_then(|c| c.get_mut("added_tokens_decoder"))
        {
            for (id, t) in &v.new_added {
                decoder.insert(
                    id.to_string(),
                    serde_json::json!({
                        "content": t.content,
                        "lstrip": t.lstrip,
                        "normalized": t.normalized,
                        "rstrip": t.rstrip,
                        "single_word": t.single_word,
                        "special": t.special,
                    }),
                );
            }
        }
    }
    if let Some(template) = output
        .chat_template
        .as_ref()
        .and_then(|t| chat_template(c, output, t))
    {
        let path = dir.join("chat_template.jinja");
        std::fs::write(&path, &template).map_err(|source| TensorError::Write { path, source })?;
        // A template kept in the config (as transformers 4 wrote it) is replaced.
        if let Some(old) = config.as_mut().and_then(|c| c.get_mut("chat_template")) {
            *old = template.into();
        }
    }
    if let Some(config) = config {
        let text = serde_json::to_string_pretty(&Value::Object(config)).unwrap_or_default() + "\n";
        std::fs::write(&config_path, text).map_err(|source| TensorError::Write {
            path: config_path,
            source,
        })?;
    }
    Ok(())
}

/// The template's text; for `auto`, the template most of the merge's models
/// have (none when no model has one), as mergekit chooses it.
fn chat_template(c: &Compilation, output: &Output, template: &ChatTemplate) -> Option<String> {
    match template {
        ChatTemplate::Text(text) => Some(text.clone()),
        ChatTemplate::Named(name) => CHAT_TEMPLATES
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| (*t).to_string()),
        ChatTemplate::Auto => {
            let merge = &c.recipe.merges[output.merge.0];
            let mut seen: Vec<(String, usize)> = Vec::new();
            for dep in merge.dependencies() {
                let Some(info) = c.recipe.shape_source(dep).and_then(|m| c.inventory.get(m)) else {
                    continue;
                };
                if let Some(t) = model_template(&info.dir) {
                    match seen.iter_mut().find(|(s, _)| *s == t) {
                        Some((_, n)) => *n += 1,
                        None => seen.push((t, 1)),
                    }
                }
            }
            // The first of the most common, as Python's `Counter.most_common`.
            let most = seen.iter().map(|(_, n)| *n).max()?;
            seen.into_iter().find(|(_, n)| *n == most).map(|(t, _)| t)
        }
    }
}

/// A checkpoint's chat template (`chat_template.jinja`, else
/// `tokenizer_config.json`'s, or its `default` entry), trimmed.
fn model_template(dir: &Path) -> Option<String> {
    if let Ok(text) = std::fs::read_to_string(dir.join("chat_template.jinja")) {
        return Some(text.trim().to_string()).filter(|t| !t.is_empty());
    }
    let text = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?;
    let config: Value = serde_json::from_str(&text).ok()?;
    let template = match config.get("chat_template")? {
        Value::String(s) => s.clone(),
        Value::Array(named) => named
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))?
            .get("template")?
            .as_str()?
            .to_string(),
        _ => return None,
    };
    Some(template.trim().to_string()).filter(|t| !t.is_empty())
}
