//! The `open` stage: resolves every model of a checked recipe to files
//! (local directory or local Hugging Face cache), reads config.json and the
//! safetensors headers, and checks every merge's inputs against its base:
//! architecture, tensor names, shapes, and `layers` patterns that match
//! nothing. No tensor data is read.

use crate::checkpoint::{self, ModelInfo};
use crate::codes::Code;
use crate::data;
use crate::diagnostic::Diagnostic;
use crate::hub;
use crate::model::ModelConfig;
use crate::recipe::{DataKind, InputRef, Judge, ModelId, ModelSource, Recipe};
use std::collections::HashSet;

use crate::recipe::MergeId;
use crate::vocab::{VocabError, VocabSource, Vocabulary};
use std::collections::HashMap;
use std::sync::Arc;

/// What `open` found for each model of the recipe (indexed by [`ModelId`]).
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    pub models: Vec<Option<ModelInfo>>,
    /// Per model: its LoRA adapter (a `lora(...)` model; its `models` entry
    /// is its base's checkpoint).
    pub adapters: Vec<Option<std::sync::Arc<crate::lora::Adapter>>>,
    /// Per merge written with `tokenizer union | base | MODEL`: its output
    /// vocabulary and how each model's rows map onto it.
    pub vocabularies: HashMap<MergeId, Arc<Vocabulary>>,
}

impl Inventory {
    /// The LoRA adapter of a `lora(...)` model.
    pub fn adapter(&self, id: ModelId) -> Option<&crate::lora::Adapter> {
        self.adapters.get(id.0).and_then(Option::as_deref)
    }

    pub fn get(&self, id: ModelId) -> Option<&ModelInfo> {
        self.models.get(id.0).and_then(Option::as_ref)
    }

    /// The headers that describe an input's tensors (a merge has its base's).
    pub fn of_input(&self, recipe: &Recipe, input: InputRef) -> Option<&ModelInfo> {
        self.get(recipe.shape_source(input)?)
    }
}

pub fn open(recipe: &Recipe) -> (Inventory, Vec<Diagnostic>) {
    let mut diagnostics = Vec::new();
    let mut not_local = Vec::new();
    let models = recipe
        .models
        .iter()
        .map(|model| {
            let adapter = match &model.source {
                ModelSource::Local { path } => path.join("adapter_config.json").is_file(),
                ModelSource::Hub { .. } => false,
            };
            if model.lora_base.is_some() || adapter {
                // Opened below, once its base is (or its `lora` was an error).
                return None;
            }
            let dir = match &model.source {
                ModelSource::Local { path } => path.clone(),
                ModelSource::Hub { id, revision } => match hub::find_cached(id, revision.as_deref()) {
                    Some(dir) => dir,
                    None => {
                        not_local.push(model);
                        return None;
                    }
                },
            };
            match checkpoint::open_dir(&dir) {
                Ok(info) => Some(info),
                Err(e) => {
                    let code = match e {
                        checkpoint::CheckpointError::NotFound(_) | checkpoint::CheckpointError::NoWeights(_) => Code::E0021,
                        _ => Code::E0022,
                    };
                    let mut d = Diagnostic::new(code, model.span, format!("cannot open model `{}`", model.name)).label(crate::errors::with_causes(&e));
                    if code == Code::E0021 {
                        d = d.help("local directories are relative to the recipe; a Hugging Face id looks like `org/name`");
                    }
                    diagnostics.push(d);
                    None
                }
            }
        })
        .collect();
    if let Some((first, rest)) = not_local.split_first() {
        let names: Vec<String> = not_local.iter().map(|m| format!("`{}`", m.name)).collect();
        let mut d = Diagnostic::new(
            Code::N0001,
            first.span,
            format!(
                "not available locally: {}; header checks against the base are skipped for {}",
                names.join(", "),
                if names.len() == 1 { "it" } else { "them" }
            ),
        )
        .label("not in the local Hugging Face cache");
        for m in rest {
            d = d.with(m.span, "not in the cache either");
        }
        diagnostics.push(d.help(
            "`obim run` downloads them where the network allows; or fetch them into the Hugging Face cache (HF_HUB_CACHE / HF_HOME) with `huggingface-cli download ORG/NAME`",
        ));
    }
    let mut models: Vec<Option<ModelInfo>> = models;
    let mut adapters = vec![None; recipe.models.len()];
    for (i, model) in recipe.models.iter().enumerate() {
        let (Some(base), ModelSource::Local { path }) = (model.lora_base, &model.source) else {
            continue;
        };
        match crate::lora::Adapter::open(path) {
            Ok(adapter) => {
                // The base's tensors, identified by the base and the adapter.
                models[i] = models[base.0].clone().map(|mut info| {
                    info.hash =
                        blake3::hash(format!("{}+lora:{}", info.hash, adapter.hash).as_bytes())
                            .to_hex()
                            .to_string();
                    info
                });
                if let Some(info) = &models[base.0] {
                    for target in adapter.targeted() {
                        if !info.tensors.contains_key(target) {
                            diagnostics.push(
                                Diagnostic::new(
                                    Code::E0041,
                                    model.span,
                                    format!("the adapter of `{}` changes `{target}`, which `{}` does not have", model.name, recipe.models[base.0].name),
                                )
                                .label("adapter for another architecture?")
                                .help("give the adapter the checkpoint it was trained on as `base:`"),
                            );
                            break;
                        }
                    }
                }
                adapters[i] = Some(std::sync::Arc::new(adapter));
            }
            Err(e) => diagnostics.push(
                Diagnostic::new(
                    Code::E0041,
                    model.span,
                    format!("cannot read the LoRA adapter of `{}`", model.name),
                )
                .label(crate::errors::with_causes(&e)),
            ),
        }
    }
    let mut inventory = Inventory {
        models,
        adapters,
        vocabularies: Default::default(),
    };
    diagnostics.extend(vocabularies(recipe, &mut inventory));
    diagnostics.extend(compatibility(recipe, &inventory));
    diagnostics.extend(calibration(recipe, &inventory));
    diagnostics.extend(slice_bounds(recipe, &inventory));
    (inventory, diagnostics)
}

/// Builds the vocabulary of every output with `tokenizer union | base |
/// MODEL` (E0042 where it cannot be built; E0043 for one merge written
/// twice with different vocabularies).
fn vocabularies(recipe: &Recipe, inventory: &mut Inventory) -> Vec<Diagnostic> {
    let mut diagnostics = Vec::new();
    for (i, output) in recipe.outputs.iter().enumerate() {
        let Some(spec) = &output.vocabulary else {
            continue;
        };
        let name = &recipe.merges[output.merge.0].name;
        // The merge's tensors have one vocabulary: every output of it asks for it.
        let same_merge = |o: &&crate::recipe::Output| o.merge == output.merge;
        let first = recipe
            .outputs
            .iter()
            .position(|o| same_merge(&o) && o.vocabulary.is_some());
        if first != Some(i) {
            continue;
        }
        for other in recipe.outputs.iter().filter(same_merge) {
            if other.vocabulary.as_ref() != Some(spec) {
                diagnostics.push(
                    Diagnostic::new(
                        Code::E0043,
                        other.span,
                        format!("`{name}` is written with two vocabularies"),
                    )
                    .label("this output's tokenizer options differ")
                    .with(output.span, "from this output's")
                    .help("give every output of the merge the same `tokenizer`, `pad_to_multiple_of` and `token` lines, or merge twice under two names"),
                );
            }
        }
        if let Some(select) = &recipe.merges[output.merge.0].select {
            // Candidates are scored by the base's forward pass and tokenizer,
            // which do not have the output vocabulary's rows.
            diagnostics.push(
                Diagnostic::new(
                    Code::E0043,
                    select.span,
                    format!("`{name}` chooses settings and is written with an output vocabulary"),
                )
                .label("scored with the base's vocabulary")
                .with(output.span, "an output vocabulary")
                .help("choose the settings without `tokenizer ...` on the output first, then fix them and add the vocabulary (both together are not supported yet)"),
            );
            continue;
        }
        match vocabulary(recipe, inventory, output.merge, spec) {
            Some(Ok(v)) => {
                inventory.vocabularies.insert(output.merge, Arc::new(v));
            }
            Some(Err(e)) => {
                let span = e.span().unwrap_or(output.span);
                diagnostics.push(
                    Diagnostic::new(
                        Code::E0042,
                        span,
                        format!("cannot build the vocabulary of `{name}`"),
                    )
                    .label(crate::errors::with_causes(&e))
                    .help(match e {
                        VocabError::Tokenizer { .. } => "the output's tokenizer comes from there: give that model its tokenizer.json, or choose another `tokenizer`",
                        VocabError::NotAnInput { .. } => "take the row from the base or one of the merge's inputs",
                        VocabError::NoSuchToken { .. } => "name a token that model's tokenizer has (its tokenizer.json), or an id below its vocabulary size",
                    }),
                );
            }
            None => {}
        }
    }
    diagnostics
}

/// The vocabulary of merge `id` as `spec` asks, from its models'
/// tokenizers (`None` while a model is not available).
fn vocabulary(
    recipe: &Recipe,
    inventory: &Inventory,
    id: MergeId,
    spec: &crate::vocab::VocabSpec,
) -> Option<Result<Vocabulary, VocabError>> {
    let merge = &recipe.merges[id.0];
    let base = merge.base.and_then(|b| recipe.shape_source(b));
    let mut models: Vec<(ModelId, &ModelInfo)> = Vec::new();
    for dep in merge.dependencies() {
        let m = recipe.shape_source(dep)?;
        if !models.iter().any(|(id, _)| *id == m) {
            models.push((m, inventory.get(m)?));
        }
    }
    let source_model = match spec.source {
        VocabSource::Model(m) => m,
        VocabSource::Base | VocabSource::Union => {
            merge.shape_input().and_then(|b| recipe.shape_source(b))?
        }
    };
    let source_info = inventory.get(source_model)?;
    Some(Vocabulary::build(&models, base, spec, source_info))
}

/// Slice ranges within their model's layers (E0039), where the model's
/// headers are readable; and no stacked merge as another merge's input
/// (its layers are not its base's, which is all the headers tell).
fn slice_bounds(recipe: &Recipe, inventory: &Inventory) -> Vec<Diagnostic> {
    let mut diagnostics = Vec::new();
    for merge in &recipe.merges {
        for dep in merge.dependencies() {
            let crate::recipe::InputRef::Merge(m) = dep else {
                continue;
            };
            let stacked = &recipe.merges[m.0];
            if stacked.slices.is_empty() {
                continue;
            }
            let span = merge
                .inputs
                .iter()
                .find(|i| i.model == dep)
                .map_or(merge.span, |i| i.span);
            diagnostics.push(
                Diagnostic::new(
                    Code::E0039,
                    span,
                    format!(
                        "`{}` stacks slices and cannot be an input of another merge yet",
                        stacked.name
                    ),
                )
                .label("a stacked merge")
                .with(stacked.span, "its layers are stacked here")
                .help("write the stacked merge to an output and declare that directory as a model"),
            );
        }
        for source in merge.slices.iter().flat_map(|s| &s.sources) {
            let model = match source.input {
                None => merge.base,
                Some(i) => merge.inputs.get(i).map(|x| x.model),
            };
            let Some(info) = model.and_then(|m| inventory.of_input(recipe, m)) else {
                continue;
            };
            let layers = info
                .tensors
                .keys()
                .filter_map(|n| crate::pattern::layer_index(n))
                .max()
                .map_or(0, |i| i + 1);
            let name = model.map_or("", |m| recipe.input_name(m));
            if layers == 0 {
                diagnostics.push(
                    Diagnostic::new(
                        Code::E0039,
                        source.span,
                        format!("obim finds no decoder layers in `{name}`"),
                    )
                    .label("no tensor named `*.layers.N.*`")
                    .help("slices need Llama-style layer names (`model.layers.N.`), as Llama, Mistral and Qwen2 checkpoints have"),
                );
            } else if source.end > layers {
                diagnostics.push(
                    Diagnostic::new(
                        Code::E0039,
                        source.span,
                        format!("`{name}` has {layers} layers; this range ends at {}", source.end),
                    )
                    .label("past the last layer")
                    .help(format!(
                        "layers of `{name}` run from 0 to {}; the end of a range is excluded, as in mergekit's `layer_range`",
                        layers.saturating_sub(1)
                    )),
                );
            }
        }
    }
    diagnostics
}

/// Every data source gives text, and every model calibrated on one (an
/// `obim` input with `using` data) has a forward pass.
fn calibration(recipe: &Recipe, inventory: &Inventory) -> Vec<Diagnostic> {
    let mut diagnostics = Vec::new();
    for merge in &recipe.merges {
        let Some(select) = merge.select.as_ref().filter(|s| s.judge == Judge::Accuracy) else {
            continue;
        };
        for d in &select.data {
            let source = &recipe.data[d.0];
            let pairs = match source.kind {
                DataKind::Jsonl if source.path.is_file() => {
                    data::jsonl_pairs(&source.path).ok().flatten().is_some()
                }
                DataKind::Jsonl => continue, // E0026 said so.
                DataKind::Text => false,
            };
            if !pairs {
                diagnostics.push(
                    Diagnostic::new(
                        Code::E0044,
                        select.span,
                        format!(
                            "`{}` cannot judge `{}` by accuracy: it has no `prompt` and `answer` on every line",
                            source.name, merge.name
                        ),
                    )
                    .label("judged by accuracy")
                    .with(source.span, "this data source")
                    .help("accuracy needs jsonl lines with `prompt` and `answer` strings; judge by `loss(...)` for plain text"),
                );
            }
        }
    }
    for source in &recipe.data {
        // A source whose file is missing was reported by the checker (E0026).
        let exists = match source.kind {
            DataKind::Jsonl => source.path.is_file(),
            DataKind::Text => true,
        };
        if !exists {
            continue;
        }
        if let Err(e) = data::source_texts(source) {
            if matches!(e, data::DataError::Empty(_)) && source.kind == DataKind::Text {
                // No file matched: E0026 said so.
                if glob::glob(&source.path.to_string_lossy())
                    .map_or(true, |mut g| g.next().is_none())
                {
                    continue;
                }
            }
            diagnostics.push(
                Diagnostic::new(
                    Code::E0029,
                    source.span,
                    format!("data source `{}` gives no calibration text", source.name),
                )
                .label(crate::errors::with_causes(&e))
                .help(match source.kind {
                    DataKind::Jsonl => "every line must be a JSON object with the `field` (default `text`) as a string",
                    DataKind::Text => "text files are split at blank lines; each non-blank paragraph is one text",
                }),
            );
        }
    }
    let mut reported = HashSet::new();
    for merge in recipe.merges.iter().filter(|m| m.method.calibrates()) {
        for (i, input) in merge.inputs.iter().enumerate() {
            let levels =
                std::iter::once(&merge.settings).chain(merge.rules.iter().map(|r| &r.settings));
            let calibrated = levels.into_iter().any(|s| {
                s.defaults.using.is_some() || s.inputs.get(&i).is_some_and(|x| x.using.is_some())
            });
            let Some(id) = recipe.shape_source(input.model) else {
                continue;
            };
            if !calibrated || !reported.insert(id) {
                continue;
            }
            let Some(info) = inventory.get(id) else {
                continue;
            };
            if let Err(e) = ModelConfig::of(info) {
                let model = &recipe.models[id.0];
                if !matches!(e, crate::model::ConfigError::Unsupported(_)) {
                    // The checkpoint's fault, not the recipe's.
                    diagnostics.push(
                        Diagnostic::new(
                            Code::E0034,
                            model.span,
                            format!("`{}` has an invalid config.json", model.name),
                        )
                        .label(e.to_string())
                        .with(input.span, "calibrated here")
                        .help("the config must describe the checkpoint's tensors; re-download or fix config.json"),
                    );
                    continue;
                }
                diagnostics.push(
                    Diagnostic::new(
                        Code::E0030,
                        input.span,
                        format!(
                            "`{}` cannot be calibrated: {e}",
                            recipe.input_name(input.model)
                        ),
                    )
                    .label("`using` data needs a forward pass of this model")
                    .with(model.span, "defined here")
                    .help("use `saliency magnitude` for this merge (or for this input's tensors)"),
                );
            }
        }
    }
    diagnostics
}

/// Every input of every merge against the merge's base; `layers` patterns
/// against the base's tensor names.
fn compatibility(recipe: &Recipe, inventory: &Inventory) -> Vec<Diagnostic> {
    let mut diagnostics = Vec::new();
    let mut reported: HashSet<(ModelId, ModelId, bool)> = HashSet::new();
    for (m, merge) in recipe.merges.iter().enumerate() {
        let Some(base_id) = merge.shape_input().and_then(|b| recipe.shape_source(b)) else {
            continue;
        };
        // With an output vocabulary, token rows are aligned by token (one
        // that cannot be built has its own error).
        let aligned = recipe
            .outputs
            .iter()
            .any(|o| o.merge == MergeId(m) && o.vocabulary.is_some());
        let Some(base) = inventory.get(base_id) else {
            continue;
        };
        for input in &merge.inputs {
            let Some(id) = recipe.shape_source(input.model) else {
                continue;
            };
            if id == base_id || !reported.insert((id, base_id, aligned)) {
                continue;
            }
            if let Some(info) = inventory.get(id) {
                diagnostics.extend(against_base(recipe, (id, info), (base_id, base), aligned));
            }
        }
        diagnostics.extend(unmatched_patterns(
            merge,
            base,
            &recipe.models[base_id.0].name,
        ));
    }
    diagnostics
}

/// An input checkpoint compared with its base: the architecture (E0023),
/// then missing tensors (E0024) and differing shapes (E0025).
fn against_base(
    recipe: &Recipe,
    (id, info): (ModelId, &ModelInfo),
    (base_id, base): (ModelId, &ModelInfo),
    aligned_vocabulary: bool,
) -> Vec<Diagnostic> {
    let mut diagnostics = Vec::new();
    let base_name = &recipe.models[base_id.0].name;
    let model = &recipe.models[id.0];
    if info.architecture != base.architecture {
        let show = |a: &Option<String>| {
            a.as_ref().map_or_else(
                || "of no known architecture (config.json names none)".to_string(),
                |a| format!("a {a}"),
            )
        };
        diagnostics.push(
            Diagnostic::new(
                Code::E0023,
                model.span,
                format!(
                    "`{}` is {}, the base `{base_name}` {}",
                    model.name,
                    show(&info.architecture),
                    show(&base.architecture)
                ),
            )
            .label("architecture differs from the base")
            .with(recipe.models[base_id.0].span, "the base")
            .help("merge only fine-tunes of the same base model"),
        );
        return diagnostics;
    }
    let missing: Vec<&String> = base
        .tensors
        .keys()
        .filter(|n| !info.tensors.contains_key(*n))
        .collect();
    if !missing.is_empty() {
        diagnostics.push(
            Diagnostic::new(
                Code::E0024,
                model.span,
                format!(
                    "`{}` lacks {} tensor{} of the base `{base_name}`",
                    model.name,
                    missing.len(),
                    plural(missing.len())
                ),
            )
            .label(format!("missing {}", list(&missing)))
            .with(recipe.models[base_id.0].span, "the base"),
        );
    }
    let extra: Vec<&String> = info
        .tensors
        .keys()
        .filter(|n| !base.tensors.contains_key(*n))
        .collect();
    if !extra.is_empty() {
        diagnostics.push(
            Diagnostic::new(
                Code::W0005,
                model.span,
                format!(
                    "`{}` has {} tensor{} the base `{base_name}` lacks; the output leaves {} out",
                    model.name,
                    extra.len(),
                    plural(extra.len()),
                    if extra.len() == 1 { "it" } else { "them" }
                ),
            )
            .label(format!("not merged: {}", list(&extra)))
            .with(recipe.models[base_id.0].span, "the base"),
        );
    }
    let mismatched: Vec<String> = base
        .tensors
        .iter()
        .filter_map(|(n, t)| {
            info.tensors
                .get(n)
                .filter(|o| o.shape != t.shape)
                // With a vocabulary, token rows are aligned: only the width must agree.
                .filter(|o| {
                    !(aligned_vocabulary
                        && crate::vocab::is_vocabulary_tensor(n)
                        && o.shape.get(1..) == t.shape.get(1..))
                })
                .map(|o| format!("`{n}`: {:?} here, {:?} in the base", o.shape, t.shape))
        })
        .collect();
    if !mismatched.is_empty() {
        // Only token rows differ: a fine-tune that added tokens.
        let vocab = !aligned_vocabulary
            && base.tensors.iter().all(|(n, t)| {
                info.tensors.get(n).is_none_or(|o| {
                    o.shape == t.shape
                        || (crate::vocab::is_vocabulary_tensor(n)
                            && o.shape.get(1..) == t.shape.get(1..))
                })
            });
        let mut d = Diagnostic::new(
            Code::E0025,
            model.span,
            format!(
                "{} tensor{} of `{}` differ in shape from the base `{base_name}`",
                mismatched.len(),
                plural(mismatched.len()),
                model.name
            ),
        )
        .label(mismatched[0].clone())
        .with(recipe.models[base_id.0].span, "the base");
        for m in mismatched.iter().skip(1).take(4) {
            d = d.note(m.clone());
        }
        if mismatched.len() > 5 {
            d = d.note(format!("and {} more", mismatched.len() - 5));
        }
        if vocab {
            d = d.help("only the token rows differ (added tokens?): give the merge's output `tokenizer union` (or `tokenizer base`, or a model) to align the rows by token, as mergekit's `tokenizer_source`");
        }
        diagnostics.push(d);
    }
    diagnostics
}

/// `layers` patterns that match no tensor of the base (E0036): such a rule
/// would silently do nothing. The help proposes a pattern that matches.
fn unmatched_patterns(
    merge: &crate::recipe::Merge,
    base: &ModelInfo,
    base_name: &str,
) -> Vec<Diagnostic> {
    let mut diagnostics = Vec::new();
    for rule in &merge.rules {
        for pattern in &rule.patterns {
            if base.tensors.keys().any(|n| pattern.matches(n)) {
                continue;
            }
            let d = Diagnostic::new(
                Code::E0036,
                rule.pattern_span,
                format!(
                    "pattern \"{}\" matches no tensor of `{base_name}`",
                    pattern.as_str()
                ),
            )
            .label("this rule would never apply");
            diagnostics.push(match matching_pattern(pattern.as_str(), base) {
                Some(p) => d.suggest(Some(&format!("\"{p}\""))),
                None => d.help(format!(
                    "patterns match whole tensor names, `*` any run of characters; names look like `{}`",
                    base.tensors.keys().next().map_or("", String::as_str)
                )),
            });
        }
    }
    diagnostics
}

/// A pattern close to `written` that matches some tensor: `*mlp*` for a bare
/// `mlp` (mergekit's filters match substrings), else the closest of the
/// tensor names' shapes (layer numbers as `*`, cut to the pattern's length).
fn matching_pattern(written: &str, base: &ModelInfo) -> Option<String> {
    let matches = |p: &str| {
        crate::pattern::Pattern::parse(p).is_ok_and(|p| base.tensors.keys().any(|n| p.matches(n)))
    };
    let substring = format!("*{}*", written.trim_matches('*'));
    if !written.is_empty() && matches(&substring) {
        return Some(substring);
    }
    let parts = written.split('.').count();
    let mut shapes: Vec<String> = base
        .tensors
        .keys()
        .map(|name| {
            let mut cut: Vec<&str> = name
                .split('.')
                .map(|c| if c.parse::<u64>().is_ok() { "*" } else { c })
                .take(parts)
                .collect();
            if written.ends_with('*')
                && let Some(last) = cut.last_mut()
            {
                *last = "*";
            }
            cut.join(".")
        })
        .collect();
    shapes.sort();
    shapes.dedup();
    crate::diagnostic::suggest(written, shapes.iter().map(String::as_str))
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn list(names: &[&String]) -> String {
    let shown: Vec<String> = names.iter().take(3).map(|n| format!("`{n}`")).collect();
    if names.len() > 3 {
        format!("{} and {} more", shown.join(", "), names.len() - 3)
    } else {
        shown.join(", ")
    }
}
