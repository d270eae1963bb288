//! The checked recipe: every name resolved, every value typed and in range.
//! This is what lowering and the executor read; nothing after the checker
//! looks at the syntax tree. [`Merge::tensor_settings`] is the one place that
//! decides which settings govern a tensor after all `layers` rules.

use crate::methods::{Method, ParamName};
use crate::pattern::{Pattern, layer_index};
use crate::source::{FileId, Span};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelId(pub usize);
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DataId(pub usize);
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MergeId(pub usize);

#[derive(Debug, Clone, Default)]
pub struct Recipe {
    /// The file that was checked (its outputs are the recipe's outputs).
    pub root: FileId,
    pub models: Vec<Model>,
    pub data: Vec<Data>,
    pub merges: Vec<Merge>,
    pub outputs: Vec<Output>,
}

/// Where a model's files are.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ModelSource {
    /// A directory, resolved against the recipe's directory.
    Local { path: PathBuf },
    /// A Hugging Face id, with an optional revision (branch, tag or commit).
    Hub {
        id: String,
        revision: Option<String>,
    },
}

#[derive(Debug, Clone)]
pub struct Model {
    /// As written where it is defined, qualified when imported (`m.math`).
    pub name: String,
    pub is_base: bool,
    /// Where the weights are; for a LoRA model, the adapter's directory
    /// (its weights are its base model's, changed by the adapter).
    pub source: ModelSource,
    /// `lora("./adapter", base: MODEL)`: the model the adapter applies to.
    pub lora_base: Option<ModelId>,
    /// The declaration's name.
    pub span: Span,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DataKind {
    Jsonl,
    Text,
}

#[derive(Debug, Clone)]
pub struct Data {
    pub name: String,
    pub kind: DataKind,
    /// The path or glob as written.
    pub pattern: String,
    /// Resolved against the recipe's directory.
    pub path: PathBuf,
    /// The jsonl field holding the text (default `text`).
    pub field: String,
    /// How many samples to draw (`None`: all).
    pub samples: Option<u64>,
    /// Longer sequences are truncated to this many tokens.
    pub seq_len: u64,
    pub seed: u64,
    pub span: Span,
}

/// A model or a merge: anything a merge can take as input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InputRef {
    Model(ModelId),
    Merge(MergeId),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Saliency {
    Obd,
    Magnitude,
}

impl Saliency {
    pub fn name(self) -> &'static str {
        match self {
            Saliency::Obd => "obd",
            Saliency::Magnitude => "magnitude",
        }
    }
}

/// The order in which OBIM inputs pick positions. Indices are input indices.
#[derive(Debug, Clone, PartialEq)]
pub enum OrderSpec {
    Rotate,
    Fixed(Vec<usize>),
    First(usize),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TakeFrom {
    Base,
    Input(usize),
}

/// Per-input settings; `None` where not given at this level.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InputSettings {
    pub weight: Option<f64>,
    pub density: Option<f64>,
    pub retain: Option<f64>,
    pub using: Option<DataId>,
    /// Breadcrumbs: the fraction of largest |δ| dropped.
    pub gamma: Option<f64>,
    /// DELLA: the spread of keep probabilities.
    pub epsilon: Option<f64>,
}

impl InputSettings {
    /// Fields set in `over` replace those of `self`.
    pub fn overlay(&mut self, over: &InputSettings) {
        self.weight = over.weight.or(self.weight);
        self.density = over.density.or(self.density);
        self.retain = over.retain.or(self.retain);
        self.using = over.using.or(self.using);
        self.gamma = over.gamma.or(self.gamma);
        self.epsilon = over.epsilon.or(self.epsilon);
    }

    /// The value of numeric setting `key` at this level.
    pub fn number(&self, key: ParamName) -> Option<f64> {
        match key {
            ParamName::Weight => self.weight,
            ParamName::Density => self.density,
            ParamName::Retain => self.retain,
            ParamName::Gamma => self.gamma,
            ParamName::Epsilon => self.epsilon,
            _ => None,
        }
    }

    /// The numeric setting `key`, if this is where it lives.
    pub fn number_mut(&mut self, key: ParamName) -> Option<&mut Option<f64>> {
        Some(match key {
            ParamName::Weight => &mut self.weight,
            ParamName::Density => &mut self.density,
            ParamName::Retain => &mut self.retain,
            ParamName::Gamma => &mut self.gamma,
            ParamName::Epsilon => &mut self.epsilon,
            _ => return None,
        })
    }
}

/// A merge-level parameter's value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ParamValue {
    Number(f64),
    Bool(bool),
}

/// Merge-level parameters by name; absent where not given at this level.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MergeParams {
    values: BTreeMap<ParamName, ParamValue>,
}

impl MergeParams {
    pub fn overlay(&mut self, over: &MergeParams) {
        self.values
            .extend(over.values.iter().map(|(k, v)| (*k, *v)));
    }

    pub fn set(&mut self, key: ParamName, value: Option<ParamValue>) {
        match value {
            Some(v) => self.values.insert(key, v),
            None => self.values.remove(&key),
        };
    }

    pub fn number(&self, key: ParamName) -> Option<f64> {
        match self.values.get(&key)? {
            ParamValue::Number(n) => Some(*n),
            ParamValue::Bool(_) => None,
        }
    }

    pub fn flag(&self, key: ParamName) -> Option<bool> {
        match self.values.get(&key)? {
            ParamValue::Bool(b) => Some(*b),
            ParamValue::Number(_) => None,
        }
    }

    /// Every parameter set, by name.
    pub fn iter(&self) -> impl Iterator<Item = (ParamName, ParamValue)> + '_ {
        self.values.iter().map(|(k, v)| (*k, *v))
    }
}

/// A list of numbers where one number goes (`t: [0, 0.5, 1]`): a value
/// that varies over the layers, interpolated as mergekit's gradients are.
#[derive(Debug, Clone, PartialEq)]
pub struct Gradient {
    /// `None`: a merge-level parameter or the default for every input.
    pub input: Option<usize>,
    pub key: ParamName,
    pub values: Vec<f64>,
    pub span: Span,
}

impl Gradient {
    /// The value at `t` in [0, 1] (mergekit's `evaluate_setting`): linear
    /// between the two neighbouring points of `t·(len − 1)`.
    pub fn at(&self, t: f64) -> f64 {
        let last = self.values.len().saturating_sub(1);
        let scaled = t * last as f64;
        let i0 = (scaled as usize).min(last);
        let i1 = (i0 + 1).min(last);
        let frac = scaled - i0 as f64;
        (1.0 - frac) * self.values[i0] + frac * self.values[i1]
    }
}

/// Where in a merge's layers a tensor sits, for gradients: mergekit's `t`,
/// the layer index over (layers − 1), 1 when there is one layer, 0 for a
/// tensor outside the layers (embeddings, final norm, head).
pub fn gradient_position(name: &str, layers: usize) -> f64 {
    match layer_index(name) {
        Some(i) if layers > 1 => i as f64 / (layers - 1) as f64,
        Some(_) => 1.0,
        None => 0.0,
    }
}

/// Everything one level (the merge itself, or one `layers` rule) sets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    pub order: Option<OrderSpec>,
    pub saliency: Option<Saliency>,
    pub take: Option<TakeFrom>,
    pub params: MergeParams,
    /// `name: value` in a parameter list: the default for every input.
    pub defaults: InputSettings,
    /// `MODEL setting value`: per input index.
    pub inputs: BTreeMap<usize, InputSettings>,
    /// Settings given as gradients; the fields above hold their first value.
    pub gradients: Vec<Gradient>,
}

impl Settings {
    /// Sets the gradients' values at position `t` in the fields they
    /// belong to.
    fn apply_gradients(&mut self, t: f64) {
        for g in &self.gradients {
            let value = g.at(t);
            let target = match g.input {
                None => &mut self.defaults,
                Some(k) => self.inputs.entry(k).or_default(),
            };
            match target.number_mut(g.key) {
                Some(field) => *field = Some(value),
                None => self.params.set(g.key, Some(ParamValue::Number(value))),
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Input {
    pub model: InputRef,
    /// The entry in the merge body.
    pub span: Span,
}

#[derive(Debug, Clone)]
pub struct LayerRule {
    pub patterns: Vec<Pattern>,
    /// 1-based line of the `layers` keyword in its file.
    pub line: usize,
    /// The whole rule, and its pattern.
    pub span: Span,
    pub pattern_span: Span,
    pub settings: Settings,
}

#[derive(Debug, Clone)]
pub struct Merge {
    pub name: String,
    pub method: Method,
    /// The merge's name in its declaration.
    pub span: Span,
    pub base: Option<InputRef>,
    pub inputs: Vec<Input>,
    /// Merge-level settings (parameter list and body statements).
    pub settings: Settings,
    pub rules: Vec<LayerRule>,
    /// Settings given as `auto` candidates, in declaration order. The
    /// settings above hold each site's first candidate.
    pub autos: Vec<AutoSite>,
    /// How the candidates are judged.
    pub select: Option<Select>,
    /// Layer stacking (`slice` statements): the output's layers, slice by
    /// slice. Empty: every layer of the inputs, as usual.
    pub slices: Vec<Slice>,
}

/// One `slice`: output layers made from the same number of layers of each
/// source, merged with the merge's method.
#[derive(Debug, Clone, PartialEq)]
pub struct Slice {
    pub sources: Vec<SliceSource>,
    pub span: Span,
}

/// `a layers [0, 4]`: layers `start..end` of the merge's base or an input.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceSource {
    /// `None`: the merge's base; else an input index.
    pub input: Option<usize>,
    pub start: usize,
    pub end: usize,
    pub span: Span,
}

impl Slice {
    pub fn len(&self) -> usize {
        self.sources.first().map_or(0, |s| s.end - s.start)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One `auto`: where it is (the merge level or a rule; an input or the
/// default for all inputs), and its candidate values.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoSite {
    pub rule: Option<usize>,
    pub input: Option<usize>,
    pub field: ParamName,
    pub values: Vec<f64>,
    /// For people: `lambda`, `add retain`, `line 12: add retain`.
    pub label: String,
    pub span: Span,
}

/// `select by loss(data, ...)` or `select by accuracy(data, ...)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Select {
    pub judge: Judge,
    pub data: Vec<DataId>,
    /// `search coordinate budget N`: coordinate descent over the `auto`
    /// sites instead of every candidate.
    pub search: Option<Search>,
    pub span: Span,
}

/// A coordinate search over a merge's `auto` sites: one site at a time,
/// each over its values, the others held, repeated while the judge
/// improves, at most `budget` candidates scored (cached ones included).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Search {
    pub budget: usize,
    pub span: Span,
}

/// How a merge's `auto` candidates are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Judge {
    /// The lowest mean next-token loss (of the answers, for prompt/answer data).
    Loss,
    /// The highest greedy exact match on prompt/answer data, ties by loss.
    Accuracy,
}

impl Judge {
    pub fn name(self) -> &'static str {
        match self {
            Judge::Loss => "loss",
            Judge::Accuracy => "accuracy",
        }
    }
}

/// The most candidates one merge may have (the cross product of its `auto`s).
pub const MAX_CANDIDATES: usize = 64;

/// One candidate of a merge with `auto` settings: an index into each site's values.
pub type Choice = Vec<usize>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    Bf16,
    F16,
    F32,
}

impl Dtype {
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
            Dtype::F32 => "f32",
        }
    }

    /// `bf16`, `f16`, `f32`, or the `config.json` names (`bfloat16`, ...).
    pub fn from_word(word: &str) -> Option<Dtype> {
        [Dtype::Bf16, Dtype::F16, Dtype::F32]
            .into_iter()
            .find(|d| d.name() == word || d.config_name() == word)
    }

    /// The name `config.json` uses (`torch_dtype`, `dtype`).
    pub fn config_name(self) -> &'static str {
        match self {
            Dtype::Bf16 => "bfloat16",
            Dtype::F16 => "float16",
            Dtype::F32 => "float32",
        }
    }

    /// The output dtype that keeps a checkpoint's own (its safetensors
    /// dtype): f16 and f32 stay, anything else becomes bf16.
    pub fn of_checkpoint(dtype: Option<crate::checkpoint::TensorDtype>) -> Dtype {
        use crate::checkpoint::TensorDtype;
        match dtype {
            Some(TensorDtype::F16) => Dtype::F16,
            Some(TensorDtype::F32) => Dtype::F32,
            _ => Dtype::Bf16,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Output {
    pub merge: MergeId,
    /// Resolved against the recipe's directory.
    pub path: PathBuf,
    /// As written.
    pub written: String,
    /// `None`: the base's dtype.
    pub dtype: Option<Dtype>,
    /// Largest shard in bytes.
    pub shard_size: u64,
    /// Where the tokenizer files come from (`None`: the base).
    pub tokenizer: Option<InputRef>,
    /// `tokenizer union | base | MODEL` (with `token` lines and
    /// `pad_to_multiple_of`): the merge's tokens are put in this vocabulary,
    /// rows aligned by token (`None`: the base's tensors as they are).
    pub vocabulary: Option<crate::vocab::VocabSpec>,
    /// `chat_template NAME | auto | "TEXT"`: written into the tokenizer files.
    pub chat_template: Option<crate::vocab::ChatTemplate>,
    pub span: Span,
}

/// The settings that govern one tensor of a merge, after every rule.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSettings {
    pub take: Option<TakeFrom>,
    /// Input indices in the order they pick (OBIM); empty for other methods.
    pub order: Vec<usize>,
    pub saliency: Saliency,
    /// Per input, in declaration order.
    pub inputs: Vec<InputSettings>,
    pub params: MergeParams,
    /// Lines of the rules that matched, in the order applied.
    pub rule_lines: Vec<usize>,
}

impl Merge {
    /// Every combination of the `auto` sites' candidates (their cross
    /// product), the first site varying slowest: declaration order.
    pub fn candidates(&self) -> Vec<Choice> {
        let mut all: Vec<Choice> = vec![Vec::new()];
        for site in &self.autos {
            all = all
                .into_iter()
                .flat_map(|prefix| {
                    (0..site.values.len()).map(move |i| {
                        let mut c = prefix.clone();
                        c.push(i);
                        c
                    })
                })
                .collect();
        }
        all
    }

    /// The number of candidates, without listing them.
    pub fn candidate_count(&self) -> usize {
        self.autos
            .iter()
            .fold(1usize, |n, a| n.saturating_mul(a.values.len()))
    }

    /// Whether the merge's candidates are searched rather than all scored.
    pub fn searched(&self) -> Option<Search> {
        self.select.as_ref().and_then(|s| s.search)
    }

    /// `lambda=0.5, add retain=0.2`.
    pub fn describe(&self, choice: &[usize]) -> String {
        self.autos
            .iter()
            .zip(choice)
            .map(|(a, &i)| format!("{}={}", a.label, a.values[i]))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The candidate [`Merge::describe`] calls `label`, found site by site
    /// (a search's merge may have too many candidates to list).
    pub fn choice_of(&self, label: &str) -> Option<Choice> {
        let parts: Vec<&str> = label.split(", ").collect();
        if parts.len() != self.autos.len() {
            return None;
        }
        self.autos
            .iter()
            .zip(parts)
            .map(|(site, part)| {
                (0..site.values.len())
                    .find(|&i| format!("{}={}", site.label, site.values[i]) == part)
            })
            .collect()
    }

    /// This merge with one candidate's values in place and no `auto` left.
    pub fn with_candidate(&self, choice: &[usize]) -> Merge {
        let mut merge = self.clone();
        for (site, &i) in self.autos.iter().zip(choice) {
            let value = site.values[i];
            let level = match site.rule {
                None => &mut merge.settings,
                Some(r) => &mut merge.rules[r].settings,
            };
            let input = match site.input {
                None => &mut level.defaults,
                Some(k) => level.inputs.entry(k).or_default(),
            };
            match input.number_mut(site.field) {
                Some(field) => *field = Some(value),
                None => level
                    .params
                    .set(site.field, Some(ParamValue::Number(value))),
            }
        }
        merge.autos.clear();
        merge.select = None;
        merge
    }

    /// Input `index`'s settings for tensors no rule matches: the merge's
    /// defaults for every input, then the input's own.
    pub fn input_settings(&self, index: usize) -> InputSettings {
        let mut s = self.settings.defaults.clone();
        if let Some(own) = self.settings.inputs.get(&index) {
            s.overlay(own);
        }
        s
    }

    /// The settings of tensor `name`: the merge's own, then every matching
    /// `layers` rule in order (later rules win), gradients evaluated at `t`
    /// (see [`gradient_position`]). Within one level an input's own setting
    /// beats the level's default for all inputs.
    pub fn tensor_settings(&self, name: &str, t: f64) -> TensorSettings {
        fn graded(s: &Settings, t: f64) -> std::borrow::Cow<'_, Settings> {
            if s.gradients.is_empty() {
                std::borrow::Cow::Borrowed(s)
            } else {
                let mut s = s.clone();
                s.apply_gradients(t);
                std::borrow::Cow::Owned(s)
            }
        }
        let own = graded(&self.settings, t);
        let mut order = own.order.clone().unwrap_or(OrderSpec::Rotate);
        let mut saliency = own.saliency.unwrap_or(Saliency::Obd);
        let mut take = own.take;
        let mut params = own.params.clone();
        let mut inputs: Vec<InputSettings> = (0..self.inputs.len())
            .map(|i| {
                let mut s = own.defaults.clone();
                if let Some(mine) = own.inputs.get(&i) {
                    s.overlay(mine);
                }
                s
            })
            .collect();
        let mut rule_lines = Vec::new();
        for rule in self
            .rules
            .iter()
            .filter(|r| r.patterns.iter().any(|p| p.matches(name)))
        {
            let s = graded(&rule.settings, t);
            let s = &*s;
            order = s.order.clone().unwrap_or(order);
            saliency = s.saliency.unwrap_or(saliency);
            take = s.take.or(take);
            params.overlay(&s.params);
            for (i, input) in inputs.iter_mut().enumerate() {
                input.overlay(&s.defaults);
                if let Some(own) = s.inputs.get(&i) {
                    input.overlay(own);
                }
            }
            rule_lines.push(rule.line);
        }
        let order = if self.method == Method::Obim {
            resolve_order(&order, self.inputs.len(), layer_index(name))
        } else {
            Vec::new()
        };
        TensorSettings {
            take,
            order,
            saliency,
            inputs,
            params,
            rule_lines,
        }
    }

    /// The input whose tensor names, shapes, config and tokenizer the
    /// merge's output has: its base, else its first input.
    pub fn shape_input(&self) -> Option<InputRef> {
        self.base.or_else(|| self.inputs.first().map(|i| i.model))
    }

    /// Every input and the base.
    pub fn dependencies(&self) -> impl Iterator<Item = InputRef> + '_ {
        self.base
            .into_iter()
            .chain(self.inputs.iter().map(|i| i.model))
    }
}

/// DESIGN §3: `rotate` turns the declared order by the layer index;
/// `X first` puts X first and rotates the rest.
pub fn resolve_order(spec: &OrderSpec, n: usize, layer: Option<usize>) -> Vec<usize> {
    let rotate = |items: Vec<usize>| -> Vec<usize> {
        if items.is_empty() {
            return items;
        }
        let k = layer.unwrap_or(0) % items.len();
        items[k..].iter().chain(&items[..k]).copied().collect()
    };
    match spec {
        OrderSpec::Rotate => rotate((0..n).collect()),
        OrderSpec::Fixed(order) => order.clone(),
        OrderSpec::First(first) => {
            let rest = rotate((0..n).filter(|i| i != first).collect());
            std::iter::once(*first).chain(rest).collect()
        }
    }
}

impl Recipe {
    pub fn input_name(&self, input: InputRef) -> &str {
        match input {
            InputRef::Model(m) => &self.models[m.0].name,
            InputRef::Merge(m) => &self.merges[m.0].name,
        }
    }

    /// The model whose tensor names and shapes an input has: a model itself,
    /// or for a merge, its base (or first input when it has no base).
    pub fn shape_source(&self, input: InputRef) -> Option<ModelId> {
        let mut current = input;
        for _ in 0..=self.merges.len() {
            match current {
                InputRef::Model(m) => return Some(m),
                InputRef::Merge(m) => {
                    current = self.merges[m.0].shape_input()?;
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotate_follows_the_layer_index() {
        assert_eq!(resolve_order(&OrderSpec::Rotate, 3, Some(0)), vec![0, 1, 2]);
        assert_eq!(resolve_order(&OrderSpec::Rotate, 3, Some(1)), vec![1, 2, 0]);
        assert_eq!(resolve_order(&OrderSpec::Rotate, 3, Some(5)), vec![2, 0, 1]);
        assert_eq!(resolve_order(&OrderSpec::Rotate, 3, None), vec![0, 1, 2]);
        assert_eq!(
            resolve_order(&OrderSpec::First(1), 3, Some(1)),
            vec![1, 2, 0]
        );
        assert_eq!(
            resolve_order(&OrderSpec::First(1), 3, Some(2)),
            vec![1, 0, 2]
        );
        assert_eq!(
            resolve_order(&OrderSpec::Fixed(vec![2, 0, 1]), 3, Some(1)),
            vec![2, 0, 1]
        );
    }
}
