//! Checked recipe → execution plan: a DAG of steps (`open`, `calibrate`,
//! `merge`, `write`), each with its dependencies, the recipe span it came
//! from and a content hash of everything that determines its result (the
//! key of its cache entry). petgraph stays behind [`Plan`]. Rendering to
//! text, JSON and dot lives in `render.rs`.

mod render;

pub use render::PlanView;

use crate::checkpoint::TensorInfo;
use crate::methods::{Default as ParamDefault, Method, Scope as ParamScope};
use crate::open::Inventory;
use crate::recipe::{
    DataId, InputRef, MergeId, ModelId, ModelSource, Recipe, Saliency, TensorSettings,
};
use crate::source::Span;
use petgraph::graph::{DiGraph, NodeIndex};
use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StepKind {
    /// Resolve a model to files and read its headers.
    Open(ModelId),
    /// Activation statistics of an input on a data source.
    Calibrate(InputRef, DataId),
    Merge(MergeId),
    /// Index into `Recipe::outputs`.
    Write(usize),
}

impl StepKind {
    pub fn name(&self) -> &'static str {
        match self {
            StepKind::Open(_) => "open",
            StepKind::Calibrate(..) => "calibrate",
            StepKind::Merge(_) => "merge",
            StepKind::Write(_) => "write",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Step {
    /// Stable and readable: `open:base`, `calibrate:add@add_calib`, `merge:demo`, `write:out/demo`.
    pub id: String,
    pub kind: StepKind,
    pub span: Span,
    /// blake3 (hex) of the step's inputs and settings.
    pub hash: String,
}

/// The execution plan of a recipe.
#[derive(Debug, Clone)]
pub struct Plan {
    graph: DiGraph<Step, ()>,
    /// Tensors of every planned merge, with the settings that govern them.
    pub tensors: HashMap<MergeId, Vec<PlannedTensor>>,
}

/// One tensor of a merge's output.
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    pub name: String,
    pub info: TensorInfo,
    pub settings: TensorSettings,
    /// Whether OBD saliency can apply (the tensor is a linear layer's weight or bias).
    pub has_linear_input: bool,
}

impl PlannedTensor {
    /// The saliency an input actually gets on this tensor, and why when it
    /// differs from the setting.
    pub fn saliency(&self) -> (Saliency, Option<&'static str>) {
        match self.settings.saliency {
            Saliency::Obd if !self.has_linear_input => {
                (Saliency::Magnitude, Some("no linear input"))
            }
            s => (s, None),
        }
    }
}

/// Whether a tensor is the weight or bias of a linear layer, whose input
/// activations OBD saliency weighs. Embeddings and norms are not.
pub fn has_linear_input(name: &str, info: &TensorInfo, all: &BTreeMap<String, TensorInfo>) -> bool {
    let module = name.rsplit_once('.').map_or(name, |(m, _)| m);
    let is_embedding = module.ends_with("embed_tokens")
        || module.ends_with("wte")
        || module.ends_with("embeddings");
    if is_embedding {
        return false;
    }
    if name.ends_with(".weight") {
        return info.shape.len() == 2;
    }
    if name.ends_with(".bias") {
        return all
            .get(&format!("{module}.weight"))
            .is_some_and(|w| w.shape.len() == 2);
    }
    false
}

impl Plan {
    /// Lowers a checked recipe (without errors) into its plan: the outputs of
    /// the root file and every merge defined there, with what they need.
    pub fn lower(recipe: &Recipe, inventory: &Inventory) -> Plan {
        let mut lowering = Lowering {
            recipe,
            inventory,
            graph: DiGraph::new(),
            nodes: HashMap::new(),
            tensors: HashMap::new(),
        };
        for (i, merge) in recipe.merges.iter().enumerate() {
            if merge.span.file == recipe.root {
                lowering.merge(MergeId(i));
            }
        }
        for (i, output) in recipe.outputs.iter().enumerate() {
            let merge = lowering.merge(output.merge);
            let tokenizer = output.tokenizer.map(|t| lowering.input(t));
            let hash = hash_of(&[
                &lowering.graph[merge].hash,
                &format!(
                    "{:?}|{}|{:?}",
                    output.dtype,
                    output.shard_size,
                    tokenizer.map(|t| &lowering.graph[t].hash)
                ),
            ]);
            let id = format!("write:{}", output.written);
            lowering.add(
                Step {
                    id,
                    kind: StepKind::Write(i),
                    span: output.span,
                    hash,
                },
                &[Some(merge), tokenizer],
            );
        }
        Plan {
            graph: lowering.graph,
            tensors: lowering.tensors,
        }
    }

    /// Steps in an order where every step comes after its dependencies
    /// (ties in declaration order).
    /// The content hash of the step of `kind` (empty when there is none).
    pub fn step_hash(&self, kind: StepKind) -> &str {
        self.graph
            .node_weights()
            .find(|s| s.kind == kind)
            .map_or("", |s| s.hash.as_str())
    }

    pub fn steps(&self) -> Vec<&Step> {
        let mut order: Vec<NodeIndex> = Vec::new();
        let mut done = vec![false; self.graph.node_count()];
        // Kahn's algorithm, always taking the lowest-index ready node, so the
        // order is stable and follows the recipe.
        loop {
            let next = self
                .graph
                .node_indices()
                .find(|n| !done[n.index()] && self.graph.neighbors(*n).all(|d| done[d.index()]));
            let Some(n) = next else { break };
            done[n.index()] = true;
            order.push(n);
        }
        order.into_iter().map(|n| &self.graph[n]).collect()
    }

    /// The ids of a step's direct dependencies.
    pub fn deps(&self, step: &Step) -> Vec<&str> {
        let Some(node) = self
            .graph
            .node_indices()
            .find(|n| self.graph[*n].id == step.id)
        else {
            return Vec::new();
        };
        let mut deps: Vec<NodeIndex> = self.graph.neighbors(node).collect();
        deps.sort();
        deps.into_iter()
            .map(|d| self.graph[d].id.as_str())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.graph.node_count()
    }

    pub fn is_empty(&self) -> bool {
        self.graph.node_count() == 0
    }
}

struct Lowering<'a> {
    recipe: &'a Recipe,
    inventory: &'a Inventory,
    graph: DiGraph<Step, ()>,
    nodes: HashMap<StepKind, NodeIndex>,
    tensors: HashMap<MergeId, Vec<PlannedTensor>>,
}

impl Lowering<'_> {
    /// Adds a step after its dependencies and remembers it by kind, so each
    /// model, calibration, merge and output is planned once.
    fn add(&mut self, step: Step, deps: &[Option<NodeIndex>]) -> NodeIndex {
        let kind = step.kind;
        let node = self.graph.add_node(step);
        for dep in deps.iter().flatten() {
            self.graph.add_edge(node, *dep, ());
        }
        self.nodes.insert(kind, node);
        node
    }

    fn open(&mut self, id: ModelId) -> NodeIndex {
        if let Some(n) = self.nodes.get(&StepKind::Open(id)) {
            return *n;
        }
        let model = &self.recipe.models[id.0];
        let source = match &model.source {
            ModelSource::Local { .. } => String::from("local"),
            ModelSource::Hub { id, revision } => {
                format!("hub:{id}@{}", revision.as_deref().unwrap_or("main"))
            }
        };
        // A local model is identified by its headers; a hub model by id and revision until opened.
        let content = self
            .inventory
            .get(id)
            .map_or(String::new(), |i| i.hash.clone());
        let hash = hash_of(&[&source, &content]);

        self.add(
            Step {
                id: format!("open:{}", model.name),
                kind: StepKind::Open(id),
                span: model.span,
                hash,
            },
            &[],
        )
    }

    fn input(&mut self, input: InputRef) -> NodeIndex {
        match input {
            InputRef::Model(m) => self.open(m),
            InputRef::Merge(m) => self.merge(m),
        }
    }

    fn calibrate(&mut self, input: InputRef, data: DataId) -> NodeIndex {
        let kind = StepKind::Calibrate(input, data);
        if let Some(n) = self.nodes.get(&kind) {
            return *n;
        }
        let model = self.input(input);
        let d = &self.recipe.data[data.0];
        let content = data_content_hash(d);
        let spec = format!(
            "{:?}|{}|{}|{:?}|{}|{}|{content}",
            d.kind, d.pattern, d.field, d.samples, d.seq_len, d.seed
        );
        let hash = hash_of(&[&self.graph[model].hash, &spec]);
        let id = format!("calibrate:{}@{}", self.recipe.input_name(input), d.name);

        self.add(
            Step {
                id,
                kind,
                span: d.span,
                hash,
            },
            &[Some(model)],
        )
    }

    fn merge(&mut self, id: MergeId) -> NodeIndex {
        if let Some(n) = self.nodes.get(&StepKind::Merge(id)) {
            return *n;
        }
        let merge = &self.recipe.merges[id.0];
        let mut deps: Vec<Option<NodeIndex>> =
            merge.dependencies().map(|d| Some(self.input(d))).collect();
        let tensors = self.tensors_of(id);
        // Calibrations: every (input, data) pair some tensor needs for OBD.
        let mut needed: Vec<(usize, DataId)> = Vec::new();
        for t in &tensors {
            if merge.method != Method::Obim
                || t.settings.take.is_some()
                || t.saliency().0 != Saliency::Obd
            {
                continue;
            }
            for (i, s) in t.settings.inputs.iter().enumerate() {
                if let Some(d) = s.using
                    && !needed.contains(&(i, d))
                {
                    needed.push((i, d));
                }
            }
        }
        if tensors.is_empty()
            && merge.method == Method::Obim
            && merge.settings.saliency.unwrap_or(Saliency::Obd) == Saliency::Obd
        {
            // No headers to decide per tensor: plan every input's own data.
            for i in 0..merge.inputs.len() {
                if let Some(d) = merge.input_settings(i).using {
                    needed.push((i, d));
                }
            }
        }
        needed.sort();
        for (i, data) in needed {
            deps.push(Some(self.calibrate(merge.inputs[i].model, data)));
        }
        let mut parts: Vec<String> = deps
            .iter()
            .flatten()
            .map(|n| self.graph[*n].hash.clone())
            .collect();
        parts.push(format!(
            "{}|{:?}|{:?}",
            merge.method,
            merge.settings,
            merge.inputs.iter().map(|i| i.model).collect::<Vec<_>>()
        ));
        for rule in &merge.rules {
            let patterns: Vec<&str> = rule.patterns.iter().map(|p| p.as_str()).collect();
            parts.push(format!("{patterns:?}|{:?}", rule.settings));
        }
        for site in &merge.autos {
            parts.push(format!(
                "auto {:?} {:?} {:?} {:?}",
                site.rule, site.input, site.field, site.values
            ));
        }
        if let Some(select) = &merge.select {
            for d in &select.data {
                let data = &self.recipe.data[d.0];
                parts.push(format!(
                    "select {}|{}|{:?}|{}|{}|{}",
                    data.pattern,
                    data.field,
                    data.samples,
                    data.seq_len,
                    data.seed,
                    data_content_hash(data)
                ));
            }
        }
        parts.push(format!("obim {}", env!("CARGO_PKG_VERSION")));
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        let hash = hash_of(&refs);
        let node = self.add(
            Step {
                id: format!("merge:{}", merge.name),
                kind: StepKind::Merge(id),
                span: merge.span,
                hash,
            },
            &deps,
        );
        self.tensors.insert(id, tensors);
        node
    }

    fn tensors_of(&self, id: MergeId) -> Vec<PlannedTensor> {
        let merge = &self.recipe.merges[id.0];
        let Some(base) = merge.base.or_else(|| merge.inputs.first().map(|i| i.model)) else {
            return Vec::new();
        };
        let Some(info) = self.inventory.of_input(self.recipe, base) else {
            return Vec::new();
        };
        let mut names: Vec<&String> = info.tensors.keys().collect();
        names.sort_by_key(|n| natural_key(n));
        names
            .into_iter()
            .map(|name| {
                let t = &info.tensors[name];
                PlannedTensor {
                    name: name.clone(),
                    info: t.clone(),
                    settings: merge.tensor_settings(name),
                    has_linear_input: has_linear_input(name, t, &info.tensors),
                }
            })
            .collect()
    }
}

/// blake3 of the parts, each length-prefixed.
fn hash_of(parts: &[&str]) -> String {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    h.finalize().to_hex().to_string()
}

/// blake3 of every file of a data source, in path order.
fn data_content_hash(data: &crate::recipe::Data) -> String {
    let mut paths: Vec<std::path::PathBuf> = match glob::glob(&data.path.to_string_lossy()) {
        Ok(paths) => paths.flatten().filter(|p| p.is_file()).collect(),
        Err(_) => Vec::new(),
    };
    paths.sort();
    let mut h = blake3::Hasher::new();
    for p in paths {
        if let Ok(mut file) = std::fs::File::open(&p) {
            let _ = std::io::copy(&mut file, &mut h);
        }
    }
    h.finalize().to_hex().to_string()
}

/// Sort key that orders `layers.10` after `layers.9`.
fn natural_key(name: &str) -> Vec<(u64, String)> {
    name.split('.')
        .map(|part| {
            part.parse::<u64>()
                .map_or((u64::MAX, part.to_string()), |n| (n, String::new()))
        })
        .collect()
}

/// A merge parameter's value on a tensor, with the method's default.
pub fn effective_params(
    method: Method,
    settings: &TensorSettings,
) -> Vec<(&'static str, serde_json::Value)> {
    let p = &settings.params;
    method
        .params()
        .iter()
        .filter(|param| param.scope == ParamScope::Merge && param.name != "base")
        .filter_map(|param| {
            let given = match param.name {
                "normalize" => p.normalize.map(serde_json::Value::from),
                "rescale" => p.rescale.map(serde_json::Value::from),
                "int8_mask" => p.int8_mask.map(serde_json::Value::from),
                "lambda" => p.lambda.map(serde_json::Value::from),
                "t" => p.t.map(serde_json::Value::from),
                "seed" => p.seed.map(serde_json::Value::from),
                "scale" => p.scale.map(serde_json::Value::from),
                _ => None,
            };
            let value = given.or(match param.default {
                Some(ParamDefault::Bool(b)) => Some(b.into()),
                Some(ParamDefault::Number(n)) => Some(n.into()),
                _ => None,
            })?;
            Some((param.name, value))
        })
        .collect()
}
