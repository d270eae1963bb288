//! Checks of `base`/`model`, `data` and `output` declarations.

use super::error::{LoraIssue, Problem};
use super::{Checker, Def, Scope};
use crate::diagnostic;
use crate::recipe::{Data, DataKind, Dtype, InputRef, Model, ModelSource, Output};
use crate::source::Span;
use crate::syntax::ast::{self, ItemKind, KeyValue};
use std::path::{Component, Path, PathBuf};

pub const DEFAULT_SEQ_LEN: u64 = 512;
/// mergekit's default `--out-shard-size`.
pub const DEFAULT_SHARD_SIZE: u64 = 5_000_000_000;

impl Checker<'_> {
    fn file_dir(&self, module: usize) -> PathBuf {
        let file = self.program.modules[module].file;
        self.program
            .sources
            .get(file)
            .dir()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }

    pub(super) fn model(&mut self, def: &Def, decl: &ast::ModelDecl) -> Model {
        let written = decl.source.value.as_str();
        let dir = self.file_dir(def.module);
        let source = if is_local(written, &dir) {
            if let Some(rev) = &decl.revision {
                self.report(Problem::RevisionIgnored { span: rev.span });
            }
            ModelSource::Local {
                path: normalize(&dir.join(expand_home(written))),
            }
        } else {
            ModelSource::Hub {
                id: written.to_string(),
                revision: decl.revision.as_ref().map(|r| r.value.clone()),
            }
        };
        let lora_base = decl.lora_base.as_ref().and_then(|base| {
            if !matches!(source, ModelSource::Local { .. }) {
                self.report(Problem::BadLora {
                    span: decl.source.span,
                    issue: LoraIssue::NotLocal,
                });
            }
            let scope = Scope {
                module: def.module,
                args: None,
            };
            let expr = ast::Expr {
                kind: ast::ExprKind::Path(base.clone()),
                span: base.span,
            };
            match self.input_ref(&scope, &expr)? {
                InputRef::Model(m) => Some(m),
                InputRef::Merge(_) => {
                    self.report(Problem::BadLora {
                        span: base.span,
                        issue: LoraIssue::MergeBase,
                    });
                    None
                }
            }
        });
        Model {
            name: self
                .recipe
                .models
                .iter()
                .find(|m| m.span == decl.name.span)
                .map_or_else(|| decl.name.name.clone(), |m| m.name.clone()),
            is_base: decl.is_base,
            source,
            lora_base,
            span: decl.name.span,
        }
    }

    pub(super) fn data(&mut self, def: &Def, decl: &ast::DataDecl) -> Data {
        let scope = Scope {
            module: def.module,
            args: None,
        };
        let mut data = super::placeholder_data(decl);
        if let Some(DataId(i)) = self.data_id(def) {
            data.name = self.recipe.data[i].name.clone();
        }
        let kind_expr = ast::Expr {
            kind: ast::ExprKind::Path(ast::Path {
                qualifier: None,
                name: decl.kind.clone(),
                span: decl.kind.span,
            }),
            span: decl.kind.span,
        };
        data.kind = match self
            .word(&kind_expr, &["jsonl", "text"], "a data format")
            .as_deref()
        {
            Some("text") => DataKind::Text,
            _ => DataKind::Jsonl,
        };
        data.path = normalize(&self.file_dir(def.module).join(&decl.arg.value));
        for option in decl.options.iter().flat_map(|b| &b.items) {
            let key = option.key.name.as_str();
            match key {
                "field" if data.kind == DataKind::Jsonl => {
                    if let Some(s) = self.string(&scope, &option.value) {
                        data.field = s;
                    }
                }
                "field" => self.report(Problem::FieldOnText {
                    span: option.key.span,
                    kind: decl.kind.span,
                }),
                "samples" => data.samples = self.positive_int(&scope, option).or(data.samples),
                "seq_len" => {
                    data.seq_len = self.positive_int(&scope, option).unwrap_or(data.seq_len)
                }
                "seed" => data.seed = self.seed(&scope, &option.value).unwrap_or(0),
                _ => self.unknown_option(
                    option,
                    &["field", "samples", "seq_len", "seed"],
                    "data option",
                ),
            }
        }
        self.data_exists(&data, decl.arg.span);
        data
    }

    fn data_id(&self, def: &Def) -> Option<DataId> {
        match def.kind {
            super::DefKind::Data(id) => Some(DataId(id.0)),
            _ => None,
        }
    }

    fn data_exists(&mut self, data: &Data, span: Span) {
        let found = match data.kind {
            DataKind::Jsonl => data.path.is_file(),
            DataKind::Text => glob::glob(&data.path.to_string_lossy())
                .map(|mut paths| paths.any(|p| p.is_ok_and(|p| p.is_file())))
                .unwrap_or(false),
        };
        if !found {
            self.report(Problem::DataNotFound {
                span,
                name: data.name.clone(),
                path: data.path.clone(),
                kind: data.kind,
            });
        }
    }

    pub(super) fn positive_int(&mut self, scope: &Scope, option: &KeyValue) -> Option<u64> {
        let n = self.number(scope, &option.value, "a positive integer")?;
        if n >= 1.0 && n.fract() == 0.0 && n <= 1e15 {
            return Some(n as u64);
        }
        self.report(Problem::NotPositiveInt {
            span: option.value.span,
            key: option.key.name.clone(),
            value: n,
        });
        None
    }

    pub(super) fn seed(&mut self, scope: &Scope, expr: &ast::Expr) -> Option<u64> {
        let n = self.number(scope, expr, "a non-negative integer")?;
        if n >= 0.0 && n.fract() == 0.0 && n <= 9.0e15 {
            return Some(n as u64);
        }
        self.report(Problem::BadSeed {
            span: expr.span,
            value: n,
        });
        None
    }

    fn unknown_option(
        &mut self,
        option: &KeyValue,
        known: &'static [&'static str],
        what: &'static str,
    ) {
        self.report(Problem::UnknownOption {
            span: option.key.span,
            key: option.key.name.clone(),
            what,
            known,
            suggestion: diagnostic::suggest(&option.key.name, known.iter().copied()),
        });
    }

    /// The root file's outputs: each names a merge and a directory.
    pub(super) fn outputs(&mut self) {
        let Some(root) = self.program.modules.first() else {
            return;
        };
        let scope = Scope {
            module: 0,
            args: None,
        };
        let dir = self.file_dir(0);
        let mut seen: Vec<(PathBuf, Span)> = Vec::new();
        for item in &root.ast.items {
            let ItemKind::Output(decl) = &item.kind else {
                continue;
            };
            let merge_expr = ast::Expr {
                kind: ast::ExprKind::Path(decl.merge.clone()),
                span: decl.merge.span,
            };
            let target = self.input_ref(&scope, &merge_expr);
            let merge = match target {
                Some(InputRef::Merge(m)) => Some(m),
                Some(InputRef::Model(_)) => {
                    self.report(Problem::OutputOfModel {
                        span: decl.merge.span,
                        name: decl.merge.to_string(),
                    });
                    None
                }
                None => None,
            };
            let path = normalize(&dir.join(expand_home(&decl.path.value)));
            if let Some((_, other)) = seen
                .iter()
                .find(|(p, _)| p.starts_with(&path) || path.starts_with(p))
            {
                self.report(Problem::OutputsShareDirectory {
                    span: decl.path.span,
                    path: path.clone(),
                    other: *other,
                });
            }
            seen.push((path.clone(), decl.path.span));
            self.output_over_input(&path, decl.path.span);
            let mut output = Output {
                merge: merge.unwrap_or(crate::recipe::MergeId(0)),
                path,
                written: decl.path.value.clone(),
                dtype: None,
                shard_size: DEFAULT_SHARD_SIZE,
                tokenizer: None,
                vocabulary: None,
                chat_template: None,
                span: decl.path.span,
            };
            for option in decl.options.iter().flat_map(|b| &b.items) {
                match option.key.name.as_str() {
                    "dtype" => {
                        output.dtype = self
                            .word(&option.value, DTYPE_WORDS, "an output dtype")
                            .and_then(|w| Dtype::from_word(&w))
                    }
                    "shard_size" => {
                        if let Some(text) = self.string(&scope, &option.value) {
                            match parse_size(&text) {
                                Some(n) => output.shard_size = n,
                                None => self.report(Problem::NotASize {
                                    span: option.value.span,
                                    text,
                                }),
                            }
                        }
                    }
                    key if super::tokenizer::TOKENIZER_OPTIONS.contains(&key) => {}
                    _ => self.unknown_option(
                        option,
                        &[
                            "dtype",
                            "shard_size",
                            "tokenizer",
                            "pad_to_multiple_of",
                            "chat_template",
                        ],
                        "output option",
                    ),
                }
            }
            self.output_tokenizer(&scope, decl, &mut output);
            if merge.is_some() {
                self.recipe.outputs.push(output);
            }
        }
    }

    fn output_over_input(&mut self, path: &Path, span: Span) {
        let clash = self.recipe.models.iter().find_map(|m| match &m.source {
            ModelSource::Local { path: p } if p.starts_with(path) || path.starts_with(p) => {
                Some((m.name.clone(), m.span))
            }
            _ => None,
        });
        if let Some((model, model_span)) = clash {
            self.report(Problem::OutputOverModel {
                span,
                model,
                model_span,
            });
        }
    }
}

use crate::recipe::DataId;

/// Output dtypes: obim's names and the `config.json` names mergekit users write.
const DTYPE_WORDS: &[&str] = &["bf16", "f16", "f32", "bfloat16", "float16", "float32"];

/// A source is a local directory when it looks like a path or names one.
pub fn is_local(written: &str, dir: &Path) -> bool {
    let looks_like_path = ["./", "../", "/", "~"]
        .iter()
        .any(|p| written.starts_with(p))
        || written == "."
        || written == "..";
    let is_hub_id = {
        let parts: Vec<&str> = written.split('/').collect();
        parts.len() == 2
            && parts.iter().all(|p| {
                !p.is_empty()
                    && p.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            })
    };
    looks_like_path || dir.join(written).is_dir() || !is_hub_id
}

fn expand_home(path: &str) -> PathBuf {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(path),
    }
}

/// Removes `.` and resolves `..` lexically, so equal paths compare equal.
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if out.file_name().is_some_and(|n| n != "..") => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    if out.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        out
    }
}

/// "5GB" → 5·10⁹, "500MiB" → 500·2²⁰, "1000" → 1000 bytes.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "K" | "KB" => 1e3,
        "M" | "MB" => 1e6,
        "G" | "GB" => 1e9,
        "T" | "TB" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        "TIB" => 1024.0f64.powi(4),
        _ => return None,
    };
    let bytes = number * factor;
    (1.0..1e18).contains(&bytes).then_some(bytes as u64)
}
