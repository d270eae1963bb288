//! The decoder blocks shared by Llama, Mistral and Qwen2, on candle: RMSNorm,
//! rotary embedding, grouped-query attention and the SwiGLU MLP, all in f32,
//! as transformers' eager implementation computes them.
//!
//! Sequences are packed: the hidden states of many sequences are one
//! `[tokens, hidden]` matrix, so every projection is one matrix product, and
//! only attention looks at sequence boundaries ([`Sequence`]). An
//! [`Observer`] sees the input of every linear module; a [`KvCache`] per
//! sequence and layer lets decoding feed one token at a time.

use super::ModelConfig;
use crate::checkpoint::ModelInfo;
use crate::tensors::{Shards, TensorError};
use candle_core::{Device, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(transparent)]
    Tensor(#[from] TensorError),
    #[error("`{dir}`: tensor `{tensor}` is missing")]
    Missing { dir: String, tensor: String },
    #[error("`{dir}`: tensor `{tensor}` has shape {found:?}, the config implies {expected:?}")]
    Shape {
        dir: String,
        tensor: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("forward pass failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// The weights' source failed (a merge computed on the fly).
    #[error("computing the weights")]
    Source(#[source] Box<dyn std::error::Error + Send + Sync>),
}

pub type Result<T> = std::result::Result<T, ForwardError>;

/// Where a forward pass gets its weights, one tensor at a time: a
/// checkpoint ([`Weights`]), or a merge computed on the fly.
pub trait Source {
    /// The tensor `name`, which must have `shape`.
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor>;
    fn has(&self, name: &str) -> bool;
    /// Rows `ids` of a `[rows, cols]` tensor (an embedding lookup).
    fn rows(&mut self, name: &str, shape: [usize; 2], ids: &[u32]) -> Result<Tensor> {
        let table = self.get(name, &shape)?;
        embed(&table, ids)
    }
}

/// Reads a model's tensors one at a time, as f32 candle tensors.
pub struct Weights<'a> {
    pub model: &'a ModelInfo,
    pub device: Device,
    shards: Shards,
}

impl<'a> Weights<'a> {
    pub fn new(model: &'a ModelInfo, device: Device) -> Self {
        Weights {
            model,
            device,
            shards: Shards::default(),
        }
    }
}

impl Source for Weights<'_> {
    fn has(&self, name: &str) -> bool {
        self.model.tensors.contains_key(name)
    }

    /// The tensor `name`, checked against the shape the config implies.
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let info = self.info(name, shape)?;
        let values = self.shards.load_f32(name, info)?;
        self.shards.release(info);
        Ok(Tensor::from_vec(values, shape, &self.device)?)
    }

    /// Rows `ids` of a `[rows, cols]` tensor, read without converting the
    /// whole table.
    fn rows(&mut self, name: &str, shape: [usize; 2], ids: &[u32]) -> Result<Tensor> {
        let [rows, cols] = shape;
        let info = self.info(name, &shape)?;
        let size = info.dtype.size();
        let (map, range) = self.shards.bytes(name, info)?;
        let table = &map[range];
        let mut values = Vec::with_capacity(ids.len() * cols);
        let mut row = Vec::new();
        for &id in ids {
            let id = id as usize;
            let ok = id < rows
                && crate::tensors::to_f32_into(
                    &table[id * cols * size..(id + 1) * cols * size],
                    info.dtype,
                    &mut row,
                )
                .is_some();
            if !ok {
                return Err(ForwardError::Tensor(TensorError::Tensor {
                    path: info.file.clone(),
                    tensor: name.to_string(),
                    reason: format!("cannot read row {id} (dtype {})", info.dtype),
                }));
            }
            values.extend_from_slice(&row);
        }
        drop(map);
        self.shards.release(info);
        Ok(Tensor::from_vec(values, (ids.len(), cols), &self.device)?)
    }
}

impl<'a> Weights<'a> {
    fn info(&self, name: &str, shape: &[usize]) -> Result<&'a crate::checkpoint::TensorInfo> {
        let model: &'a ModelInfo = self.model;
        let info = model
            .tensors
            .get(name)
            .ok_or_else(|| ForwardError::Missing {
                dir: self.model.dir.display().to_string(),
                tensor: name.to_string(),
            })?;
        if info.shape != shape {
            return Err(ForwardError::Shape {
                dir: self.model.dir.display().to_string(),
                tensor: name.to_string(),
                found: info.shape.clone(),
                expected: shape.to_vec(),
            });
        }
        Ok(info)
    }
}

/// A linear module's weight and, where the checkpoint has one, its bias.
fn linear(w: &mut dyn Source, name: &str, out: usize, inp: usize) -> Result<Linear> {
    let weight = w.get(&format!("{name}.weight"), &[out, inp])?;
    let bias_name = format!("{name}.bias");
    let bias = if w.has(&bias_name) {
        Some(w.get(&bias_name, &[out])?)
    } else {
        None
    };
    Ok(Linear { weight, bias })
}

/// Sees the input of linear modules during a forward pass.
pub trait Observer {
    /// `x` (`[tokens, in_features]`) is the input of every module in `modules`.
    fn observe(&mut self, modules: &[String], x: &Tensor) -> Result<()>;
}

/// An observer that looks at nothing.
pub struct Blind;

impl Observer for Blind {
    fn observe(&mut self, _: &[String], _: &Tensor) -> Result<()> {
        Ok(())
    }
}

/// One sequence of a packed batch: rows `start..start + len` of the hidden
/// states, at positions `pos..pos + len` (pos > 0 when a cache holds the rest).
#[derive(Debug, Clone, Copy)]
pub struct Sequence {
    pub start: usize,
    pub len: usize,
    pub pos: usize,
}

impl Sequence {
    /// Packs whole sequences of the given lengths, each from position 0.
    pub fn pack(lens: impl IntoIterator<Item = usize>) -> Vec<Sequence> {
        let mut start = 0;
        lens.into_iter()
            .map(|len| {
                let s = Sequence { start, len, pos: 0 };
                start += len;
                s
            })
            .collect()
    }
}

/// Keys and values of the positions a sequence has already seen, one layer.
#[derive(Default)]
pub struct KvCache {
    kv: Option<(Tensor, Tensor)>,
}

pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Linear {
        Linear { weight, bias }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.weight.t()?)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// RMSNorm in f32: x / sqrt(mean(x²) + eps) · weight.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(candle_nn::ops::rms_norm(
        &x.contiguous()?,
        weight,
        eps as f32,
    )?)
}

/// cos and sin (`[tokens, head_dim / 2]`) of every packed token's position.
pub fn rotary(cfg: &ModelConfig, seqs: &[Sequence], device: &Device) -> Result<(Tensor, Tensor)> {
    let inv_freq = cfg.inv_freq();
    let tokens: usize = seqs.iter().map(|s| s.len).sum();
    let mut cos = Vec::with_capacity(tokens * inv_freq.len());
    let mut sin = Vec::with_capacity(tokens * inv_freq.len());
    for s in seqs {
        for p in s.pos..s.pos + s.len {
            for f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
    }
    let shape = (tokens, inv_freq.len());
    Ok((
        Tensor::from_vec(cos, shape, device)?,
        Tensor::from_vec(sin, shape, device)?,
    ))
}

/// One decoder layer's weights.
pub struct Layer {
    prefix: String,
    input_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    post_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
    /// Module names as observers see them: [q, k, v], [o], [gate, up], [down].
    taps: [Vec<String>; 4],
}

impl Layer {
    pub fn load(cfg: &ModelConfig, index: usize, w: &mut dyn Source) -> Result<Layer> {
        let p = format!("model.layers.{index}");
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (q_out, kv_out) = (
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
        );
        let names = |ms: &[&str]| ms.iter().map(|m| format!("{p}.{m}")).collect::<Vec<_>>();
        Ok(Layer {
            input_norm: w.get(&format!("{p}.input_layernorm.weight"), &[h])?,
            q: linear(w, &format!("{p}.self_attn.q_proj"), q_out, h)?,
            k: linear(w, &format!("{p}.self_attn.k_proj"), kv_out, h)?,
            v: linear(w, &format!("{p}.self_attn.v_proj"), kv_out, h)?,
            o: linear(w, &format!("{p}.self_attn.o_proj"), h, q_out)?,
            post_norm: w.get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
            gate: linear(w, &format!("{p}.mlp.gate_proj"), i, h)?,
            up: linear(w, &format!("{p}.mlp.up_proj"), i, h)?,
            down: linear(w, &format!("{p}.mlp.down_proj"), h, i)?,
            taps: [
                names(&["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                names(&["self_attn.o_proj"]),
                names(&["mlp.gate_proj", "mlp.up_proj"]),
                names(&["mlp.down_proj"]),
            ],
            prefix: p,
        })
    }

    pub fn name(&self) -> &str {
        &self.prefix
    }

    /// Runs the packed hidden states `x` (`[tokens, hidden]`) through the layer.
    /// `caches`, when given, has one entry per sequence and is extended.
    pub fn forward(
        &self,
        cfg: &ModelConfig,
        x: &Tensor,
        seqs: &[Sequence],
        rope: &(Tensor, Tensor),
        caches: Option<&mut [KvCache]>,
        observer: &mut dyn Observer,
    ) -> Result<Tensor> {
        let eps = cfg.rms_norm_eps;
        let normed = rms_norm(x, &self.input_norm, eps)?;
        observer.observe(&self.taps[0], &normed)?;
        let attended = self.attention(cfg, &normed, seqs, rope, caches)?;
        observer.observe(&self.taps[1], &attended)?;
        let h = (x + self.o.forward(&attended)?)?;
        let normed = rms_norm(&h, &self.post_norm, eps)?;
        observer.observe(&self.taps[2], &normed)?;
        let gated =
            (candle_nn::ops::silu(&self.gate.forward(&normed)?)? * self.up.forward(&normed)?)?;
        observer.observe(&self.taps[3], &gated)?;
        Ok((h + self.down.forward(&gated)?)?)
    }

    fn attention(
        &self,
        cfg: &ModelConfig,
        x: &Tensor,
        seqs: &[Sequence],
        (cos, sin): &(Tensor, Tensor),
        mut caches: Option<&mut [KvCache]>,
    ) -> Result<Tensor> {
        let tokens = x.dim(0)?;
        let (heads, kv_heads, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let group = heads / kv_heads;
        // [tokens, n·d] → [1, n, tokens, d], rotated by position.
        let split = |t: Tensor, n: usize| -> Result<Tensor> {
            Ok(t.reshape((tokens, n, d))?
                .transpose(0, 1)?
                .contiguous()?
                .unsqueeze(0)?)
        };
        let q = candle_nn::rotary_emb::rope(&split(self.q.forward(x)?, heads)?, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&split(self.k.forward(x)?, kv_heads)?, cos, sin)?;
        let v = split(self.v.forward(x)?, kv_heads)?;
        let (q, k, v) = (q.squeeze(0)?, k.squeeze(0)?, v.squeeze(0)?);
        let scale = 1.0 / (d as f64).sqrt();
        let mut outputs = Vec::with_capacity(seqs.len());
        for (n, s) in seqs.iter().enumerate() {
            let mut ks = k.narrow(1, s.start, s.len)?;
            let mut vs = v.narrow(1, s.start, s.len)?;
            if let Some(caches) = caches.as_deref_mut() {
                let cache = &mut caches[n];
                if let Some((pk, pv)) = &cache.kv {
                    ks = Tensor::cat(&[pk, &ks], 1)?;
                    vs = Tensor::cat(&[pv, &vs], 1)?;
                }
                cache.kv = Some((ks.clone(), vs.clone()));
            }
            let keys = ks.dim(1)?;
            let past = keys - s.len;
            // Query heads of one key/value head side by side: [kv, group·len, d].
            let qs = q
                .narrow(1, s.start, s.len)?
                .reshape((kv_heads, group * s.len, d))?;
            let mut scores = (qs.matmul(&ks.t()?)? * scale)?;
            if let Some(mask) = mask(s.len, past, group, cfg.sliding_window, x.device())? {
                scores = scores.broadcast_add(&mask)?;
            }
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let out = probs
                .matmul(&vs.contiguous()?)?
                .reshape((heads, s.len, d))?
                .transpose(0, 1)?
                .reshape((s.len, heads * d))?;
            outputs.push(out);
        }
        Ok(Tensor::cat(&outputs, 0)?)
    }
}

/// The additive causal (and sliding-window) mask, `[group·len, past + len]`,
/// or `None` when every query sees every key.
fn mask(
    len: usize,
    past: usize,
    group: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Option<Tensor>> {
    let keys = past + len;
    let visible = |i: usize, j: usize| {
        let qpos = past + i;
        j <= qpos && window.is_none_or(|w| qpos - j < w)
    };
    if (0..len).all(|i| (0..keys).all(|j| visible(i, j))) {
        return Ok(None);
    }
    let mut m = Vec::with_capacity(group * len * keys);
    for _ in 0..group {
        for i in 0..len {
            m.extend((0..keys).map(|j| {
                if visible(i, j) {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            }));
        }
    }
    Ok(Some(Tensor::from_vec(m, (group * len, keys), device)?))
}

/// A whole model in memory, for evaluation and reference logits.
pub struct Transformer {
    pub cfg: ModelConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
}

/// The token embeddings and the model's head, loaded apart from the layers.
pub fn embed_tokens(cfg: &ModelConfig, w: &mut dyn Source) -> Result<Tensor> {
    w.get(
        "model.embed_tokens.weight",
        &[cfg.vocab_size, cfg.hidden_size],
    )
}

/// Looks up the packed token ids' embeddings.
pub fn embed(table: &Tensor, ids: &[u32]) -> Result<Tensor> {
    let ids = Tensor::from_slice(ids, ids.len(), table.device())?;
    Ok(table.embedding(&ids)?)
}

impl Transformer {
    pub fn load(cfg: ModelConfig, w: &mut dyn Source) -> Result<Transformer> {
        let embed = embed_tokens(&cfg, w)?;
        let layers = (0..cfg.num_layers)
            .map(|l| Layer::load(&cfg, l, w))
            .collect::<Result<Vec<_>>>()?;
        let norm = w.get("model.norm.weight", &[cfg.hidden_size])?;
        let lm_head = if cfg.tied_embeddings {
            Linear {
                weight: embed.clone(),
                bias: None,
            }
        } else {
            linear(w, "lm_head", cfg.vocab_size, cfg.hidden_size)?
        };
        Ok(Transformer {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    /// Fresh caches for `n` sequences.
    pub fn caches(&self, n: usize) -> Vec<Vec<KvCache>> {
        (0..self.layers.len())
            .map(|_| (0..n).map(|_| KvCache::default()).collect())
            .collect()
    }

    /// Logits (`[tokens, vocab]`) of packed sequences; with `caches`, the
    /// sequences continue where the caches end (their `pos`).
    pub fn forward(
        &self,
        ids: &[u32],
        seqs: &[Sequence],
        mut caches: Option<&mut [Vec<KvCache>]>,
    ) -> Result<Tensor> {
        let rope = rotary(&self.cfg, seqs, self.embed.device())?;
        let mut x = embed(&self.embed, ids)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let cache = caches.as_deref_mut().map(|c| c[l].as_mut_slice());
            x = layer.forward(&self.cfg, &x, seqs, &rope, cache, &mut Blind)?;
        }
        let x = rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)?;
        self.lm_head.forward(&x)
    }
}

/// The index of the largest value, the first one on ties (as torch's argmax).
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}
