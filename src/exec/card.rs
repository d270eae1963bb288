//! The output's `README.md`: a Hugging Face model card (YAML front matter
//! with `base_model`, `tags` and `library_name`), the merge in words — its
//! method, base, inputs and their settings, merge-wide parameters, rules,
//! slices, the merges it builds on — the `auto` selection table, and the
//! recipe itself, so a merged model pushed to the hub explains itself.

use super::report::Report;
use crate::Compilation;
use crate::methods::{ParamName, Scope};
use crate::recipe::{InputRef, Merge, MergeId, ModelSource, ParamValue, Recipe};
use std::collections::BTreeSet;
use std::fmt::Write;

/// The card of merge `id`, written with `report`.
pub fn model_card(c: &Compilation, id: MergeId, report: &Report) -> String {
    let recipe = &c.recipe;
    let merge = &recipe.merges[id.0];
    let mut out = String::from("---\n");
    let hub: BTreeSet<String> = models_under(recipe, id)
        .into_iter()
        .filter_map(|m| match &recipe.models[m].source {
            ModelSource::Hub { id, .. } => Some(id.clone()),
            ModelSource::Local { .. } => None,
        })
        .collect();
    if !hub.is_empty() {
        out.push_str("base_model:\n");
        for id in &hub {
            let _ = writeln!(out, "- {}", yaml_string(id));
        }
    }
    out.push_str("library_name: transformers\ntags:\n- merge\n- obim\n");
    let _ = writeln!(out, "- {}", merge.method.name());
    out.push_str("---\n\n");
    let _ = writeln!(out, "# {}\n", merge.name);
    let _ = writeln!(
        out,
        "A merge of pre-trained language models made with obim {} from the recipe below \
         (`obim run {}`).\n",
        report.obim_version, report.recipe.path
    );
    let mut order = Vec::new();
    merges_under(recipe, id, &mut order);
    for m in &order {
        let merge = &recipe.merges[m.0];
        // An `auto` merge as the selection chose it.
        let chosen = report.selection.get(&merge.name).and_then(|s| {
            let label = &s.candidates.get(s.winner)?.candidate;
            let choice = merge.choice_of(label)?;
            Some((label.clone(), merge.with_candidate(&choice)))
        });
        match &chosen {
            Some((label, merge)) => {
                describe(&mut out, recipe, merge, *m == id);
                let _ = writeln!(out, "Chosen on held-out data (below): {label}.\n");
            }
            None => describe(&mut out, recipe, merge, *m == id),
        }
    }
    let names: BTreeSet<&str> = order
        .iter()
        .map(|m| recipe.merges[m.0].name.as_str())
        .collect();
    if report.selection.keys().any(|k| names.contains(k.as_str())) {
        out.push_str("## Settings chosen on held-out data\n\n");
        for (name, selection) in report
            .selection
            .iter()
            .filter(|(k, _)| names.contains(k.as_str()))
        {
            let _ = writeln!(
                out,
                "`{name}`: each candidate merged and scored by its mean next-token loss \
                 (lower is better); the winner is marked.\n"
            );
            let sources: Vec<&str> = selection
                .candidates
                .first()
                .map(|c| c.losses.iter().map(|(s, _)| s.as_str()).collect())
                .unwrap_or_default();
            let _ = writeln!(out, "| candidate | {} | mean |", sources.join(" | "));
            let _ = writeln!(out, "| --- |{} --- |", " --- |".repeat(sources.len()));
            for (i, cand) in selection.candidates.iter().enumerate() {
                let mark = if i == selection.winner {
                    " **(chosen)**"
                } else {
                    ""
                };
                let losses: Vec<String> =
                    cand.losses.iter().map(|(_, l)| format!("{l:.4}")).collect();
                let _ = writeln!(
                    out,
                    "| {}{mark} | {} | {:.4} |",
                    cand.candidate,
                    losses.join(" | "),
                    cand.mean
                );
            }
            out.push('\n');
        }
    }
    out.push_str("## Recipe\n\n```obim\n");
    out.push_str(report.recipe.text.trim_end());
    out.push_str("\n```\n");
    out
}

/// Merge `id` and the merges it reads, dependencies first.
fn merges_under(recipe: &Recipe, id: MergeId, order: &mut Vec<MergeId>) {
    if order.contains(&id) {
        return;
    }
    for dep in recipe.merges[id.0].dependencies() {
        if let InputRef::Merge(m) = dep {
            merges_under(recipe, m, order);
        }
    }
    order.push(id);
}

/// Every model merge `id` reads, through its merges.
fn models_under(recipe: &Recipe, id: MergeId) -> BTreeSet<usize> {
    let mut order = Vec::new();
    merges_under(recipe, id, &mut order);
    order
        .iter()
        .flat_map(|m| recipe.merges[m.0].dependencies())
        .filter_map(|d| match d {
            InputRef::Model(m) => Some(m.0),
            InputRef::Merge(_) => None,
        })
        .collect()
}

fn source_text(recipe: &Recipe, input: InputRef) -> String {
    match input {
        InputRef::Model(m) => match &recipe.models[m.0].source {
            ModelSource::Hub { id, revision } => match revision {
                Some(r) => format!("[{id}](https://huggingface.co/{id}) at `{r}`"),
                None => format!("[{id}](https://huggingface.co/{id})"),
            },
            ModelSource::Local { path } => format!(
                "a local checkpoint (`{}`)",
                path.file_name()
                    .map_or(String::new(), |f| f.to_string_lossy().to_string())
            ),
        },
        InputRef::Merge(m) => format!("the merge `{}` above", recipe.merges[m.0].name),
    }
}

/// One merge in words.
fn describe(out: &mut String, recipe: &Recipe, merge: &Merge, is_output: bool) {
    let method = merge.method;
    let _ = writeln!(
        out,
        "## {} `{}`\n",
        if is_output {
            "Merge"
        } else {
            "Intermediate merge"
        },
        merge.name
    );
    let _ = writeln!(out, "Method: `{}`, {}.\n", method.name(), method.title());
    if let Some(base) = merge.base {
        let _ = writeln!(
            out,
            "Base: `{}`, {}.\n",
            recipe.input_name(base),
            source_text(recipe, base)
        );
    }
    out.push_str("Inputs:\n\n");
    for (i, input) in merge.inputs.iter().enumerate() {
        let s = merge.input_settings(i);
        let settings: Vec<String> = [
            ("weight", s.weight),
            ("density", s.density),
            ("retain", s.retain),
            ("gamma", s.gamma),
            ("epsilon", s.epsilon),
        ]
        .iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k} {v}")))
        .collect();
        let gradients: Vec<String> = merge
            .settings
            .gradients
            .iter()
            .filter(|g| g.input == Some(i))
            .map(|g| format!("{} over the layers {:?}", g.key.as_str(), g.values))
            .collect();
        let all: Vec<String> = settings.into_iter().chain(gradients).collect();
        let _ = writeln!(
            out,
            "- `{}`: {}{}",
            recipe.input_name(input.model),
            source_text(recipe, input.model),
            if all.is_empty() {
                String::new()
            } else {
                format!("; {}", all.join(", "))
            }
        );
    }
    out.push('\n');
    let params: Vec<String> = method
        .params()
        .iter()
        .filter(|p| p.key != ParamName::Base)
        .filter_map(|p| {
            let written = match p.scope {
                Scope::Merge => merge
                    .settings
                    .params
                    .iter()
                    .find(|(k, _)| *k == p.key)
                    .map(|(_, v)| v),
                Scope::Input => merge
                    .settings
                    .defaults
                    .number(p.key)
                    .map(ParamValue::Number),
            };
            let gradient = merge
                .settings
                .gradients
                .iter()
                .find(|g| g.key == p.key && g.input.is_none());
            let text = match (gradient, written) {
                (Some(g), _) => format!("{:?} over the layers", g.values),
                (None, Some(ParamValue::Number(n))) => n.to_string(),
                (None, Some(ParamValue::Bool(b))) => b.to_string(),
                // A per-input default shows on the inputs above.
                (None, None) if p.scope == Scope::Input => return None,
                (None, None) => match p.default {
                    Some(crate::methods::Default::Number(n)) => format!("{n} (default)"),
                    Some(crate::methods::Default::Bool(b)) => format!("{b} (default)"),
                    _ => return None,
                },
            };
            Some(format!("`{}` {text}", p.name))
        })
        .collect();
    if !params.is_empty() {
        let _ = writeln!(out, "Parameters: {}.\n", params.join(", "));
    }
    if !merge.rules.is_empty() {
        let _ = writeln!(
            out,
            "{} `layers` rule{} the settings of some tensors (see the recipe).\n",
            merge.rules.len(),
            if merge.rules.len() == 1 {
                " changes"
            } else {
                "s change"
            }
        );
    }
    if !merge.slices.is_empty() {
        out.push_str("Layers, slice by slice:\n\n");
        let mut at = 0;
        for slice in &merge.slices {
            let sources: Vec<String> = slice
                .sources
                .iter()
                .map(|s| {
                    let model = s
                        .input
                        .map_or(merge.base, |i| merge.inputs.get(i).map(|x| x.model));
                    let name = model.map_or("?", |m| recipe.input_name(m));
                    format!("`{name}` layers {}–{}", s.start, s.end - 1)
                })
                .collect();
            let _ = writeln!(
                out,
                "- output layers {}–{}: {}",
                at,
                at + slice.len() - 1,
                sources.join(", ")
            );
            at += slice.len();
        }
        out.push('\n');
    }
}

/// A YAML scalar that stays a string.
fn yaml_string(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
    {
        s.to_string()
    } else {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::report::RecipeRecord;

    #[test]
    fn hub_models_are_the_cards_base_models() {
        let text = "base llama = \"meta-llama/Llama-3.2-1B\"\nmodel math = \"org/math-7b\" @ \"v2\"\n\
                    merge m = task_arithmetic(base: llama) { math weight 0.5 }\noutput m -> \"out\"\n";
        let c = crate::compile_source("r.obim", None, text.to_string());
        assert!(!c.has_errors());
        let report = Report {
            regmean: Default::default(),
            obim_version: "0.1.0".into(),
            recipe: RecipeRecord {
                path: "r.obim".into(),
                blake3: String::new(),
                text: text.into(),
            },
            merge: "m".into(),
            plan_hash: String::new(),
            device: "cpu".into(),
            threads: 1,
            seconds: 0.0,
            bytes: 0,
            shards: vec![],
            inputs: vec![],
            positions_won: Default::default(),
            selection: Default::default(),
        };
        let card = model_card(&c, MergeId(0), &report);
        assert!(
            card.starts_with(
                "---\nbase_model:\n- meta-llama/Llama-3.2-1B\n- org/math-7b\nlibrary_name: transformers\n"
            ),
            "{card}"
        );
        assert!(card.contains(
            "- `math`: [org/math-7b](https://huggingface.co/org/math-7b) at `v2`; weight 0.5"
        ));
        assert!(card.contains("`lambda` 1 (default)"));
    }
}
