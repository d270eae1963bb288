//! Names for a config's models and stages, and paths as the recipe reaches
//! them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

/// Names for the config's models and stages: from their paths or ids,
/// valid `.obim` names, each used once.
#[derive(Default)]
pub(super) struct Names {
    /// reference as written → (name, path for the recipe, first YAML line).
    models: BTreeMap<String, (String, String, usize)>,
    order: Vec<String>,
    taken: HashSet<String>,
    merges: HashMap<String, String>,
    base: HashSet<String>,
}

impl Names {
    fn fresh(&mut self, wanted: &str) -> String {
        let mut base: String = wanted
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        base = base.trim_matches('_').to_string();
        while base.contains("__") {
            base = base.replace("__", "_");
        }
        if base.is_empty() || base.starts_with(|c: char| c.is_ascii_digit()) {
            base = format!("m_{base}");
        }
        if crate::syntax::is_reserved(&base) {
            base.push_str("_model");
        }
        let mut name = base.clone();
        let mut n = 2;
        while self.taken.contains(&name) {
            name = format!("{base}_{n}");
            n += 1;
        }
        self.taken.insert(name.clone());
        name
    }

    pub(super) fn merge(&mut self, stage: &str) -> String {
        if let Some(n) = self.merges.get(stage) {
            return n.clone();
        }
        let n = self.fresh(stage);
        self.merges.insert(stage.to_string(), n.clone());
        n
    }

    /// The name of a model reference (`org/name`, `org/name@rev`, a path).
    pub(super) fn model(&mut self, reference: &str, line: usize, dirs: (&Path, &Path)) -> String {
        if let Some((name, _, _)) = self.models.get(reference) {
            return name.clone();
        }
        let (id, revision) = match reference.rsplit_once('@') {
            Some((id, rev)) if !rev.contains('/') => (id, Some(rev)),
            _ => (reference, None),
        };
        let stem = id.trim_end_matches('/').rsplit('/').next().unwrap_or(id);
        let name = self.fresh(stem);
        let path = relative_path(id, dirs.0, dirs.1);
        let written = match revision {
            Some(r) => format!("\"{path}\" @ \"{r}\""),
            None => format!("\"{path}\""),
        };
        self.models
            .insert(reference.to_string(), (name.clone(), written, line));
        self.order.push(reference.to_string());
        name
    }

    pub(super) fn mark_base(&mut self, name: &str) {
        self.base.insert(name.to_string());
    }

    /// `base NAME = "..."` / `model NAME = "..."`, in order of appearance.
    /// The name of `model+adapter`: the adapter on the model named `base`.
    pub(super) fn lora(
        &mut self,
        reference: &str,
        adapter: &str,
        base: &str,
        line: usize,
        dirs: (&Path, &Path),
    ) -> String {
        if let Some((name, _, _)) = self.models.get(reference) {
            return name.clone();
        }
        let stem = adapter
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or(adapter);
        let name = self.fresh(stem);
        let path = relative_path(adapter, dirs.0, dirs.1);
        self.models.insert(
            reference.to_string(),
            (
                name.clone(),
                format!("lora(\"{path}\", base: {base})"),
                line,
            ),
        );
        self.order.push(reference.to_string());
        name
    }

    pub(super) fn declarations(&self) -> Vec<(usize, String)> {
        self.order
            .iter()
            .map(|r| {
                let (name, path, line) = &self.models[r];
                let kind = if self.base.contains(name) {
                    "base"
                } else {
                    "model"
                };
                (*line, format!("{kind} {name} = {path}"))
            })
            .collect()
    }
}

/// A local model path as the recipe in `recipe_dir` reaches it; a hub id
/// as it is. mergekit reads paths from its working directory; a path that
/// exists beside the config (`yaml_dir`) is taken from there first.
fn relative_path(reference: &str, yaml_dir: &Path, recipe_dir: &Path) -> String {
    let beside = yaml_dir.join(reference);
    let path = if beside.exists() {
        beside
    } else {
        PathBuf::from(reference)
    };
    if !path.exists() {
        return reference.to_string();
    }
    let (Ok(target), Ok(from)) = (
        std::fs::canonicalize(&path),
        std::fs::canonicalize(recipe_dir),
    ) else {
        return reference.to_string();
    };
    let common = target
        .components()
        .zip(from.components())
        .take_while(|(a, b)| a == b)
        .count();
    let mut rel = PathBuf::new();
    for _ in from.components().skip(common) {
        rel.push("..");
    }
    for c in target.components().skip(common) {
        rel.push(c);
    }
    let text = rel.to_string_lossy().to_string();
    if text.starts_with("..") {
        text
    } else {
        format!("./{text}")
    }
}
