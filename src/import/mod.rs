//! `obim import`: a mergekit config (`mergekit-yaml`'s schema, or
//! `mergekit-multi`'s documents separated by `---`, each a named stage)
//! read with positions ([`marked_yaml`]), mapped onto a `.obim` recipe that
//! means the same merge, and formatted. What has no `.obim` form is a
//! diagnostic at its YAML line ([`problem::ImportProblem`]), never a silent
//! drop; comments are carried to the line made from what they annotate.
//!
//! mergekit's parameter precedence is kept: a model's own value beats a
//! global one; within one parameter's list of `filter`s the first that
//! matches wins (obim's later `layers` rules win, so filters become rules in
//! reverse order); a filter is a substring, which is the glob `"*filter*"`.

mod names;
mod problem;
mod yaml;

use std::collections::{HashMap, HashSet};
use std::path::Path;

use marked_yaml::types::{MarkedMappingNode, MarkedScalarNode, Node};

use crate::diagnostic::Diagnostic;
use crate::methods::{Method, Scope};
use crate::source::{FileId, SourceMap, Span};
use names::Names;
pub use problem::ImportProblem;
use yaml::{
    YamlComment, char_to_byte, format_number, load_error_offset, same_parameters, split_documents,
    yaml_comments,
};

/// The result of an import: the recipe (when nothing stopped it), and what
/// was said about the YAML.
pub struct Imported {
    pub recipe: Option<String>,
    pub diagnostics: Vec<Diagnostic>,
    pub sources: SourceMap,
}

/// Imports the mergekit config `yaml` (read from `path`) as a recipe to be
/// written into `recipe_dir`: local model paths (found beside the config,
/// else in the working directory, where mergekit looks) are made relative
/// to it.
pub fn import(path: &Path, yaml: &str, recipe_dir: &Path) -> Imported {
    let mut sources = SourceMap::default();
    let file = sources.add(path.display().to_string(), Some(path.to_path_buf()), yaml);
    let mut importer = Importer {
        file,
        yaml,
        yaml_dir: path.parent().unwrap_or(Path::new(".")),
        recipe_dir,
        problems: Vec::new(),
        names: Names::default(),
        lines: Vec::new(),
    };
    let recipe = importer.run(path);
    let diagnostics: Vec<Diagnostic> = importer
        .problems
        .into_iter()
        .map(ImportProblem::into_diagnostic)
        .collect();
    let failed = diagnostics.iter().any(Diagnostic::is_error);
    Imported {
        recipe: recipe.filter(|_| !failed),
        diagnostics,
        sources,
    }
}

/// One line of the recipe being written, the YAML line it comes from, and
/// other YAML lines folded into it (whose trailing comments it takes).
struct Line {
    yaml_line: Option<usize>,
    also: Vec<usize>,
    text: String,
}

struct Importer<'a> {
    file: FileId,
    yaml: &'a str,
    yaml_dir: &'a Path,
    recipe_dir: &'a Path,
    problems: Vec<ImportProblem>,
    names: Names,
    lines: Vec<Line>,
}

/// A document of the config: one merge.
struct Stage<'y> {
    name: String,
    map: &'y MarkedMappingNode,
    /// Where the document starts in the file (its markers count from there).
    offset: usize,
}

/// A parameter value as the recipe writes it, and its YAML line.
#[derive(Clone)]
struct Value {
    text: String,
    line: usize,
}

/// One `filter`/`value` pair of a parameter (`filter: None` matches all).
struct Conditional {
    filter: Option<String>,
    value: Value,
}

impl<'a> Importer<'a> {
    fn run(&mut self, path: &Path) -> Option<String> {
        let documents = split_documents(self.yaml);
        let mut parsed = Vec::new();
        for (offset, text) in &documents {
            match marked_yaml::parse_yaml(0, text) {
                Ok(node) => parsed.push((*offset, node)),
                Err(e) => {
                    let at =
                        load_error_offset(&e).map_or(*offset, |c| offset + char_to_byte(text, c));
                    self.problems.push(ImportProblem::Yaml {
                        span: Span::new(self.file, at, at),
                        message: e.to_string(),
                    });
                }
            }
        }
        if !self.problems.is_empty() {
            return None;
        }
        let multi = parsed.len() > 1;
        let stem = path
            .file_stem()
            .map_or("merged".to_string(), |s| s.to_string_lossy().to_string());
        let mut stages = Vec::new();
        for (i, (offset, node)) in parsed.iter().enumerate() {
            let Some(map) = node.as_mapping() else {
                continue;
            };
            let name = match map.get_scalar("name") {
                Some(n) => n.as_str().to_string(),
                None if multi => format!("stage{}", i + 1),
                None => stem.clone(),
            };
            stages.push(Stage {
                name,
                map,
                offset: *offset,
            });
        }
        // Stage names first: a model named like a stage is that stage.
        let stage_names: Vec<String> = stages.iter().map(|s| self.names.merge(&s.name)).collect();
        self.line(
            None,
            format!(
                "# Imported by `obim import` from {}.",
                path.file_name()
                    .map_or(String::new(), |f| f.to_string_lossy().to_string())
            ),
        );
        let mut referenced = HashSet::new();
        let mut bodies = Vec::new();
        for (stage, name) in stages.iter().zip(&stage_names) {
            let mut lines = std::mem::take(&mut self.lines);
            let body = self.stage(stage, name, &stages, &mut referenced);
            std::mem::swap(&mut self.lines, &mut lines);
            bodies.push((lines, body));
        }
        // Model declarations, then each stage's merge and its output.
        let declarations = self.names.declarations();
        for (yaml_line, text) in declarations {
            self.line(Some(yaml_line), text);
        }
        for ((lines, body), (stage, name)) in
            bodies.into_iter().zip(stages.iter().zip(&stage_names))
        {
            self.line(None, String::new());
            self.lines.extend(lines);
            let Some(dtype) = body else { continue };
            if !referenced.contains(name) {
                let line = self.line_of(
                    stage.map.span().start().map_or(0, |m| m.character()),
                    stage.offset,
                );
                self.line(
                    Some(line),
                    format!("output {name} -> \"out/{}\"{dtype}", stage.name),
                );
            }
        }
        Some(self.render())
    }

    fn line(&mut self, yaml_line: Option<usize>, text: String) {
        self.lines.push(Line {
            yaml_line,
            also: Vec::new(),
            text,
        });
    }

    /// The span in the whole file of a node of a document at `offset`.
    fn span(&self, node_span: &marked_yaml::Span, offset: usize, text: &str) -> Span {
        let start = node_span.start().map_or(0, |m| m.character());
        let doc = &self.yaml[offset..];
        let at = offset + char_to_byte(doc, start);
        let end = (at + text.len()).min(self.yaml.len());
        Span::new(self.file, at, end)
    }

    /// The 1-based line of character `character` of the document at `offset`.
    fn line_of(&self, character: usize, offset: usize) -> usize {
        let at = offset + char_to_byte(&self.yaml[offset..], character);
        self.yaml[..at].matches('\n').count() + 1
    }

    fn scalar_span(&self, node: &MarkedScalarNode, offset: usize) -> Span {
        self.span(node.span(), offset, node.as_str())
    }

    fn node_span(&self, node: &Node, offset: usize) -> Span {
        match node {
            Node::Scalar(s) => self.scalar_span(s, offset),
            other => self.span(other.span(), offset, ""),
        }
    }

    fn node_line(&self, node: &Node, offset: usize) -> usize {
        self.line_of(node.span().start().map_or(0, |m| m.character()), offset)
    }

    /// One stage's merge; returns the output's options (` { dtype f16 }`),
    /// `None` when the stage could not be mapped.
    fn stage(
        &mut self,
        stage: &Stage,
        name: &str,
        stages: &[Stage],
        referenced: &mut HashSet<String>,
    ) -> Option<String> {
        let (map, offset) = (stage.map, stage.offset);
        let known = [
            "name",
            "merge_method",
            "base_model",
            "models",
            "slices",
            "parameters",
            "dtype",
            "out_dtype",
            "tokenizer_source",
            "tokenizer",
            "chat_template",
            "modules",
        ];
        for (key, value) in map.iter() {
            let k = key.as_str();
            if known.contains(&k) {
                continue;
            }
            let what = match k {
                "experts" | "gate_mode" | "experts_per_token" => ImportProblem::MoeConfig {
                    span: self.scalar_span(key, offset),
                },
                "genome" | "tasks" => ImportProblem::EvolveConfig {
                    span: self.scalar_span(key, offset),
                },
                _ => ImportProblem::UnknownKey {
                    span: self.scalar_span(key, offset),
                    key: k.to_string(),
                },
            };
            let _ = value;
            self.problems.push(what);
        }
        for unsupported in ["modules"] {
            if let Some((key, _)) = map.iter().find(|(k, _)| k.as_str() == unsupported) {
                self.problems.push(ImportProblem::NotYet {
                    span: self.scalar_span(key, offset),
                    key: unsupported.to_string(),
                });
            }
        }
        let Some(method_node) = map.get_scalar("merge_method") else {
            self.problems.push(ImportProblem::NoMethod {
                span: self.span(map.span(), offset, ""),
            });
            return None;
        };
        let method = Method::from_name(method_node.as_str());
        if method.is_none() {
            self.problems.push(ImportProblem::UnknownMethod {
                span: self.scalar_span(method_node, offset),
                method: method_node.as_str().to_string(),
            });
        }
        let mut model_ref = |this: &mut Self, node: &MarkedScalarNode| -> Option<String> {
            let text = node.as_str();
            if let Some(s) = stages.iter().find(|s| s.name == text) {
                let merge = this.names.merge(&s.name);
                referenced.insert(merge.clone());
                return Some(merge);
            }
            let line = this.line_of(node.span().start().map_or(0, |m| m.character()), offset);
            // mergekit's `model+adapter`: a LoRA adapter on the model.
            if let Some((model, adapter)) = text.split_once('+') {
                if model.is_empty() || adapter.is_empty() || adapter.contains('+') {
                    this.problems.push(ImportProblem::Lora {
                        span: this.scalar_span(node, offset),
                    });
                    return None;
                }
                let dirs = (this.yaml_dir, this.recipe_dir);
                let base = this.names.model(model, line, dirs);
                return Some(this.names.lora(text, adapter, &base, line, dirs));
            }
            Some(
                this.names
                    .model(text, line, (this.yaml_dir, this.recipe_dir)),
            )
        };
        let base = match map.get_scalar("base_model") {
            Some(b) => model_ref(self, b),
            None => None,
        };
        if let Some(b) = &base {
            self.names.mark_base(b);
        }
        let Some(method) = method else {
            // Still say what else could not be imported.
            for entry in map.get_sequence("models").iter().flat_map(|l| l.iter()) {
                if let Some(model) = entry.as_mapping().and_then(|m| m.get_scalar("model")) {
                    model_ref(self, model);
                }
            }
            self.output_options(map, offset);
            return None;
        };
        // Inputs (in order) with their own parameters.
        let mut inputs: Vec<(String, Option<&MarkedMappingNode>)> = Vec::new();
        // The YAML line of each input's `model:`.
        let mut input_lines: HashMap<String, usize> = HashMap::new();
        let mut slices: Vec<Vec<(String, (usize, usize))>> = Vec::new();
        if let Some(models) = map.get_sequence("models") {
            for entry in models.iter() {
                let Some(m) = entry.as_mapping() else {
                    continue;
                };
                let Some(model) = m.get_scalar("model") else {
                    continue;
                };
                let Some(name) = model_ref(self, model) else {
                    continue;
                };
                if Some(&name) == base.as_ref() {
                    continue; // the base is no input in obim
                }
                input_lines.insert(name.clone(), self.node_line(entry, offset));
                inputs.push((name, m.get_mapping("parameters")));
            }
        }
        if let Some(list) = map.get_sequence("slices") {
            for slice in list.iter() {
                let Some(s) = slice.as_mapping() else {
                    continue;
                };
                for extra in ["base_model", "residual_weight", "parameters"] {
                    if let Some((key, _)) = s.iter().find(|(k, _)| k.as_str() == extra) {
                        self.problems.push(ImportProblem::NotYet {
                            span: self.scalar_span(key, offset),
                            key: format!("slices[].{extra}"),
                        });
                    }
                }
                let mut sources = Vec::new();
                for source in s.get_sequence("sources").iter().flat_map(|l| l.iter()) {
                    let Some(src) = source.as_mapping() else {
                        continue;
                    };
                    let Some(model) = src.get_scalar("model") else {
                        continue;
                    };
                    let Some(name) = model_ref(self, model) else {
                        continue;
                    };
                    let range = src.get_sequence("layer_range").and_then(|r| {
                        Some((r.get_scalar(0)?.as_usize()?, r.get_scalar(1)?.as_usize()?))
                    });
                    let Some(range) = range else {
                        self.problems.push(ImportProblem::BadValue {
                            span: self.node_span(source, offset),
                            key: "layer_range".into(),
                            reason: "a slice source needs `layer_range: [FROM, TO]`".into(),
                        });
                        continue;
                    };
                    let params = src.get_mapping("parameters");
                    if Some(&name) != base.as_ref() {
                        match inputs.iter().find(|(n, _)| *n == name) {
                            None => {
                                input_lines.insert(name.clone(), self.node_line(source, offset));
                                inputs.push((name.clone(), params))
                            }
                            Some((_, first)) => {
                                if !same_parameters(*first, params) {
                                    self.problems.push(ImportProblem::SliceParameters {
                                        span: self.node_span(source, offset),
                                        model: name.clone(),
                                    });
                                }
                            }
                        }
                    }
                    sources.push((name, range));
                }
                slices.push(sources);
            }
        }
        // The merge header: base and global parameters.
        let mut header: Vec<String> = Vec::new();
        let mut header_lines: Vec<usize> = Vec::new();
        if let Some(b) = &base {
            match method.base() {
                crate::methods::BaseUse::None => {
                    // mergekit adds a base to methods without one as one more input.
                    inputs.push((b.clone(), None));
                }
                _ => header.push(format!("base: {b}")),
            }
        }
        let mut statements: Vec<(usize, String)> = Vec::new();
        let mut rules: Vec<(usize, String, String)> = Vec::new(); // (line, pattern, body)
        let own_keys: HashMap<String, HashSet<String>> = inputs
            .iter()
            .map(|(n, p)| {
                let keys = p
                    .map(|p| p.iter().map(|(k, _)| k.as_str().to_string()).collect())
                    .unwrap_or_default();
                (n.clone(), keys)
            })
            .collect();
        if let Some(params) = map.get_mapping("parameters") {
            for (key, value) in params.iter() {
                let k = key.as_str();
                let Some(param) = method.param(k).filter(|p| p.name != "base") else {
                    self.problems.push(ImportProblem::UnknownParam {
                        span: self.scalar_span(key, offset),
                        method,
                        key: k.to_string(),
                    });
                    continue;
                };
                let line = self.node_line(value, offset);
                let conditionals = self.conditionals(value, k, offset);
                for c in conditionals {
                    match (&c.filter, param.scope) {
                        (None, _) => {
                            header_lines.push(c.value.line);
                            header.push(format!("{k}: {}", c.value.text))
                        }
                        (Some(f), Scope::Merge) => {
                            rules.push((line, f.clone(), format!("{k}: {}", c.value.text)))
                        }
                        (Some(f), Scope::Input) => {
                            // A global value never beats a model's own: the rule names
                            // only the inputs without one.
                            for (input, _) in &inputs {
                                if !own_keys[input].contains(k) {
                                    rules.push((
                                        line,
                                        f.clone(),
                                        format!("{input} {k} {}", c.value.text),
                                    ));
                                }
                            }
                        }
                    }
                }
            }
        }
        // Each input's own parameters.
        let single_input = inputs.len() == 1;
        let mut entries: Vec<(usize, Vec<usize>, String)> = Vec::new();
        for (input, params) in &inputs {
            let mut entry = input.clone();
            let mut line = input_lines.get(input).copied().unwrap_or(usize::MAX);
            let mut also = Vec::new();
            for (key, value) in params.iter().flat_map(|p| p.iter()) {
                let k = key.as_str();
                line = line.min(self.node_line(value, offset));
                let Some(param) = method.param(k).filter(|p| p.name != "base") else {
                    self.problems.push(ImportProblem::UnknownParam {
                        span: self.scalar_span(key, offset),
                        method,
                        key: k.to_string(),
                    });
                    continue;
                };
                let setting = crate::syntax::SETTING_KEYWORDS.contains(&k)
                    || ["gamma", "epsilon"].contains(&k);
                let value_line = self.node_line(value, offset);
                for c in self.conditionals(value, k, offset) {
                    let text = match (param.scope, setting) {
                        (Scope::Input, true) => format!("{input} {k} {}", c.value.text),
                        // mergekit takes per-model values of merge-wide parameters
                        // (passthrough's `scale`); with one input they are the merge's.
                        _ if single_input => format!("{k}: {}", c.value.text),
                        _ => {
                            self.problems.push(ImportProblem::PerModelMergeParam {
                                span: self.scalar_span(key, offset),
                                key: k.to_string(),
                                method,
                            });
                            continue;
                        }
                    };
                    match &c.filter {
                        None if text.starts_with(&format!("{input} ")) => {
                            also.push(c.value.line);
                            entry.push_str(&text[input.len()..]);
                        }
                        None => {
                            header_lines.push(c.value.line);
                            header.push(text)
                        }
                        Some(f) => rules.push((value_line, f.clone(), text)),
                    }
                }
            }
            if slices.is_empty() || entry != *input {
                entries.push((line, also, entry));
            }
        }
        for sources in &slices {
            let parts: Vec<String> = sources
                .iter()
                .map(|(n, (from, to))| format!("{n} layers [{from}, {to}]"))
                .collect();
            statements.push((usize::MAX, format!("slice {}", parts.join(", "))));
        }
        // The merge.
        let method_line = self.node_line(&Node::Scalar(method_node.clone()), offset);
        let params = if header.is_empty() {
            String::new()
        } else {
            format!("({})", header.join(", "))
        };
        self.line(
            Some(method_line),
            format!("merge {name} = {method}{params} {{"),
        );
        if let Some(last) = self.lines.last_mut() {
            last.also = header_lines;
        }
        for (line, also, text) in entries {
            self.line((line != usize::MAX).then_some(line), format!("    {text}"));
            if let Some(last) = self.lines.last_mut() {
                last.also = also;
            }
        }
        for (line, text) in statements {
            self.line((line != usize::MAX).then_some(line), format!("    {text}"));
        }
        // Rules: mergekit's first matching filter wins, obim's last rule does.
        for (line, pattern, body) in rules.into_iter().rev() {
            self.line(
                Some(line),
                format!("    layers \"*{pattern}*\" {{ {body} }}"),
            );
        }
        self.line(None, "}".into());
        Some(self.output_options(map, offset))
    }

    /// `dtype`, `out_dtype`, `tokenizer_source`, the `tokenizer:` block and
    /// `chat_template` as output options.
    fn output_options(&mut self, map: &MarkedMappingNode, offset: usize) -> String {
        let mut options = Vec::new();
        let dtype = map
            .get_scalar("out_dtype")
            .or_else(|| map.get_scalar("dtype"));
        if let Some(d) = dtype {
            match crate::recipe::Dtype::from_word(d.as_str()) {
                Some(d) => options.push(format!("dtype {}", d.name())),
                None => self.problems.push(ImportProblem::BadValue {
                    span: self.scalar_span(d, offset),
                    key: "dtype".into(),
                    reason: "obim writes bfloat16, float16 or float32".into(),
                }),
            }
        }
        if let Some(t) = map.get_scalar("tokenizer_source") {
            options.push(format!("tokenizer {}", self.tokenizer_source(t, offset)));
        }
        if let Some(block) = map.get_node("tokenizer") {
            options.extend(self.tokenizer_block(block, offset));
        }
        if let Some(t) = map.get_scalar("chat_template") {
            let text = t.as_str();
            let named =
                text == "auto" || crate::vocab::CHAT_TEMPLATES.iter().any(|(n, _)| *n == text);
            if named {
                options.push(format!("chat_template {text}"));
            } else if text.len() < 20 || !text.contains('{') {
                // mergekit refuses it too ("Invalid chat template").
                self.problems.push(ImportProblem::BadValue {
                    span: self.scalar_span(t, offset),
                    key: "chat_template".into(),
                    reason: "neither a template name (auto, alpaca, chatml, exaone, llama3, mistral) nor a Jinja template".into(),
                });
            } else {
                options.push(format!("chat_template {}", quote(text)));
            }
        }
        if options.is_empty() {
            String::new()
        } else {
            format!(" {{\n{}\n}}", options.join("\n"))
        }
    }

    /// `tokenizer_source` (or the `tokenizer:` block's `source`): `union`,
    /// `base` or a model's name.
    fn tokenizer_source(&mut self, t: &MarkedScalarNode, offset: usize) -> String {
        match t.as_str() {
            word @ ("base" | "union") => word.to_string(),
            other => self.model_name(t, other, offset),
        }
    }

    fn model_name(&mut self, node: &MarkedScalarNode, reference: &str, offset: usize) -> String {
        let line = self.line_of(node.span().start().map_or(0, |m| m.character()), offset);
        self.names
            .model(reference, line, (self.yaml_dir, self.recipe_dir))
    }

    /// mergekit's `tokenizer:` block: `source` (union by default),
    /// `pad_to_multiple_of` and `tokens`, as output options and `token` lines.
    fn tokenizer_block(&mut self, node: &Node, offset: usize) -> Vec<String> {
        let Some(block) = node.as_mapping() else {
            self.problems.push(ImportProblem::BadValue {
                span: self.node_span(node, offset),
                key: "tokenizer".into(),
                reason: "expected a mapping with `source`, `tokens`, `pad_to_multiple_of`".into(),
            });
            return Vec::new();
        };
        let mut lines = vec![match block.get_scalar("source") {
            Some(t) => format!("tokenizer {}", self.tokenizer_source(t, offset)),
            None => "tokenizer union".to_string(),
        }];
        if let Some(pad) = block.get_scalar("pad_to_multiple_of") {
            lines.push(format!("pad_to_multiple_of {}", pad.as_str()));
        }
        let tokens = block.get_node("tokens").and_then(Node::as_mapping);
        for (token, cfg) in tokens.iter().flat_map(|m| m.iter()) {
            if let Some(line) = self.token_line(token.as_str(), cfg, offset) {
                lines.push(line);
            }
        }
        lines
    }

    /// One entry of `tokenizer.tokens` as a `token` line.
    fn token_line(&mut self, token: &str, cfg: &Node, offset: usize) -> Option<String> {
        let bad = |this: &mut Self, node: &Node, reason: &str| {
            this.problems.push(ImportProblem::BadValue {
                span: this.node_span(node, offset),
                key: format!("tokenizer.tokens.{token}"),
                reason: reason.into(),
            });
        };
        let Some(cfg) = cfg.as_mapping() else {
            bad(self, cfg, "expected a mapping with `source` and `force`");
            return None;
        };
        let mut line = format!("token {}", quote(token));
        match cfg.get_node("source") {
            None => {}
            Some(Node::Scalar(model)) => {
                let name = self.model_name(model, model.as_str(), offset);
                line.push_str(&format!(" from {name}"));
            }
            Some(source @ Node::Mapping(m)) => match m.get_scalar("kind").map(|k| k.as_str()) {
                Some("zero") => line.push_str(" zero"),
                Some("model_token") => {
                    let Some(model) = m.get_scalar("model") else {
                        bad(self, source, "`model_token` needs `model`");
                        return None;
                    };
                    let name = self.model_name(model, model.as_str(), offset);
                    let of = match (m.get_scalar("token"), m.get_scalar("token_id")) {
                        (Some(t), None) => quote(t.as_str()),
                        (None, Some(id)) if id.as_str().parse::<u32>().is_ok() => {
                            id.as_str().to_string()
                        }
                        _ => {
                            bad(
                                self,
                                source,
                                "`model_token` needs one of `token` or `token_id` (a whole number)",
                            );
                            return None;
                        }
                    };
                    line.push_str(&format!(" from {name} {of}"));
                }
                _ => {
                    bad(self, source, "expected `kind: zero` or `kind: model_token`");
                    return None;
                }
            },
            Some(other) => {
                bad(
                    self,
                    other,
                    "expected a model, `{kind: zero}` or `{kind: model_token, ...}`",
                );
                return None;
            }
        }
        match cfg.get_scalar("force").map(|f| f.as_str()) {
            Some("true" | "True") => line.push_str(" force"),
            Some("false" | "False") | None => {}
            Some(_) => {
                if let Some(f) = cfg.get_node("force") {
                    bad(self, f, "`force` is true or false");
                }
            }
        }
        Some(line)
    }

    /// A parameter's value as `filter`/`value` pairs in mergekit's order,
    /// up to the first that matches every tensor (the rest never apply).
    fn conditionals(&mut self, node: &Node, key: &str, offset: usize) -> Vec<Conditional> {
        let plain = |this: &mut Self, node: &Node| this.value(node, key, offset);
        let items: Vec<&Node> = match node {
            Node::Sequence(s) if s.iter().all(|n| n.as_mapping().is_some()) && !s.is_empty() => {
                s.iter().collect()
            }
            _ => {
                return plain(self, node)
                    .map(|value| {
                        vec![Conditional {
                            filter: None,
                            value,
                        }]
                    })
                    .unwrap_or_default();
            }
        };
        let mut out = Vec::new();
        for item in items {
            let Some(m) = item.as_mapping() else { continue };
            let filter = m.get_scalar("filter").map(|f| f.as_str().to_string());
            let filter = filter.filter(|f| f != "*");
            let Some(value) = m.get_node("value") else {
                self.problems.push(ImportProblem::BadValue {
                    span: self.node_span(item, offset),
                    key: key.into(),
                    reason: "a conditional parameter needs `value`".into(),
                });
                continue;
            };
            if let Some(f) = &filter
                && f.chars().any(|c| "*?{}[]\"\\".contains(c))
            {
                self.problems.push(ImportProblem::BadValue {
                    span: self.node_span(item, offset),
                    key: "filter".into(),
                    reason: format!("`{f}` has glob characters; write the rule by hand"),
                });
                continue;
            }
            if out.last().is_some_and(|c: &Conditional| c.filter.is_none()) {
                let span = match m.iter().find(|(k, _)| k.as_str() == "filter") {
                    Some((k, _)) => self.scalar_span(k, offset),
                    None => self.node_span(item, offset),
                };
                self.problems.push(ImportProblem::NeverApplies {
                    span,
                    key: key.into(),
                });
                continue;
            }
            let Some(value) = plain(self, value) else {
                continue;
            };
            out.push(Conditional { filter, value });
        }
        out
    }

    /// A scalar or a gradient (a list of scalars) as recipe text.
    fn value(&mut self, node: &Node, key: &str, offset: usize) -> Option<Value> {
        let span = self.node_span(node, offset);
        let line = self.node_line(node, offset);
        let scalar = |s: &MarkedScalarNode| -> Option<String> {
            let text = s.as_str();
            if s.may_coerce() {
                if let Some(b) = s.as_bool() {
                    return Some(b.to_string());
                }
                if let Some(n) = s.as_f64() {
                    return Some(format_number(text, n));
                }
            }
            None
        };
        let text = match node {
            Node::Scalar(s) => scalar(s),
            Node::Sequence(list) => list
                .iter()
                .map(|n| n.as_scalar().and_then(scalar))
                .collect::<Option<Vec<String>>>()
                .map(|v| format!("[{}]", v.join(", "))),
            Node::Mapping(_) => None,
        };
        match text {
            Some(text) => Some(Value { text, line }),
            None => {
                self.problems.push(ImportProblem::BadValue {
                    span,
                    key: key.into(),
                    reason: "obim takes a number, `true`/`false`, a list of numbers, or `filter`/`value` pairs here".into(),
                });
                None
            }
        }
    }

    /// The recipe's text, the YAML's comments put before the line made from
    /// what they annotate (or after the line they end), then formatted.
    fn render(&mut self) -> String {
        let comments = yaml_comments(self.yaml);
        let mut placed = vec![false; comments.len()];
        let mut out = String::new();
        for line in &self.lines {
            let lines: Vec<usize> = line.yaml_line.iter().chain(&line.also).copied().collect();
            let first = lines.iter().min().copied();
            // A merge header cannot end in a comment: its trailing ones go above.
            let opens = line.text.trim_end().ends_with('{');
            for (i, c) in comments.iter().enumerate() {
                let before = first.is_some_and(|f| !c.trailing && c.line < f);
                let folded = opens && c.trailing && lines.contains(&c.line);
                if !placed[i] && (before || folded) {
                    out.push_str(&format!("# {}\n", c.text));
                    placed[i] = true;
                }
            }
            out.push_str(&line.text);
            let trailing: Vec<&str> = comments
                .iter()
                .enumerate()
                .filter(|(i, c)| !placed[*i] && c.trailing && lines.contains(&c.line))
                .map(|(_, c)| c.text.as_str())
                .collect();
            if !trailing.is_empty() {
                out.push_str(&format!("  # {}", trailing.join("; ")));
                for (i, c) in comments.iter().enumerate() {
                    if c.trailing && lines.contains(&c.line) {
                        placed[i] = true;
                    }
                }
            }
            out.push('\n');
        }
        let rest: Vec<&YamlComment> = comments
            .iter()
            .zip(&placed)
            .filter(|(_, p)| !**p)
            .map(|(c, _)| c)
            .collect();
        if !rest.is_empty() {
            out.push('\n');
            for c in rest {
                out.push_str(&format!("# {}\n", c.text));
            }
        }
        crate::fmt::format(&out).unwrap_or(out)
    }
}

/// `text` as a `.obim` string literal.
fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
