//! Checked recipe → execution plan: a DAG of steps (`open`, `calibrate`,
//! `merge`, `write`), each with its dependencies, the recipe span it came
//! from and a content hash of everything that determines its result (the
//! key of its cache entry). petgraph stays behind [`Plan`]. Rendering to
//! text, JSON and dot lives in `render.rs`.

mod hash;
mod params;
mod render;

use crate::pattern::layer_index;
use crate::recipe::{TakeFrom, gradient_position};
pub use params::{
    LinearParams, MultislerpParams, NuslerpParams, ObimParams, Op, RamParams, RegmeanParams,
    SlerpParams, Sparsify, TaskVectorParams,
};
pub use render::PlanView;

use crate::calibrate::Moments;
use crate::checkpoint::TensorInfo;
use crate::methods::Method;
use crate::open::Inventory;
use crate::recipe::{
    Choice, DataId, InputRef, MergeId, ModelId, ModelSource, Recipe, Saliency, TensorSettings,
};
use crate::source::Span;
use hash::{ContentHash, Hashed};
use petgraph::graph::{DiGraph, NodeIndex};
use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StepKind {
    /// Resolve a model to files and read its headers.
    Open(ModelId),
    /// Activation statistics of an input on a data source: Σ x² (OBD) or
    /// Σ x xᵀ (RegMean) of every linear input.
    Calibrate(InputRef, DataId, Moments),
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
    /// A merge with `auto` settings has its first candidate here until
    /// [`Plan::choose`] puts the winner in place.
    pub tensors: HashMap<MergeId, Vec<PlannedTensor>>,
    /// The candidates of every merge with `auto` settings, in the order of
    /// `Merge::candidates`; for a searched merge, the start and then every
    /// candidate the search added ([`Plan::add_variant`]).
    pub variants: HashMap<MergeId, Vec<Variant>>,
    /// A searched merge's dependency hashes, to lower more candidates.
    search_deps: HashMap<MergeId, Vec<String>>,
}

/// One `auto` candidate of a merge: its values and what each tensor gets.
#[derive(Debug, Clone)]
pub struct Variant {
    /// An index into each `auto` site's values.
    pub choice: Choice,
    /// `lambda=0.5, add retain=0.2`.
    pub label: String,
    pub tensors: Vec<PlannedTensor>,
    /// The merge step's hash with these values written in (the key of the
    /// candidate's cached score).
    pub hash: String,
}

impl Variant {
    /// Where the candidate's score on `tokens` (the selection data) is
    /// cached: the run writes it, `obim plan` reads it.
    pub fn score_path(
        &self,
        cache: &std::path::Path,
        judge: crate::recipe::Judge,
        sources: &[crate::data::JudgedSource],
    ) -> std::path::PathBuf {
        let mut h = blake3::Hasher::new();
        h.update(b"obim candidate score v3\0");
        h.update(judge.name().as_bytes());
        h.update(self.hash.as_bytes());
        for s in sources {
            crate::data::hash_scored(&mut h, &s.seqs);
        }
        cache
            .join("scores")
            .join(format!("{}.json", &h.finalize().to_hex()[..32]))
    }
}

/// One tensor of a merge's output.
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    pub name: String,
    pub info: TensorInfo,
    /// The settings as written, after the `layers` rules (for showing where a
    /// value came from).
    pub settings: TensorSettings,
    /// What the executor does with the tensor, every parameter resolved.
    pub op: Op,
    /// Whether OBD saliency can apply (the tensor is a linear layer's weight or bias).
    pub has_linear_input: bool,
    /// In a merge with slices: which tensor of which model each operand is
    /// (`None`: every input's tensor of this name).
    pub sources: Option<TensorSources>,
}

/// The operands of one tensor of a stacked merge: the base's tensor (when
/// the slice has the base) and the inputs', by input index, each under its
/// name in that model (the layer it comes from).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSources {
    pub base: Option<String>,
    pub inputs: Vec<(usize, String)>,
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
        let mut lowering = Lowering::new(recipe, inventory);
        for (i, merge) in recipe.merges.iter().enumerate() {
            if merge.span.file == recipe.root {
                lowering.merge(MergeId(i));
            }
        }
        for (i, output) in recipe.outputs.iter().enumerate() {
            let merge = lowering.merge(output.merge);
            let tokenizer = output.tokenizer.map(|t| lowering.input(t));
            let mut h = ContentHash::new("obim write v2");
            h.str(&lowering.graph[merge].hash)
                .opt(output.dtype, |h, d| {
                    h.str(d.name());
                })
                .u64(output.shard_size)
                .opt(tokenizer, |h, t| {
                    h.str(&lowering.graph[t].hash);
                })
                .opt(output.chat_template.as_ref(), |h, t| {
                    h.str(&t.key());
                });
            let hash = h.finish();
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
            variants: lowering.variants,
            search_deps: lowering.search_deps,
        }
    }

    /// Lowers one more candidate of a searched merge and returns its index
    /// among the merge's variants (the existing one's, if lowered before).
    pub fn add_variant(
        &mut self,
        recipe: &Recipe,
        inventory: &Inventory,
        id: MergeId,
        choice: Choice,
    ) -> usize {
        let existing = self.variants.get(&id).into_iter().flatten();
        if let Some(i) = existing.clone().position(|v| v.choice == choice) {
            return i;
        }
        let lowering = Lowering::new(recipe, inventory);
        let deps = self.search_deps.get(&id).cloned().unwrap_or_default();
        let variant = lowering.variant(id, choice, &deps);
        let list = self.variants.entry(id).or_default();
        list.push(variant);
        list.len() - 1
    }

    /// Puts candidate `index` of merge `id` in place of the first (after
    /// selection): its tensors and its hash.
    pub fn choose(&mut self, id: MergeId, index: usize) {
        let Some(variant) = self.variants.get(&id).and_then(|v| v.get(index)) else {
            return;
        };
        self.tensors.insert(id, variant.tensors.clone());
        if let Some(step) = self
            .graph
            .node_weights_mut()
            .find(|s| s.kind == StepKind::Merge(id))
        {
            step.hash = variant.hash.clone();
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
    variants: HashMap<MergeId, Vec<Variant>>,
    search_deps: HashMap<MergeId, Vec<String>>,
}

impl<'a> Lowering<'a> {
    fn new(recipe: &'a Recipe, inventory: &'a Inventory) -> Self {
        Lowering {
            recipe,
            inventory,
            graph: DiGraph::new(),
            nodes: HashMap::new(),
            tensors: HashMap::new(),
            variants: HashMap::new(),
            search_deps: HashMap::new(),
        }
    }

    /// One candidate of merge `id`: its values written in, its tensors and hash.
    fn variant(&self, id: MergeId, choice: Choice, deps: &[String]) -> Variant {
        let merge = &self.recipe.merges[id.0];
        let fixed = merge.with_candidate(&choice);
        Variant {
            label: merge.describe(&choice),
            tensors: self.tensors_with_vocabulary(id, &fixed),
            hash: self.merge_hash(id, &fixed, deps),
            choice,
        }
    }

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

    fn calibrate(&mut self, input: InputRef, data: DataId, moments: Moments) -> NodeIndex {
        let kind = StepKind::Calibrate(input, data, moments);
        if let Some(n) = self.nodes.get(&kind) {
            return *n;
        }
        let model = self.input(input);
        let d = &self.recipe.data[data.0];
        let mut h = ContentHash::new(match moments {
            Moments::Diagonal => "obim calibrate v2",
            Moments::Gram => "obim gram v1",
        });
        h.str(&self.graph[model].hash);
        d.hash_into(&mut h);
        h.str(&data_content_hash(d));
        let hash = h.finish();
        let id = calibrate_step_id(self.recipe, input, data, moments);

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
        let inputs: Vec<NodeIndex> = merge.dependencies().map(|d| self.input(d)).collect();
        let tensors = self.tensors_with_vocabulary(id, merge);
        // Calibrations: every (input, data) pair some tensor needs for OBD
        // or RegMean.
        let mut needed: Vec<(usize, DataId, Moments)> = Vec::new();
        for t in &tensors {
            let Some((using, moments)) = t.op.calibration() else {
                continue;
            };
            for (i, using) in using.iter().enumerate() {
                if let Some(d) = *using
                    && !needed.contains(&(i, d, moments))
                {
                    needed.push((i, d, moments));
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
                    needed.push((i, d, Moments::Diagonal));
                }
            }
        }
        if tensors.is_empty() && merge.method == Method::Regmean {
            for i in 0..merge.inputs.len() {
                if let Some(d) = merge.input_settings(i).using {
                    needed.push((i, d, Moments::Gram));
                }
            }
        }
        needed.sort();
        let calibrations: Vec<NodeIndex> = needed
            .into_iter()
            .map(|(i, data, moments)| self.calibrate(merge.inputs[i].model, data, moments))
            .collect();
        let deps: Vec<String> = inputs
            .iter()
            .chain(&calibrations)
            .map(|n| self.graph[*n].hash.clone())
            .collect();
        // `auto` values change no dependency (they are numbers, never a
        // `using` or a `take`), so every candidate shares these.
        // A searched merge starts with one candidate (each site's middle
        // value); the search lowers more as it goes.
        let choices = match merge.searched() {
            Some(_) => {
                self.search_deps.insert(id, deps.clone());
                vec![
                    merge
                        .autos
                        .iter()
                        .map(|a| (a.values.len() - 1) / 2)
                        .collect(),
                ]
            }
            None => merge.candidates(),
        };
        let variants: Vec<Variant> = choices
            .into_iter()
            .filter(|_| !merge.autos.is_empty())
            .map(|choice| self.variant(id, choice, &deps))
            .collect();
        let hash = self.merge_hash(id, merge, &deps);
        let all: Vec<Option<NodeIndex>> =
            inputs.into_iter().chain(calibrations).map(Some).collect();
        let node = self.add(
            Step {
                id: format!("merge:{}", merge.name),
                kind: StepKind::Merge(id),
                span: merge.span,
                hash,
            },
            &all,
        );
        self.tensors.insert(id, tensors);
        if !variants.is_empty() {
            self.variants.insert(id, variants);
        }
        node
    }

    /// What determines a merge's result: its dependencies' hashes (inputs
    /// in order, then calibrations), method, settings, rules, `auto`
    /// candidates and selection data, and obim's version.
    fn merge_hash(&self, id: MergeId, merge: &crate::recipe::Merge, deps: &[String]) -> String {
        let mut h = ContentHash::new("obim merge v3");
        h.u64(deps.len() as u64);
        for d in deps {
            h.str(d);
        }
        h.str(merge.method.name());
        merge.settings.hash_into(&mut h);
        h.u64(merge.rules.len() as u64);
        for rule in &merge.rules {
            rule.hash_into(&mut h);
        }
        h.u64(merge.slices.len() as u64);
        for slice in &merge.slices {
            h.u64(slice.sources.len() as u64);
            for s in &slice.sources {
                h.opt(s.input, |h, i| {
                    h.u64(i as u64);
                })
                .u64(s.start as u64)
                .u64(s.end as u64);
            }
        }
        h.u64(merge.autos.len() as u64);
        for site in &merge.autos {
            h.opt(site.rule, |h, r| {
                h.u64(r as u64);
            })
            .opt(site.input, |h, i| {
                h.u64(i as u64);
            });
            h.str(site.field.as_str());
            h.u64(site.values.len() as u64);
            for v in &site.values {
                h.f64(*v);
            }
        }
        h.opt(merge.select.as_ref(), |h, select| {
            h.str(select.judge.name());
            h.opt(select.search, |h, s| {
                h.str("coordinate").u64(s.budget as u64);
            });
            h.u64(select.data.len() as u64);
            for d in &select.data {
                let data = &self.recipe.data[d.0];
                data.hash_into(h);
                h.str(&data_content_hash(data));
            }
        });
        h.opt(self.inventory.vocabularies.get(&id), |h, v| {
            h.str(v.fingerprint());
        });
        h.str(env!("CARGO_PKG_VERSION"));
        h.finish()
    }

    /// The merge's tensors; with an output vocabulary, the embedding and
    /// head get its rows.
    fn tensors_with_vocabulary(
        &self,
        id: MergeId,
        merge: &crate::recipe::Merge,
    ) -> Vec<PlannedTensor> {
        let mut tensors = self.tensors_of(merge);
        if let Some(v) = self.inventory.vocabularies.get(&id) {
            for t in &mut tensors {
                if crate::vocab::is_vocabulary_tensor(&t.name) && !t.info.shape.is_empty() {
                    t.info.shape[0] = v.size;
                }
            }
        }
        tensors
    }

    fn tensors_of(&self, merge: &crate::recipe::Merge) -> Vec<PlannedTensor> {
        if !merge.slices.is_empty() {
            return self.stacked_tensors_of(merge);
        }
        let Some(base) = merge.shape_input() else {
            return Vec::new();
        };
        let Some(info) = self.inventory.of_input(self.recipe, base) else {
            return Vec::new();
        };
        let mut names: Vec<&String> = info.tensors.keys().collect();
        names.sort_by_key(|n| natural_key(n));
        let layers = names
            .iter()
            .filter_map(|n| layer_index(n))
            .max()
            .map_or(0, |i| i + 1);
        names
            .into_iter()
            .map(|name| {
                let t = &info.tensors[name];
                let settings = merge.tensor_settings(name, gradient_position(name, layers));
                let linear = has_linear_input(name, t, &info.tensors);
                PlannedTensor {
                    name: name.clone(),
                    info: t.clone(),
                    op: Op::resolve(merge.method, &settings, linear),
                    settings,
                    has_linear_input: linear,
                    sources: None,
                }
            })
            .collect()
    }

    /// The tensors of a merge with slices (mergekit's `slices`): slice by
    /// slice, each layer of the sources' ranges becomes the next output
    /// layer, renamed, and is merged from those sources' tensors; the
    /// embeddings come from the first slice's sources and every other
    /// tensor outside the layers (final norm, head) from the last slice's.
    /// Gradients run over each slice, as in mergekit.
    fn stacked_tensors_of(&self, merge: &crate::recipe::Merge) -> Vec<PlannedTensor> {
        let model_of = |input: Option<usize>| match input {
            None => merge.base,
            Some(i) => merge.inputs.get(i).map(|x| x.model),
        };
        let info_of = |input: Option<usize>| {
            model_of(input).and_then(|m| self.inventory.of_input(self.recipe, m))
        };
        let Some(shape) = merge.slices[0]
            .sources
            .first()
            .and_then(|s| info_of(s.input))
        else {
            return Vec::new();
        };
        let plan_one =
            |out: String, from: &[crate::recipe::SliceSource], layer: Option<(usize, usize)>| {
                // `layer`: (offset in the slice, slice length).
                let name_in = |s: &crate::recipe::SliceSource| match layer {
                    Some((j, _)) => with_layer_index(&out, s.start + j),
                    None => out.clone(),
                };
                let first = from.first()?;
                let first_info = info_of(first.input)?;
                let t = first_info.tensors.get(&name_in(first))?;
                let position = match layer {
                    Some((_, 1)) => 1.0,
                    Some((j, len)) => j as f64 / (len - 1) as f64,
                    None => 0.0,
                };
                let mut settings = merge.tensor_settings(&out, position);
                let mut sources = TensorSources {
                    base: from.iter().find(|s| s.input.is_none()).map(&name_in),
                    inputs: from
                        .iter()
                        .filter_map(|s| Some((s.input?, name_in(s))))
                        .collect(),
                };
                // `take` of a model outside the slice: a tensor outside the
                // layers (embeddings, head) comes from it under its own name.
                match settings.take {
                    Some(TakeFrom::Base) if sources.base.is_none() && layer.is_none() => {
                        sources.base = Some(out.clone());
                    }
                    Some(TakeFrom::Input(i)) => {
                        if !sources.inputs.iter().any(|(k, _)| *k == i) && layer.is_none() {
                            sources.inputs.push((i, out.clone()));
                        }
                        // The take's index among this tensor's operands; a model
                        // outside this slice has none, and the run says so.
                        let k = sources.inputs.iter().position(|(k, _)| *k == i);
                        settings.take = Some(TakeFrom::Input(k.unwrap_or(usize::MAX)));
                    }
                    _ => {}
                }
                settings.inputs = sources
                    .inputs
                    .iter()
                    .map(|(i, _)| settings.inputs[*i].clone())
                    .collect();
                let linear = has_linear_input(&name_in(first), t, &first_info.tensors);
                Some(PlannedTensor {
                    info: t.clone(),
                    op: Op::resolve(merge.method, &settings, linear),
                    settings,
                    has_linear_input: linear,
                    sources: Some(sources),
                    name: out,
                })
            };
        let mut outside: Vec<&String> = shape
            .tensors
            .keys()
            .filter(|n| layer_index(n).is_none())
            .collect();
        outside.sort_by_key(|n| natural_key(n));
        let (first, last) = (&merge.slices[0], &merge.slices[merge.slices.len() - 1]);
        let mut tensors = Vec::new();
        for name in &outside {
            let slice = if is_input_embedding(name) {
                first
            } else {
                last
            };
            tensors.extend(plan_one((*name).clone(), &slice.sources, None));
        }
        let mut out_layer = 0;
        for slice in &merge.slices {
            let Some(lead) = slice.sources.first() else {
                continue;
            };
            let Some(lead_info) = info_of(lead.input) else {
                continue;
            };
            for j in 0..slice.len() {
                let mut names: Vec<&String> = lead_info
                    .tensors
                    .keys()
                    .filter(|n| layer_index(n) == Some(lead.start + j))
                    .collect();
                names.sort_by_key(|n| natural_key(n));
                for name in names {
                    let out = with_layer_index(name, out_layer);
                    tensors.extend(plan_one(out, &slice.sources, Some((j, slice.len()))));
                }
                out_layer += 1;
            }
        }
        tensors.sort_by_key(|t| natural_key(&t.name));
        tensors
    }
}

/// Whether a tensor outside the layers comes before them (mergekit's
/// `pre_weights`: token and position embeddings), so that a stacked merge
/// takes it from the first slice; the rest (final norm, head — also a head
/// named `embed_out`) come after.
fn is_input_embedding(name: &str) -> bool {
    [
        "embed_tokens",
        "embed_in",
        "wte",
        "wpe",
        "word_embeddings",
        "position_embeddings",
    ]
    .iter()
    .any(|e| name.split('.').any(|part| part == *e))
}

/// `name` with its layer index replaced by `layer`
/// (`model.layers.3.mlp.up_proj.weight`, 7 → `model.layers.7.mlp.up_proj.weight`).
pub fn with_layer_index(name: &str, layer: usize) -> String {
    let mut parts: Vec<String> = name.split('.').map(str::to_string).collect();
    if let Some(i) = parts
        .windows(2)
        .position(|w| w[0] == "layers" && w[1].parse::<usize>().is_ok())
    {
        parts[i + 1] = layer.to_string();
    }
    parts.join(".")
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

/// `calibrate:add@add_calib` (Σ x²) or `gram:add@add_calib` (Σ x xᵀ).
pub fn calibrate_step_id(
    recipe: &Recipe,
    input: InputRef,
    data: DataId,
    moments: Moments,
) -> String {
    let kind = match moments {
        Moments::Diagonal => "calibrate",
        Moments::Gram => "gram",
    };
    format!(
        "{kind}:{}@{}",
        recipe.input_name(input),
        recipe.data[data.0].name
    )
}
