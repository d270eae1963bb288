//! Computes one tensor of a merge from its inputs: model tensors read from
//! mmap'd shards (decoded to f32), merges of merges computed recursively, a
//! tensor used several times read once and kept until its last use. A
//! pointwise merge of models (linear, task arithmetic) goes from the mapped
//! shards to output bytes chunk by chunk, with no whole-tensor f32 buffers.

use super::error::ExecError;
use super::stats::Statistics;
use crate::Compilation;
use crate::checkpoint::TensorInfo;
use crate::merge::{self, Merged, TensorContext};
use crate::plan::{Op, Plan, PlannedTensor};
use crate::recipe::{Dtype, InputRef, MergeId, ModelId, Saliency, TakeFrom};
use crate::stream::{Stream, nothing};
use crate::tensors::{self, Shards, Values};
use crate::vocab::Vocabulary;
use memmap2::Mmap;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Computes tensors into owned buffers (merges update them in place). A
/// model or merge that one tensor's computation needs several times is read
/// or computed once and kept until its last use.
pub(super) struct Evaluator<'a> {
    c: &'a Compilation,
    plan: &'a Plan,
    stats: &'a Statistics,
    shards: Shards,
    /// How often each input is used while computing one tensor of the output.
    uses: HashMap<InputRef, usize>,
    remaining: HashMap<InputRef, usize>,
    memo: HashMap<InputRef, Vec<f32>>,
    /// OBIM: positions each input won, per merge and tensor.
    won: BTreeMap<MergeId, BTreeMap<String, Vec<u64>>>,
    /// RegMean: how each linear layer's system was solved.
    solves: BTreeMap<MergeId, BTreeMap<String, merge::Solve>>,
    /// Buffers of earlier tensors, reused so that large tensors do not
    /// fault fresh pages in every time.
    pool: Vec<Vec<f32>>,
    /// What a selection's candidates share.
    shared: Option<SharedInputs>,
    /// A selection candidate: these tensors replace the plan's for one merge.
    variant: Option<(MergeId, &'a [PlannedTensor])>,
    /// Merge inputs with NaN or ±∞ values instead of stopping.
    allow_non_finite: bool,
}

/// What several evaluators (a selection's candidates, advancing through the
/// layers in lockstep) compute once, until cleared after each layer.
pub(super) type SharedInputs = std::rc::Rc<std::cell::RefCell<Shared>>;

#[derive(Default)]
pub(super) struct Shared {
    /// Model tensors, as f32.
    models: HashMap<(ModelId, String), Vec<f32>>,
    /// Per tensor: merges at factor 1 ([`Op::factored`]), for candidates
    /// that differ only in the factor.
    at_factor_one: HashMap<String, Vec<(Op, Vec<f32>)>>,
}

impl Shared {
    /// Tensor `name` merged by `unit` (an op at factor 1), once computed.
    fn at_one(&self, name: &str, unit: &Op) -> Option<&[f32]> {
        let merged = self.at_factor_one.get(name)?;
        merged
            .iter()
            .find(|(op, _)| op == unit)
            .map(|(_, v)| v.as_slice())
    }

    pub(super) fn clear(&mut self) {
        self.models.clear();
        self.at_factor_one.clear();
    }
}

impl<'a> Evaluator<'a> {
    fn buffer(&mut self) -> Vec<f32> {
        self.pool.pop().unwrap_or_default()
    }

    /// Keeps a finished buffer for reuse (a few, the largest).
    fn recycle(&mut self, buffer: Vec<f32>) {
        self.pool.push(buffer);
        self.pool.sort_by_key(Vec::capacity);
        if self.pool.len() > 8 {
            self.pool.remove(0);
        }
    }

    pub(super) fn new(
        c: &'a Compilation,
        plan: &'a Plan,
        stats: &'a Statistics,
        output: MergeId,
    ) -> Self {
        let mut uses = HashMap::new();
        count_uses(c, output, &mut uses);
        Evaluator {
            c,
            plan,
            stats,
            shards: Shards::default(),
            uses,
            remaining: HashMap::new(),
            memo: HashMap::new(),
            won: BTreeMap::new(),
            solves: BTreeMap::new(),
            pool: Vec::new(),
            shared: None,
            variant: None,
            allow_non_finite: false,
        }
    }

    /// The models (not merges) whose tensors the output reads.
    pub(super) fn models_read(&self) -> std::collections::BTreeSet<ModelId> {
        self.uses
            .keys()
            .filter_map(|i| match i {
                InputRef::Model(m) => Some(*m),
                InputRef::Merge(_) => None,
            })
            .collect()
    }

    /// OBIM: how many positions each input won, per merge and tensor.
    pub(super) fn positions_won(&self) -> &BTreeMap<MergeId, BTreeMap<String, Vec<u64>>> {
        &self.won
    }

    /// RegMean: how each linear layer's system was solved, per merge.
    pub(super) fn solves(&self) -> &BTreeMap<MergeId, BTreeMap<String, merge::Solve>> {
        &self.solves
    }

    /// Drops the buffers kept for reuse (a selection's candidates each have
    /// an evaluator; their pools together would hold many large tensors).
    pub(super) fn release_buffers(&mut self) {
        self.pool.clear();
    }

    /// Lets inputs with NaN or ±∞ values through (`--allow-non-finite`).
    pub(super) fn allowing_non_finite(mut self, allow: bool) -> Self {
        self.allow_non_finite = allow;
        self
    }

    /// Computes merge `id` with a selection candidate's tensors.
    pub(super) fn with_variant(mut self, id: MergeId, tensors: &'a [PlannedTensor]) -> Self {
        self.variant = Some((id, tensors));
        self
    }

    /// Reads model tensors through `shared` (and leaves them there).
    pub(super) fn with_shared(mut self, shared: SharedInputs) -> Self {
        self.shared = Some(shared);
        self
    }

    /// The merged values of tensor `name` of `merge`.
    pub(super) fn output_tensor(
        &mut self,
        merge: MergeId,
        name: &str,
    ) -> Result<Vec<f32>, ExecError> {
        self.memo.clear();
        self.remaining = self.uses.clone();
        self.merge(merge, name)
    }

    fn tensor(&mut self, input: InputRef, name: &str) -> Result<Vec<f32>, ExecError> {
        let left = self.remaining.get(&input).copied().unwrap_or(1);
        self.remaining.insert(input, left.saturating_sub(1));
        if self.memo.contains_key(&input) {
            if left > 1 {
                let mut copy = self.buffer();
                if let Some(v) = self.memo.get(&input) {
                    copy.clone_from(v);
                }
                return Ok(copy);
            }
            return Ok(self.memo.remove(&input).unwrap_or_default());
        }
        let values = match input {
            InputRef::Model(m) => self.load(m, name)?,
            InputRef::Merge(m) => self.merge(m, name)?,
        };
        if left > 1 {
            let mut copy = self.buffer();
            copy.clone_from(&values);
            self.memo.insert(input, copy);
        }
        Ok(values)
    }

    fn load(&mut self, model: ModelId, name: &str) -> Result<Vec<f32>, ExecError> {
        let Some(shared) = self.shared.clone() else {
            return self.read(model, name);
        };
        let key = (model, name.to_string());
        if let Some(values) = shared.borrow().models.get(&key) {
            let mut copy = self.buffer();
            copy.clone_from(values);
            return Ok(copy);
        }
        let values = self.read(model, name)?;
        shared.borrow_mut().models.insert(key, values.clone());
        Ok(values)
    }

    /// One model tensor from its shard, as f32.
    fn read(&mut self, model: ModelId, name: &str) -> Result<Vec<f32>, ExecError> {
        let (map, range, t) = self.mapped(model, name)?;
        let mut values = self.buffer();
        let converted = tensors::to_f32_into(&map[range], t.dtype, &mut values);
        drop(map);
        self.shards.release(t);
        match converted {
            None => Err(self.undecodable(model, name, t)),
            Some(Values::NonFinite) if !self.allow_non_finite => {
                Err(self.non_finite(model, name, t))
            }
            Some(_) => {
                // A LoRA model: its base's tensor, plus the adapter's update.
                if let Some(adapter) = self.c.inventory.adapter(model) {
                    adapter
                        .apply(name, &mut values, &t.shape)
                        .map_err(|reason| {
                            ExecError::Merge(merge::MergeError::Invalid {
                                tensor: name.to_string(),
                                reason: format!(
                                    "the LoRA adapter of `{}`: {reason}",
                                    self.c.recipe.models[model.0].name
                                ),
                            })
                        })?;
                }
                Ok(values)
            }
        }
    }

    fn non_finite(&self, model: ModelId, name: &str, t: &TensorInfo) -> ExecError {
        let declared = &self.c.recipe.models[model.0];
        ExecError::NonFinite {
            model: declared.name.clone(),
            file: t.file.clone(),
            tensor: name.to_string(),
            span: declared.span,
        }
    }

    /// The mapped bytes of one model tensor, and where they come from.
    fn mapped(
        &mut self,
        model: ModelId,
        name: &str,
    ) -> Result<(Arc<Mmap>, std::ops::Range<usize>, &'a TensorInfo), ExecError> {
        let recipe = &self.c.recipe;
        let declared = &recipe.models[model.0];
        let info = self
            .c
            .inventory
            .get(model)
            .ok_or_else(|| ExecError::ModelUnavailable {
                model: declared.name.clone(),
                span: declared.span,
            })?;
        let t = info
            .tensors
            .get(name)
            .ok_or_else(|| ExecError::TensorMissing {
                model: declared.name.clone(),
                file: info.dir.clone(),
                tensor: name.to_string(),
                span: declared.span,
            })?;
        let (map, range) = self.shards.bytes(name, t)?;
        Ok((map, range, t))
    }

    fn undecodable(&self, model: ModelId, name: &str, t: &TensorInfo) -> ExecError {
        let declared = &self.c.recipe.models[model.0];
        ExecError::Unmergeable {
            model: declared.name.clone(),
            file: t.file.clone(),
            tensor: name.to_string(),
            dtype: t.dtype,
            span: declared.span,
        }
    }

    /// Tensor `name` of merge `id`, encoded in `dtype` into the front of
    /// `out`. A merge of checkpoints as they are on disk streams from the
    /// mapped shards chunk by chunk (`stream.rs`): a pointwise one in one
    /// pass, the task-vector family, OBIM and model_stock in a few
    /// (`merge::streamed`).
    /// Any other computes whole f32 tensors first.
    pub(super) fn encoded<'o>(
        &mut self,
        id: MergeId,
        name: &str,
        dtype: Dtype,
        out: &'o mut Vec<u8>,
    ) -> Result<&'o [u8], ExecError> {
        let Some((streaming, models)) = self.streaming(id, name) else {
            let values = self.output_tensor(id, name)?;
            let encoded = tensors::from_f32_into(&values, dtype, out);
            self.recycle(values);
            return Ok(encoded);
        };
        let merge = &self.c.recipe.merges[id.0];
        let planned = self.planned(id, name)?;
        let obd = match &planned.op {
            Op::Obim(p) if p.saliency == Saliency::Obd => {
                self.stats.obd(&self.c.recipe, merge, &p.using, name)?
            }
            _ => vec![None; merge.inputs.len()],
        };
        let mut mapped = Vec::with_capacity(models.len());
        for (m, source) in &models {
            mapped.push(self.mapped(*m, source)?);
        }
        let operands: Vec<(&[u8], crate::checkpoint::TensorDtype)> = mapped
            .iter()
            .map(|(map, range, t)| (&map[range.clone()], t.dtype))
            .collect();
        // The preflight and the open stage checked dtypes and shapes.
        let stream = Stream::new(operands).ok_or_else(|| ExecError::Operands {
            tensor: name.to_string(),
        })?;
        let ctx = TensorContext {
            name,
            shape: &planned.info.shape,
            obd: &obd,
            grams: &[],
        };
        let out = tensors::front(out, stream.len() * tensors::dtype_bytes(dtype));
        let (encoded, non_finite, won) = match streaming {
            Streaming::Pointwise(p) => {
                let which: Vec<usize> = (0..models.len()).collect();
                let (bytes, bad) =
                    stream.write(&which, nothing(&stream), dtype, out, |_, (), chunk| {
                        crate::stream::pointwise(&p, chunk)
                    });
                (bytes, bad, None)
            }
            Streaming::Passes { base } => {
                let written = merge::streamed::merge(&planned.op, &stream, base, &ctx, dtype, out)?;
                (written.bytes, written.non_finite, written.won)
            }
        };
        let values = stream.values();
        drop(stream);
        for (_, _, t) in &mapped {
            self.shards.release(t);
        }
        let bad = values.iter().position(|v| *v == Values::NonFinite);
        if let Some(k) = bad.filter(|_| !self.allow_non_finite) {
            return Err(self.non_finite(models[k].0, &models[k].1, mapped[k].2));
        }
        if non_finite > 0 && !self.allow_non_finite {
            return Err(merged_non_finite(
                name,
                non_finite,
                encoded.len() / tensors::dtype_bytes(dtype),
            ));
        }
        if let Some(won) = won {
            self.won
                .entry(id)
                .or_default()
                .insert(name.to_string(), won);
        }
        Ok(encoded)
    }

    /// How merge `id` at tensor `name` streams, and the models it reads
    /// with the tensor's name in each (in operand order: the base first
    /// where the merge uses it), when every operand is a checkpoint as it
    /// is on disk.
    fn streaming(&self, id: MergeId, name: &str) -> Option<(Streaming, Vec<(ModelId, String)>)> {
        let merge = &self.c.recipe.merges[id.0];
        let planned = self.planned(id, name).ok()?;
        let (streaming, uses_base) = match merge::Pointwise::of(&planned.op) {
            Some(p) => {
                let uses_base = p.uses_base();
                (Streaming::Pointwise(p), uses_base)
            }
            None if merge::streamed::handles(&planned.op) => {
                let base = merge::streamed::reads_base(&planned.op, merge.base.is_some());
                (Streaming::Passes { base }, base)
            }
            None => return None,
        };
        if self.vocabulary(id, name).is_some() {
            // Token rows are aligned first.
            return None;
        }
        let operands: Vec<(InputRef, String)> = match &planned.sources {
            None => {
                let base = if uses_base { Some(merge.base?) } else { None };
                base.into_iter()
                    .chain(merge.inputs.iter().map(|i| i.model))
                    .map(|m| (m, name.to_string()))
                    .collect()
            }
            Some(sources) => {
                let base = match (&sources.base, uses_base) {
                    (Some(b), true) => Some((merge.base?, b.clone())),
                    (None, true) => return None,
                    (_, false) => None,
                };
                base.into_iter()
                    .chain(
                        sources
                            .inputs
                            .iter()
                            .map(|(i, n)| (merge.inputs[*i].model, n.clone())),
                    )
                    .collect()
            }
        };
        // Streams only from checkpoints as they are on disk: a LoRA model's
        // tensors are computed.
        let models = operands
            .into_iter()
            .map(|(input, n)| match input {
                InputRef::Model(m) if self.c.inventory.adapter(m).is_none() => Some((m, n)),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()?;
        Some((streaming, models))
    }

    /// What the plan fixed for tensor `name` of merge `id` (a selection
    /// candidate's tensors where one is set).
    fn planned(&self, id: MergeId, name: &str) -> Result<&'a PlannedTensor, ExecError> {
        let tensors: &'a [PlannedTensor] = match self.variant {
            Some((merge, tensors)) if merge == id => tensors,
            _ => self.plan.tensors.get(&id).map_or(&[], Vec::as_slice),
        };
        tensors.iter().find(|t| t.name == name).ok_or_else(|| {
            ExecError::Merge(merge::MergeError::Invalid {
                tensor: name.to_string(),
                reason: format!(
                    "not in the plan of merge `{}`",
                    self.c.recipe.merges[id.0].name
                ),
            })
        })
    }

    fn merge(&mut self, id: MergeId, name: &str) -> Result<Vec<f32>, ExecError> {
        let planned = self.planned(id, name)?;
        match self.scaled_from_factor_one(id, name, planned)? {
            Some(values) => Ok(values),
            None => self.merge_op(id, name, &planned.op),
        }
    }

    /// A selection candidate's tensor whose merge is base + f·Δ
    /// ([`Op::factored`]: λ, OBIM's `scale`), from the merge at f = 1 that
    /// the candidates share: base + f·(merged₁ − base). Exact at f = 1;
    /// otherwise within an f32 rounding of the base of computing it
    /// directly (merged₁ − base is exact where the two are within a factor
    /// of two). `None` where nothing is shared.
    fn scaled_from_factor_one(
        &mut self,
        id: MergeId,
        name: &str,
        planned: &PlannedTensor,
    ) -> Result<Option<Vec<f32>>, ExecError> {
        let (Some(shared), Some((variant, _))) = (self.shared.clone(), self.variant) else {
            return Ok(None);
        };
        let (Some((factor, unit)), Some(base)) =
            (planned.op.factored(), self.c.recipe.merges[id.0].base)
        else {
            return Ok(None);
        };
        // Sliced or vocabulary-aligned operands take the plain path.
        if variant != id || planned.sources.is_some() || self.vocabulary(id, name).is_some() {
            return Ok(None);
        }
        if shared.borrow().at_one(name, &unit).is_none() {
            let merged = self.merge_op(id, name, &unit)?;
            shared
                .borrow_mut()
                .at_factor_one
                .entry(name.to_string())
                .or_default()
                .push((unit.clone(), merged));
        }
        let f = factor as f32;
        let scaled = |b: &[f32], merged: &[f32]| -> Option<Vec<f32>> {
            use rayon::prelude::*;
            (b.len() == merged.len()).then(|| {
                b.par_iter()
                    .zip(merged)
                    .map(|(b, m)| b + f * (m - b))
                    .collect()
            })
        };
        // A model base is read from what the candidates share, not copied.
        if let InputRef::Model(m) = base {
            let shared = shared.borrow();
            let b = shared.models.get(&(m, name.to_string()));
            if let (Some(b), Some(merged)) = (b, shared.at_one(name, &unit)) {
                return Ok(scaled(b, merged));
            }
        }
        let b = self.tensor(base, name)?;
        let values = shared
            .borrow()
            .at_one(name, &unit)
            .and_then(|merged| scaled(&b, merged));
        self.recycle(b);
        Ok(values)
    }

    /// Tensor `name` of merge `id` by `op` (the plan's, or a selection's
    /// shared merge at factor 1).
    fn merge_op(&mut self, id: MergeId, name: &str, op: &Op) -> Result<Vec<f32>, ExecError> {
        let merge = &self.c.recipe.merges[id.0];
        let planned = self.planned(id, name)?;
        let take = match op {
            Op::Take(from) => Some(*from),
            _ => None,
        };
        // An output vocabulary: every operand's token rows are aligned.
        let vocabulary = self.vocabulary(id, name);
        // A `take` needs only the tensor it takes (and, aligning token
        // rows, the others, whose rows fill tokens that one lacks).
        let wanted =
            |i: usize| vocabulary.is_some() || take.is_none_or(|t| t == TakeFrom::Input(i));
        // Each operand's model and the tensor's name there (a stacked
        // merge reads another layer, and only the slice's sources).
        type Operand = (InputRef, String);
        let (base_source, input_sources): (Option<Operand>, Vec<Operand>) = match &planned.sources {
            None => (
                merge.base.map(|b| (b, name.to_string())),
                merge
                    .inputs
                    .iter()
                    .map(|i| (i.model, name.to_string()))
                    .collect(),
            ),
            Some(s) => (
                merge.base.zip(s.base.clone()),
                s.inputs
                    .iter()
                    .map(|(i, n)| (merge.inputs[*i].model, n.clone()))
                    .collect(),
            ),
        };
        let operand_models: Vec<InputRef> = base_source
            .iter()
            .chain(&input_sources)
            .map(|(m, _)| *m)
            .collect();
        let base = match base_source {
            Some((b, source))
                if vocabulary.is_some() || take.is_none_or(|t| t == TakeFrom::Base) =>
            {
                Some(self.tensor(b, &source)?)
            }
            _ => None,
        };
        let mut inputs = Vec::with_capacity(input_sources.len());
        for (i, (model, source)) in input_sources.iter().enumerate() {
            inputs.push(if wanted(i) {
                self.tensor(*model, source)?
            } else {
                Vec::new()
            });
        }
        let (base, inputs) = match vocabulary {
            Some(v) => self.aligned(
                &v,
                id,
                name,
                &planned.info.shape,
                &operand_models,
                (base, inputs),
            )?,
            None => (base, inputs),
        };
        let obd = match op {
            Op::Obim(p) if p.saliency == Saliency::Obd => {
                self.stats.obd(&self.c.recipe, merge, &p.using, name)?
            }
            _ => vec![None; merge.inputs.len()],
        };
        let grams = match op {
            Op::Regmean(p) => self.stats.grams(&self.c.recipe, merge, &p.using, name)?,
            _ => Vec::new(),
        };
        let ctx = TensorContext {
            name,
            shape: &planned.info.shape,
            obd: &obd,
            grams: &grams,
        };
        let Merged {
            values,
            won,
            solve,
            spare,
        } = merge::merge_tensor(op, base, inputs, &ctx)?;
        // Finite inputs (checked as they were read) can still merge into
        // NaN or ∞: multislerp's weights summing to 0, RAM+ with ε = 0.
        if !self.allow_non_finite && !matches!(op, Op::Take(_)) {
            use rayon::prelude::*;
            let bad = values.par_iter().filter(|v| !v.is_finite()).count();
            if bad > 0 {
                return Err(merged_non_finite(name, bad as u64, values.len()));
            }
        }
        for buffer in spare {
            self.recycle(buffer);
        }
        if let Some(won) = won {
            self.won
                .entry(id)
                .or_default()
                .insert(name.to_string(), won);
        }
        if let Some(solve) = solve {
            self.solves
                .entry(id)
                .or_default()
                .insert(name.to_string(), solve);
        }
        Ok(values)
    }
}

/// How a merge of checkpoints on disk streams.
enum Streaming {
    /// In one pass.
    Pointwise(merge::Pointwise),
    /// In a few (`merge::streamed`); the first operand is the base when
    /// `base`.
    Passes { base: bool },
}

/// Finite inputs (checked as they were read) can still merge into NaN or
/// ∞: multislerp's weights summing to 0, RAM+ with ε = 0.
fn merged_non_finite(tensor: &str, bad: u64, of: usize) -> ExecError {
    ExecError::Merge(merge::MergeError::Invalid {
        tensor: tensor.to_string(),
        reason: format!(
            "{bad} of {of} merged values are not finite, from finite inputs (check the method's parameters; --allow-non-finite writes them anyway)"
        ),
    })
}

/// One tensor of a merge's base (where it has one) and inputs, in order.
type Operands = (Option<Vec<f32>>, Vec<Vec<f32>>);

impl Evaluator<'_> {
    /// The output vocabulary tensor `name` of merge `id` gets, where it has one.
    fn vocabulary(&self, id: MergeId, name: &str) -> Option<Arc<Vocabulary>> {
        self.c
            .inventory
            .vocabularies
            .get(&id)
            .filter(|_| crate::vocab::is_vocabulary_tensor(name))
            .cloned()
    }

    /// The base's and inputs' token rows put at the output vocabulary's ids.
    fn aligned(
        &self,
        vocabulary: &Vocabulary,
        id: MergeId,
        name: &str,
        shape: &[usize],
        models: &[InputRef],
        (base, inputs): Operands,
    ) -> Result<Operands, ExecError> {
        let recipe = &self.c.recipe;
        let merge = &recipe.merges[id.0];
        let cols: usize = shape.iter().skip(1).product();
        let has_base = base.is_some();
        let mut operands: Vec<(ModelId, Vec<f32>)> = models
            .iter()
            .map(|m| recipe.shape_source(*m).unwrap_or(ModelId(0)))
            .zip(base.into_iter().chain(inputs))
            .collect();
        vocabulary.align(&mut operands, cols).map_err(|reason| {
            ExecError::Merge(merge::MergeError::Invalid {
                tensor: name.to_string(),
                reason: format!("aligning the token rows of `{}`: {reason}", merge.name),
            })
        })?;
        let mut values = operands.into_iter().map(|(_, v)| v);
        let base = if has_base { values.next() } else { None };
        Ok((base, values.collect()))
    }
}

/// How often each input is requested while one tensor of `merge` is computed
/// (a merge's own inputs are counted once, when it is first computed).
fn count_uses(c: &Compilation, merge: MergeId, uses: &mut HashMap<InputRef, usize>) {
    for dep in c.recipe.merges[merge.0].dependencies() {
        let count = uses.entry(dep).or_default();
        *count += 1;
        if let (1, InputRef::Merge(m)) = (*count, dep) {
            count_uses(c, m, uses);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Linear (with no base) and task arithmetic over models stream from the
    /// shards in one pass, TIES in several; a `take` and a merge of a merge
    /// do not stream.
    #[test]
    fn which_merges_stream() {
        let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/demo");
        let dir = std::env::temp_dir().join(format!("obim-streams-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let recipe = dir.join("r.obim");
        let model = |name: &str, m: &str| format!("{name} = \"{}\"\n", demo.join(m).display());
        let text = [
            model("base llama", "base"),
            model("model add", "expert_add"),
            model("model sort", "expert_sort"),
            "merge lin = linear { add weight 1  sort weight 1 }\n".into(),
            "merge ta = task_arithmetic(base: llama) { add weight 1  sort weight 1 layers \"*norm*\" { take base } }\n".into(),
            "merge ti = ties(base: llama, density: 0.5) { add weight 1  sort weight 1 }\n".into(),
            "merge nested = task_arithmetic(base: llama) { lin weight 1 }\n".into(),
            "output lin -> \"a\"\noutput ta -> \"b\"\noutput ti -> \"c\"\noutput nested -> \"d\"\n".into(),
        ]
        .concat();
        std::fs::write(&recipe, text).unwrap();
        let c = crate::compile_file(&recipe).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let plan = c.plan().expect("the recipe checks");
        let stats = Statistics::default();
        let merge =
            |name: &str| MergeId(c.recipe.merges.iter().position(|m| m.name == name).unwrap());
        let streams = |name: &str, tensor: &str| {
            let eval = Evaluator::new(&c, &plan, &stats, merge(name));
            eval.streaming(merge(name), tensor)
                .map(|(s, _)| matches!(s, Streaming::Pointwise(_)))
        };
        let weight = "model.layers.0.mlp.up_proj.weight";
        let norm = "model.layers.0.input_layernorm.weight";
        assert_eq!(streams("lin", weight), Some(true));
        assert_eq!(streams("ta", weight), Some(true));
        assert_eq!(streams("ta", norm), None, "a `take` is no merge");
        assert_eq!(streams("ti", weight), Some(false));
        assert_eq!(streams("nested", weight), None);
    }
}
