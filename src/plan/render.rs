//! The three printed forms of a plan: text for a person reviewing a recipe,
//! JSON for scripts (keys documented in the README and kept stable), dot for
//! graphviz.

use super::{Plan, PlannedTensor, Step, StepKind};
use crate::methods::{Method, ParamName, Scope};
use crate::open::Inventory;
use crate::recipe::{Judge, Merge, MergeId, ModelSource, Recipe, TakeFrom};
use crate::source::SourceMap;
use serde_json::{Map, Value, json};
use std::fmt::Write;

/// What every renderer needs.
pub struct PlanView<'a> {
    pub plan: &'a Plan,
    pub recipe: &'a Recipe,
    pub inventory: &'a Inventory,
    pub sources: &'a SourceMap,
    /// Where a run caches candidate scores: the text plan marks the
    /// candidate the scores there choose.
    pub cache: Option<&'a std::path::Path>,
}

impl PlanView<'_> {
    fn line(&self, step: &Step) -> usize {
        self.sources.line(step.span)
    }

    fn take_name(&self, merge: &Merge, take: Option<TakeFrom>) -> Option<String> {
        match take? {
            TakeFrom::Base => merge.base.map(|b| self.recipe.input_name(b).to_string()),
            TakeFrom::Input(i) => Some(self.recipe.input_name(merge.inputs[i].model).to_string()),
        }
    }

    fn source(&self, source: &ModelSource) -> String {
        match source {
            ModelSource::Local { path } => path.display().to_string(),
            ModelSource::Hub {
                id,
                revision: Some(r),
            } => format!("{id} @ {r}"),
            ModelSource::Hub { id, revision: None } => id.clone(),
        }
    }

    fn merges(&self) -> Vec<MergeId> {
        self.plan
            .steps()
            .iter()
            .filter_map(|s| match s.kind {
                StepKind::Merge(m) => Some(m),
                _ => None,
            })
            .collect()
    }

    pub fn to_json(&self) -> Value {
        let steps: Vec<Value> = self
            .plan
            .steps()
            .iter()
            .map(|s| json!({"id": s.id, "kind": s.kind.name(), "deps": self.plan.deps(s), "hash": s.hash, "line": self.line(s)}))
            .collect();
        let models: Vec<Value> = self
            .plan
            .steps()
            .iter()
            .filter_map(|s| match s.kind {
                StepKind::Open(id) => Some(id),
                _ => None,
            })
            .map(|id| {
                let m = &self.recipe.models[id.0];
                let info = self.inventory.get(id);
                json!({
                    "name": m.name,
                    "base": m.is_base,
                    "source": self.source(&m.source),
                    "available": info.is_some(),
                    "architecture": info.and_then(|i| i.architecture.clone()),
                    "tensors": info.map(|i| i.tensors.len()),
                    "params": info.map(|i| i.params()),
                    "dtype": info.and_then(|i| i.dtype().map(|d| d.name())),
                })
            })
            .collect();
        let merges: Vec<Value> = self
            .merges()
            .into_iter()
            .map(|id| self.merge_json(id))
            .collect();
        let outputs: Vec<Value> = self
            .recipe
            .outputs
            .iter()
            .map(|o| {
                json!({
                    "merge": self.recipe.merges[o.merge.0].name,
                    "path": o.written,
                    "dtype": o.dtype.map(|d| d.name()),
                    "shard_size": o.shard_size,
                    "tokenizer": o.tokenizer.map(|t| self.recipe.input_name(t)),
                    "vocabulary": self.inventory.vocabularies.get(&o.merge).map(|v| json!({
                        "tokens": v.tokens,
                        "rows": v.size,
                        "added": v.new_added.len(),
                        "aligned": v.differing.iter().map(|m| &self.recipe.models[m.0].name).collect::<Vec<_>>(),
                    })),
                })
            })
            .collect();
        json!({"steps": steps, "models": models, "merges": merges, "outputs": outputs})
    }

    fn merge_json(&self, id: MergeId) -> Value {
        let merge = &self.recipe.merges[id.0];
        let names: Vec<&str> = merge
            .inputs
            .iter()
            .map(|i| self.recipe.input_name(i.model))
            .collect();
        let tensors: Vec<Value> = self.plan.tensors.get(&id).map_or_else(Vec::new, |ts| {
            ts.iter()
                .map(|t| self.tensor_json(merge, &names, t))
                .collect()
        });
        let autos: Vec<Value> = merge
            .autos
            .iter()
            .map(|a| json!({"setting": a.label, "values": a.values}))
            .collect();
        let select = merge.select.as_ref().map(|s| {
            let sources = self.selection_sources(merge);
            let tokens = sources.as_deref().map(token_count);
            let scored = sources.map(|s| {
                s.iter()
                    .map(|s| (s.name.clone(), json!(s.judged)))
                    .collect::<Map<String, Value>>()
            });
            json!({
                "by": s.judge.name(),
                "search": s.search.map(|s| json!({"strategy": "coordinate", "budget": s.budget})),
                "data": s.data.iter().map(|d| &self.recipe.data[d.0].name).collect::<Vec<_>>(),
                "candidates": merge.candidate_count(),
                "tokens": tokens,
                "scored": scored,
            })
        });
        json!({
            "name": merge.name,
            "method": merge.method.name(),
            "base": merge.base.map(|b| self.recipe.input_name(b)),
            "inputs": names,
            "auto": autos,
            "select": select,
            "tensors": tensors,
        })
    }

    /// A merge's selection data as the run scores it, when the base (and
    /// so its tokenizer) is available.
    fn selection_sources(&self, merge: &Merge) -> Option<Vec<crate::data::JudgedSource>> {
        let select = merge.select.as_ref()?;
        let base = merge.shape_input()?;
        let info = self.inventory.get(self.recipe.shape_source(base)?)?;
        let tokenizer = crate::data::Tokenizer::from_dir(&info.dir).ok()?;
        crate::data::selection_sources(self.recipe, select, &tokenizer).ok()
    }

    /// The candidate of merge `id` an earlier run chose, and its loss: when
    /// the cache holds every candidate's score, the lowest finite one.
    fn chosen(&self, id: MergeId, merge: &Merge) -> Option<(String, f64)> {
        let cache = self.cache?;
        // A search's candidates are known only as it runs.
        if merge.searched().is_some() {
            return None;
        }
        let sources = self.selection_sources(merge)?;
        let mut best: Option<(String, f64, (f64, f64))> = None;
        for v in self.plan.variants.get(&id)? {
            let judge = merge.select.as_ref()?.judge;
            let text = std::fs::read_to_string(v.score_path(cache, judge, &sources)).ok()?;
            let score = serde_json::from_str::<Value>(&text).ok()?;
            let mean = score["mean"].as_f64()?;
            // Accuracy: higher wins, ties by loss; as a key to minimise.
            let key = (-score["accuracy"].as_f64().unwrap_or(0.0), mean);
            if mean.is_finite() && best.as_ref().is_none_or(|(_, _, k)| key < *k) {
                best = Some((v.label.clone(), mean, key));
            }
        }
        best.map(|(label, mean, _)| (label, mean))
    }

    fn tensor_json(&self, merge: &Merge, names: &[&str], t: &PlannedTensor) -> Value {
        let labels = operand_labels(names, t);
        let names: Vec<&str> = labels.iter().map(String::as_str).collect();
        let s = &t.settings;
        let per_input = |f: &dyn Fn(usize) -> Option<Value>| -> Map<String, Value> {
            names
                .iter()
                .enumerate()
                .filter_map(|(i, n)| f(i).map(|v| (n.to_string(), v)))
                .collect()
        };
        let obim = merge.method == Method::Obim;
        let (saliency, _) = t.saliency();
        json!({
            "name": t.name,
            "shape": t.info.shape,
            "dtype": t.info.dtype,
            "take": self.take_name(merge, merge_take(t)),
            "order": s.order.iter().map(|i| names[*i]).collect::<Vec<_>>(),
            "retain": per_input(&|i| if obim { s.inputs[i].retain.map(Value::from) } else { None }),
            "saliency": per_input(&|i| obim.then(|| Value::from(saliency.name())).filter(|_| i < names.len())),
            "weight": per_input(&|i| if obim { None } else { s.inputs[i].weight.map(Value::from) }),
            "density": per_input(&|i| if merge.method.param("density").is_some() { Some(Value::from(s.inputs[i].density.unwrap_or(1.0))) } else { None }),
            "params": t.op.merge_params(merge.method).into_iter().map(|(k, v)| (k.to_string(), v)).collect::<Map<String, Value>>(),
            "rule_lines": s.rule_lines,
        })
    }

    pub fn to_dot(&self) -> String {
        let mut out = String::from(
            "digraph plan {\n  rankdir=LR;\n  node [shape=box, fontname=\"monospace\"];\n",
        );
        let steps = self.plan.steps();
        for (i, s) in steps.iter().enumerate() {
            let shape = match s.kind {
                StepKind::Open(_) => "box",
                StepKind::Calibrate(..) => "ellipse",
                StepKind::Merge(_) => "box3d",
                StepKind::Write(_) => "folder",
            };
            let _ = writeln!(out, "  n{i} [label={:?}, shape={shape}];", s.id);
        }
        for (i, s) in steps.iter().enumerate() {
            for dep in self.plan.deps(s) {
                if let Some(j) = steps.iter().position(|t| t.id == dep) {
                    let _ = writeln!(out, "  n{j} -> n{i};");
                }
            }
        }
        out.push_str("}\n");
        out
    }

    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let steps = self.plan.steps();
        let count = |k: &str| steps.iter().filter(|s| s.kind.name() == k).count();
        let _ = writeln!(
            out,
            "plan: {} steps ({} open, {} calibrate, {} merge, {} write)\n",
            steps.len(),
            count("open"),
            count("calibrate"),
            count("merge"),
            count("write")
        );
        out.push_str(&self.steps_text());
        for id in self.merges() {
            out.push('\n');
            self.merge_text(&mut out, id);
        }
        out
    }

    /// One line per step, in execution order: number, id, hash, recipe
    /// line, dependencies, what it does.
    pub fn steps_text(&self) -> String {
        let mut out = String::new();
        let steps = self.plan.steps();
        let width = steps.iter().map(|s| s.id.len()).max().unwrap_or(0);
        for (i, s) in steps.iter().enumerate() {
            let deps: Vec<String> = self
                .plan
                .deps(s)
                .iter()
                .filter_map(|d| steps.iter().position(|t| t.id == *d))
                .map(|j| (j + 1).to_string())
                .collect();
            let deps = if deps.is_empty() {
                String::new()
            } else {
                format!("  ← {}", deps.join(", "))
            };
            let _ = writeln!(
                out,
                "{:>3}. {:<width$}  {}  line {:<4}{}  {}",
                i + 1,
                s.id,
                &s.hash[..12],
                self.line(s),
                deps,
                self.describe(s)
            );
        }
        out
    }

    fn describe(&self, step: &Step) -> String {
        match step.kind {
            StepKind::Open(id) => {
                let m = &self.recipe.models[id.0];
                let source = match m.lora_base {
                    Some(base) => format!(
                        "LoRA adapter {} on `{}` ({} weights)",
                        self.source(&m.source),
                        self.recipe.models[base.0].name,
                        self.inventory
                            .adapter(id)
                            .map_or(0, |a| a.targeted().count())
                    ),
                    None => self.source(&m.source),
                };
                match self.inventory.get(id) {
                    Some(i) => format!(
                        "{}: {}, {} tensors, {} params, {}",
                        source,
                        i.architecture.as_deref().unwrap_or("unknown architecture"),
                        i.tensors.len(),
                        thousands(i.params()),
                        i.dtype().map_or("?", |d| d.name())
                    ),
                    None => format!("{source}: not available locally"),
                }
            }
            StepKind::Calibrate(_, d, _) => {
                let d = &self.recipe.data[d.0];
                let samples = d.samples.map_or("all".to_string(), |n| n.to_string());
                format!(
                    "{:?}(\"{}\") field {}, {samples} samples, seq_len {}, seed {}",
                    d.kind, d.pattern, d.field, d.seq_len, d.seed
                )
                .to_lowercase()
            }
            StepKind::Merge(id) => {
                let m = &self.recipe.merges[id.0];
                let inputs: Vec<&str> = m
                    .inputs
                    .iter()
                    .map(|i| self.recipe.input_name(i.model))
                    .collect();
                let base = m.base.map_or(String::new(), |b| {
                    format!("(base: {})", self.recipe.input_name(b))
                });
                format!("{}{base} of {}", m.method, inputs.join(", "))
            }
            StepKind::Write(i) => {
                let o = &self.recipe.outputs[i];
                format!(
                    "→ \"{}\", dtype {}, shards ≤ {} bytes",
                    o.written,
                    o.dtype.map_or("of the base", |d| d.name()),
                    thousands(o.shard_size as usize)
                )
            }
        }
    }

    /// The output vocabulary, or that the models' tokenizers differ (each
    /// input's data is tokenized with its own).
    fn tokenizers_text(&self, out: &mut String, id: MergeId) {
        let merge = &self.recipe.merges[id.0];
        let name = |m: &crate::recipe::ModelId| self.recipe.models[m.0].name.as_str();
        if let Some(v) = self.inventory.vocabularies.get(&id) {
            let source = self
                .recipe
                .outputs
                .iter()
                .find(|o| o.merge == id)
                .and_then(|o| o.vocabulary.as_ref())
                .map(|spec| match spec.source {
                    crate::vocab::VocabSource::Union => "union".to_string(),
                    crate::vocab::VocabSource::Base => "base".to_string(),
                    crate::vocab::VocabSource::Model(m) => name(&m).to_string(),
                })
                .unwrap_or_default();
            let aligned = if v.differing.is_empty() {
                "every model's rows already in place".to_string()
            } else {
                let names: Vec<&str> = v.differing.iter().map(name).collect();
                format!("rows of {} aligned by token", names.join(", "))
            };
            let _ = writeln!(
                out,
                "  vocab    {source}: {} tokens ({} added), {} rows; {aligned}",
                v.tokens,
                v.new_added.len(),
                v.size
            );
            return;
        }
        let models: Vec<(crate::recipe::ModelId, &crate::checkpoint::ModelInfo)> = merge
            .dependencies()
            .filter_map(|d| self.recipe.shape_source(d))
            .filter_map(|m| Some((m, self.inventory.get(m)?)))
            .collect();
        let differing = crate::vocab::differing_tokenizers(&models);
        if let (false, Some((first, _))) = (differing.is_empty(), models.first()) {
            let names: Vec<&str> = differing.iter().map(name).collect();
            let _ = writeln!(
                out,
                "  tokens   {} tokenized differently from {}: each input's data is tokenized with its own tokenizer",
                names.join(", "),
                name(first)
            );
        }
    }

    fn merge_text(&self, out: &mut String, id: MergeId) {
        let merge = &self.recipe.merges[id.0];
        let names: Vec<&str> = merge
            .inputs
            .iter()
            .map(|i| self.recipe.input_name(i.model))
            .collect();
        let _ = writeln!(out, "merge {} = {}", merge.name, merge.method);
        if let Some(b) = merge.base {
            let _ = writeln!(out, "  base     {}", self.recipe.input_name(b));
        }
        for (i, n) in names.iter().enumerate() {
            let s = merge.input_settings(i);
            let mut parts = Vec::new();
            if let Some(w) = s.weight {
                parts.push(format!("weight {w}"));
            }
            if let Some(d) = s.density {
                parts.push(format!("density {d}"));
            }
            if let Some(r) = s.retain {
                parts.push(format!("retain {r}"));
            }
            if let Some(d) = s.using {
                parts.push(format!("using {}", self.recipe.data[d.0].name));
            }
            let _ = writeln!(out, "  input    {n} {}", parts.join(", "));
        }
        for rule in &merge.rules {
            let patterns: Vec<String> = rule
                .patterns
                .iter()
                .map(|p| format!("\"{}\"", p.as_str()))
                .collect();
            let _ = writeln!(
                out,
                "  rule     line {}: {}",
                rule.line,
                patterns.join(", ")
            );
        }
        let mut out_layer = 0;
        for slice in &merge.slices {
            let sources: Vec<String> = slice
                .sources
                .iter()
                .map(|s| {
                    let model = match s.input {
                        None => merge.base,
                        Some(i) => merge.inputs.get(i).map(|x| x.model),
                    };
                    let name = model.map_or("?", |m| self.recipe.input_name(m));
                    format!("{name} layers {}..{}", s.start, s.end - 1)
                })
                .collect();
            let _ = writeln!(
                out,
                "  slice    output layers {}..{} ← {}",
                out_layer,
                out_layer + slice.len() - 1,
                sources.join(", ")
            );
            out_layer += slice.len();
        }
        self.tokenizers_text(out, id);
        for site in &merge.autos {
            let values: Vec<String> = site.values.iter().map(f64::to_string).collect();
            let _ = writeln!(out, "  auto     {}: {}", site.label, values.join(", "));
        }
        if let Some(select) = &merge.select {
            let names: Vec<&str> = select
                .data
                .iter()
                .map(|d| self.recipe.data[d.0].name.as_str())
                .collect();
            let n = merge.candidate_count();
            let sources = self.selection_sources(merge);
            let tokens = sources.as_deref().map(token_count);
            // A search scores at most its budget of the candidates.
            let (k, what) = match merge.searched() {
                Some(s) => (
                    s.budget.min(n),
                    format!(
                        "{n} candidates, searched coordinate-wise: at most {}",
                        s.budget.min(n)
                    ),
                ),
                None => (n, format!("{n} candidates")),
            };
            let cost = match (tokens, select.judge) {
                (Some(t), Judge::Loss) => format!(
                    "{what} × {t} tokens = {} tokens through a merged model",
                    k * t
                ),
                (_, Judge::Accuracy) => {
                    let examples = sources
                        .as_ref()
                        .map(|s| s.iter().map(|s| s.pairs.len()).sum::<usize>());
                    match examples {
                        Some(e) => format!(
                            "{what} × {e} examples decoded greedily, each candidate merged whole in memory"
                        ),
                        None => what,
                    }
                }
                (None, _) => what,
            };
            let _ = writeln!(
                out,
                "  select   by {}({}): {cost} (tensors below: the first candidate)",
                select.judge.name(),
                names.join(", ")
            );
            if let Some(sources) = sources {
                let judged: Vec<String> = sources
                    .iter()
                    .map(|s| format!("{}: {}", s.name, s.judged.describe()))
                    .collect();
                let what = match select.judge {
                    Judge::Loss => "scored  ",
                    Judge::Accuracy => "ties by  loss of",
                };
                let _ = writeln!(out, "  {what} {}", judged.join("; "));
            }
            if let Some((label, loss)) = self.chosen(id, merge) {
                let _ = writeln!(
                    out,
                    "  chosen   {label} (loss {loss:.4}; from the scores in the cache)"
                );
            }
        }
        let Some(tensors) = self.plan.tensors.get(&id) else {
            let _ = writeln!(
                out,
                "  tensors  unknown: the base's headers are not available locally"
            );
            return;
        };
        let _ = writeln!(out, "  tensors  {}", tensors.len());
        if merge.method == Method::Regmean {
            let _ = writeln!(
                out,
                "  grams    {}",
                gram_memory(tensors, merge.inputs.len())
            );
        }
        let rows: Vec<[String; 4]> = tensors
            .iter()
            .map(|t| self.tensor_row(merge, &names, t))
            .collect();
        let widths: Vec<usize> = (0..3)
            .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        for r in rows {
            let line = format!(
                "    {:<w0$}  {:<w1$}  {:<w2$}  {}",
                r[0],
                r[1],
                r[2],
                r[3],
                w0 = widths[0],
                w1 = widths[1],
                w2 = widths[2]
            );
            let _ = writeln!(out, "{}", line.trim_end());
        }
    }

    /// name, shape, what happens, rules.
    fn tensor_row(&self, merge: &Merge, names: &[&str], t: &PlannedTensor) -> [String; 4] {
        let labels = operand_labels(names, t);
        let names: Vec<&str> = labels.iter().map(String::as_str).collect();
        let s = &t.settings;
        let shape = format!("{:?}", t.info.shape);
        let rules = if s.rule_lines.is_empty() {
            String::new()
        } else {
            format!(
                "rules {}",
                s.rule_lines
                    .iter()
                    .map(|l| l.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            )
        };
        let what = if let Some(from) = self.take_name(merge, merge_take(t)) {
            format!("take {from}")
        } else if merge.method == Method::Obim {
            let order: Vec<String> = s
                .order
                .iter()
                .map(|i| {
                    format!(
                        "{} {}",
                        names[*i],
                        s.inputs[*i].retain.map_or("?".into(), short)
                    )
                })
                .collect();
            let (saliency, why) = t.saliency();
            let why = why.map_or(String::new(), |w| format!(" ({w})"));
            let params: Vec<String> =
                t.op.merge_params(merge.method)
                    .into_iter()
                    .map(|(k, v)| format!("{k} {}", short_value(&v)))
                    .collect();
            format!(
                "{} | {}{why} | {}",
                order.join(" → "),
                saliency.name(),
                params.join(", ")
            )
        } else {
            let parts: Vec<String> = names
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    let x = &s.inputs[i];
                    let mut p = n.to_string();
                    if let Some(w) = x.weight {
                        p.push_str(&format!(" w{}", short(w)));
                    }
                    if merge.method.sparsifies() {
                        p.push_str(&format!(" d{}", short(x.density.unwrap_or(1.0))));
                    }
                    // Breadcrumbs' gamma and DELLA's epsilon, where the method has them.
                    for (key, letter, value) in [
                        (ParamName::Gamma, "g", x.gamma),
                        (ParamName::Epsilon, "e", x.epsilon),
                    ] {
                        let per_input = merge
                            .method
                            .params()
                            .iter()
                            .any(|p| p.key == key && p.scope == Scope::Input);
                        if let Some(v) = value
                            .or_else(|| merge.method.default_number(key))
                            .filter(|_| per_input)
                        {
                            p.push_str(&format!(" {letter}{}", short(v)));
                        }
                    }
                    p
                })
                .collect();
            let params: Vec<String> =
                t.op.merge_params(merge.method)
                    .into_iter()
                    .map(|(k, v)| format!("{k} {}", short_value(&v)))
                    .collect();
            format!("{} | {}", parts.join(", "), params.join(", "))
        };
        [t.name.clone(), shape, what, rules]
    }
}

/// A tensor's `take` with the input index of the merge (a stacked tensor's
/// plan counts the slice's sources instead).
fn merge_take(t: &PlannedTensor) -> Option<TakeFrom> {
    match (t.settings.take, &t.sources) {
        (Some(TakeFrom::Input(k)), Some(sources)) => {
            sources.inputs.get(k).map(|(i, _)| TakeFrom::Input(*i))
        }
        (take, _) => take,
    }
}

/// The names of a tensor's operands besides the base: the merge's inputs,
/// or in a stacked merge the slice's sources with the layer each gives
/// (`a[3]`).
fn operand_labels(names: &[&str], t: &PlannedTensor) -> Vec<String> {
    match &t.sources {
        None => names.iter().map(|n| n.to_string()).collect(),
        Some(sources) => sources
            .inputs
            .iter()
            .map(|(i, source)| match crate::pattern::layer_index(source) {
                Some(layer) => format!("{}[{layer}]", names[*i]),
                None => names[*i].to_string(),
            })
            .collect(),
    }
}

/// A number for a table: at most 6 significant digits, so that a value
/// interpolated by a gradient reads 0.466667, not 0.4666666666666667.
fn short(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return x.to_string();
    }
    let digits = (5 - x.abs().log10().floor() as i32).clamp(0, 12) as usize;
    let rounded: f64 = format!("{x:.digits$}").parse().unwrap_or(x);
    rounded.to_string()
}

fn short_value(v: &Value) -> String {
    let text = v.to_string();
    match v.as_f64() {
        Some(x) if v.is_f64() && text.len() > 10 => short(x),
        _ => text,
    }
}

fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// RegMean's Gram matrices in bytes: on disk per input, held while one
/// layer is calibrated (f64), and held while one weight is solved (every
/// input's f32 matrix; the sum and its two Cholesky factors and the
/// right-hand side in f64).
fn gram_memory(tensors: &[PlannedTensor], inputs: usize) -> String {
    use std::collections::BTreeMap;
    let mut groups: BTreeMap<String, usize> = BTreeMap::new();
    let mut solve = 0usize;
    for t in tensors {
        let [rows, d] = t.info.shape[..] else {
            continue;
        };
        let Some(module) = t.name.strip_suffix(".weight") else {
            continue;
        };
        let linear = module.ends_with("_proj") || module == "lm_head";
        if !linear || module.ends_with("embed_tokens") {
            continue;
        }
        // Modules that read one input share its matrix (q/k/v, gate/up).
        let shared = module
            .replace("k_proj", "q_proj")
            .replace("v_proj", "q_proj")
            .replace("up_proj", "gate_proj");
        groups.insert(shared, d);
        solve = solve.max(inputs * d * d * 4 + 3 * d * d * 8 + 2 * rows * d * 8);
    }
    let mut layers: BTreeMap<&str, usize> = BTreeMap::new();
    for (module, d) in &groups {
        let layer = module
            .match_indices('.')
            .nth(2)
            .map_or(module.as_str(), |(i, _)| &module[..i]);
        *layers.entry(layer).or_default() += d * d * 8;
    }
    let disk: usize = groups.values().map(|d| d * d * 4).sum();
    let largest = groups.values().max().copied().unwrap_or(0);
    format!(
        "{} matrices per input (largest {largest}²), {} on disk per input; a layer's calibration holds {}, a weight's solve {}",
        groups.len(),
        bytes(disk),
        bytes(layers.values().max().copied().unwrap_or(0)),
        bytes(solve)
    )
}

fn bytes(n: usize) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.1} GB", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1} MB", n / 1e6)
    } else {
        format!("{:.0} kB", n / 1e3)
    }
}

/// The tokens every candidate runs through a merged model.
fn token_count(sources: &[crate::data::JudgedSource]) -> usize {
    sources
        .iter()
        .flat_map(|s| &s.seqs)
        .map(|s| s.ids.len())
        .sum()
}
