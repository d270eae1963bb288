//! Layer-by-layer passes over many sequences (DESIGN §4): the hidden states
//! of every sequence stay in memory, packed in groups of about 8k tokens;
//! one decoder layer's weights are read from a [`Source`], every group goes
//! through it, and the layer is dropped. Peak memory is one layer plus the
//! activations. Calibration observes the linear inputs on the way; selection
//! scores the next-token loss at the end.

use super::ModelConfig;
use super::blocks::{self, Layer, Linear, Observer, Result, Sequence, Source};
use candle_core::{D, Tensor};

/// Sequences are run through a layer in groups of about this many tokens,
/// which bounds the MLP's intermediate activations.
const GROUP_TOKENS: usize = 8192;

/// Logits are computed for at most this many values (rows × vocabulary) at once.
const LOGIT_VALUES: usize = 1 << 24;

/// Packed sequences and their hidden states.
pub struct Group {
    pub seqs: Vec<Sequence>,
    pub ids: Vec<u32>,
    /// `[tokens, hidden]`; after [`pass`], the final norm's output.
    pub hidden: Tensor,
    rope: (Tensor, Tensor),
}

/// Packs `sequences` into groups and looks up their embeddings.
pub fn embed(
    cfg: &ModelConfig,
    source: &mut dyn Source,
    sequences: &[Vec<u32>],
) -> Result<Vec<Group>> {
    let mut groups = Vec::new();
    for (seqs, ids) in packed(sequences, GROUP_TOKENS) {
        // Embedding rows are read one by one, not the whole table.
        let hidden = source.rows(
            "model.embed_tokens.weight",
            [cfg.vocab_size, cfg.hidden_size],
            &ids,
        )?;
        let rope = blocks::rotary(cfg, &seqs, hidden.device())?;
        groups.push(Group {
            seqs,
            ids,
            hidden,
            rope,
        });
    }
    Ok(groups)
}

/// Consecutive sequences packed into batches of at most `budget` tokens
/// (a longer sequence goes alone): each batch's layout and token ids.
pub fn packed(sequences: &[Vec<u32>], budget: usize) -> Vec<(Vec<Sequence>, Vec<u32>)> {
    let mut batches = Vec::new();
    let mut start = 0;
    while start < sequences.len() {
        let mut end = start + 1;
        let mut count = sequences[start].len();
        while end < sequences.len() && count + sequences[end].len() <= budget {
            count += sequences[end].len();
            end += 1;
        }
        let group = &sequences[start..end];
        let seqs = Sequence::pack(group.iter().map(Vec::len));
        batches.push((seqs, group.iter().flatten().copied().collect()));
        start = end;
    }
    batches
}

/// Loads decoder layer `l` and runs every group through it.
pub fn layer(
    cfg: &ModelConfig,
    l: usize,
    source: &mut dyn Source,
    groups: &mut [Group],
    observer: &mut dyn Observer,
) -> Result<()> {
    let layer = Layer::load(cfg, l, source)?;
    for g in groups {
        g.hidden = layer.forward(cfg, &g.hidden, &g.seqs, &g.rope, None, observer)?;
    }
    Ok(())
}

/// The final norm; `observer` sees its output as `lm_head`'s input.
pub fn finish(
    cfg: &ModelConfig,
    source: &mut dyn Source,
    groups: &mut [Group],
    observer: &mut dyn Observer,
) -> Result<()> {
    let norm = source.get("model.norm.weight", &[cfg.hidden_size])?;
    let head = ["lm_head".to_string()];
    for g in groups {
        g.hidden = blocks::rms_norm(&g.hidden, &norm, cfg.rms_norm_eps)?;
        observer.observe(&head, &g.hidden)?;
    }
    Ok(())
}

/// Runs `sequences` through every decoder layer and the final norm.
/// `observer` sees every linear input, `lm_head`'s included.
pub fn pass(
    cfg: &ModelConfig,
    source: &mut dyn Source,
    sequences: &[Vec<u32>],
    observer: &mut dyn Observer,
) -> Result<Vec<Group>> {
    let mut groups = embed(cfg, source, sequences)?;
    for l in 0..cfg.num_layers {
        layer(cfg, l, source, &mut groups, observer)?;
    }
    finish(cfg, source, &mut groups, observer)?;
    Ok(groups)
}

/// Each sequence's mean next-token negative log-likelihood (nats) of its
/// tokens from `from[i]` on (1: all but the first) under each source, the sources advancing in lockstep, one stage (embedding,
/// a layer, the head) at a time; `between` runs after each stage, so
/// that what the sources share for one stage can be dropped. Sequences
/// must have 2 tokens or more.
pub fn nll_many(
    cfg: &ModelConfig,
    sources: &mut [&mut dyn Source],
    sequences: &[Vec<u32>],
    from: &[usize],
    between: &mut dyn FnMut(),
) -> Result<Vec<Vec<f64>>> {
    let mut groups = Vec::with_capacity(sources.len());
    for source in sources.iter_mut() {
        groups.push(embed(cfg, *source, sequences)?);
    }
    between();
    for l in 0..cfg.num_layers {
        for (source, g) in sources.iter_mut().zip(&mut groups) {
            layer(cfg, l, *source, g, &mut blocks::Blind)?;
        }
        between();
    }
    let mut out = Vec::with_capacity(sources.len());
    for (source, g) in sources.iter_mut().zip(&mut groups) {
        finish(cfg, *source, g, &mut blocks::Blind)?;
        let per_group = head_nll(cfg, *source, g)?;
        let mut losses = Vec::with_capacity(sequences.len());
        let mut at = 0;
        for (group, picked) in g.iter().zip(per_group) {
            let firsts = &from[at..at + group.seqs.len()];
            losses.extend(mean_per_sequence(&group.seqs, &picked, firsts));
            at += group.seqs.len();
        }
        out.push(losses);
    }
    between();
    Ok(out)
}

/// log p of each row's next token, per group, for groups whose hidden
/// states are the final norm's output.
fn head_nll(cfg: &ModelConfig, source: &mut dyn Source, groups: &[Group]) -> Result<Vec<Vec<f32>>> {
    let head = if cfg.tied_embeddings {
        "model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    };
    let weight = source.get(head, &[cfg.vocab_size, cfg.hidden_size])?;
    let bias = if source.has("lm_head.bias") {
        Some(source.get("lm_head.bias", &[cfg.vocab_size])?)
    } else {
        None
    };
    let lm_head = Linear::new(weight, bias);
    let rows = (LOGIT_VALUES / cfg.vocab_size.max(1)).max(1);
    let mut out = Vec::new();
    for g in groups {
        let mut picked = Vec::with_capacity(g.ids.len());
        let targets = targets(&g.seqs, &g.ids);
        let mut at = 0;
        while at < g.ids.len() {
            let n = rows.min(g.ids.len() - at);
            let logits = lm_head.forward(&g.hidden.narrow(0, at, n)?)?;
            picked.extend(log_prob(&logits, &targets[at..at + n])?);
            at += n;
        }
        out.push(picked);
    }
    Ok(out)
}

/// Row t of a packed batch predicts token t + 1 of its sequence (the last
/// row of each sequence predicts nothing; its target is a placeholder).
pub fn targets(seqs: &[Sequence], ids: &[u32]) -> Vec<u32> {
    seqs.iter()
        .flat_map(|s| ids[s.start + 1..s.start + s.len].iter().copied().chain([0]))
        .collect()
}

/// log p(target) of each row of `logits` (`[rows, vocab]`).
pub fn log_prob(logits: &Tensor, targets: &[u32]) -> Result<Vec<f32>> {
    let lp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let t = Tensor::from_slice(targets, (targets.len(), 1), lp.device())?;
    Ok(lp.gather(&t, 1)?.flatten_all()?.to_vec1::<f32>()?)
}

/// −mean log p over each sequence's predicted tokens from `from[i]` on.
pub fn mean_per_sequence(seqs: &[Sequence], picked: &[f32], from: &[usize]) -> Vec<f64> {
    seqs.iter()
        .zip(from)
        .map(|(s, &from)| {
            let first = s.start + from.clamp(1, s.len.max(1)) - 1;
            let predicted = &picked[first..s.start + s.len - 1];
            -predicted.iter().map(|&v| f64::from(v)).sum::<f64>() / predicted.len().max(1) as f64
        })
        .collect()
}
