//! OBIM's streamed merge (DESIGN §3): per input a counting pass over the
//! saliency keys (which also makes the previous input's claim) and a pass
//! for the threshold's ties; one byte per position says who owns it.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use super::Written;
use super::select::{
    self, BINS, Count, Cut, Kept, Rule, Window, count_high, count_high_keeping, with_keys,
};
use crate::merge::kernels::{UNOWNED, order_key, quota};
use crate::merge::{MergeError, ObdStats, TensorContext};
use crate::plan::ObimParams;
use crate::recipe::{Dtype, Saliency};
use crate::stream::Stream;

thread_local! {
    /// OBIM's owner buffer, kept between tensors: a fresh one costs a page
    /// fault per 4 KiB on every tensor.
    static OWNER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// OBIM (DESIGN §3): in the tensor's order, input k claims round(retainₖ·N)
/// unowned positions by saliency (ties to the lower flat index); merged =
/// θ_B + scale·Σ 1[owner = k]·δₖ. Each claim is made in the pass that
/// counts the next input's keys, the last one in the writing pass.
pub fn merge<'o>(
    p: &ObimParams,
    stream: &Stream,
    ctx: &TensorContext,
    dtype: Dtype,
    out: &'o mut [u8],
) -> Result<Written<'o>, MergeError> {
    let n = stream.len();
    let m = p.retain.len();
    let cols = ctx.shape.last().copied().unwrap_or(1).max(1);
    let stats: Vec<Option<ObdStats>> = (0..m)
        .map(|k| match p.saliency {
            Saliency::Obd => ctx.obd.get(k).copied().flatten(),
            Saliency::Magnitude => None,
        })
        .collect();
    for s in stats.iter().flatten() {
        if let ObdStats::Columns(dj) = s
            && dj.len() != cols
        {
            return Err(MergeError::Invalid {
                tensor: ctx.name.to_string(),
                reason: format!(
                    "calibration statistics have {} input features, the tensor has {cols}",
                    dj.len()
                ),
            });
        }
    }
    // Input k's claim keys for chunk c: at least 1 where the position is
    // free, 0 where someone owns it.
    let keys_of = |k: usize, c: usize, b: &[f32], x: &[f32], owner: &[u8], keys: &mut [u32]| {
        saliency(stats[k], cols, c * stream.chunk_size(), b, x, keys);
        for (key, &o) in keys.iter_mut().zip(owner) {
            let free = u32::from(o == UNOWNED).wrapping_neg();
            *key = order_key(f32::from_bits(*key)).max(1) & free;
        }
    };
    // Gives input k the selected positions of a chunk; how many.
    let claim = |owner: &mut [u8], keys: &[u32], rule: Rule, k: usize| -> u64 {
        let mut selected = rule.selector();
        let mut taken = 0u32;
        for (o, &key) in owner.iter_mut().zip(keys) {
            // Owned positions (key 0) are never taken.
            let s = selected(key) & (key != 0);
            let mask = u8::from(s).wrapping_neg();
            *o = (k as u8 & mask) | (*o & !mask);
            taken += u32::from(s);
        }
        u64::from(taken)
    };
    OWNER.with_borrow_mut(|owner| {
        owner.clear();
        owner.resize(n, UNOWNED);
        let mut won = vec![0u64; m];
        let mut pending: Option<(usize, Cut)> = None;
        for &k in &p.order {
            // Makes the pending claim, then counts k's keys (and the free
            // positions) where nobody owns them now.
            let which: Vec<usize> = [0, 1 + k]
                .into_iter()
                .chain(pending.as_ref().map(|(j, _)| 1 + j))
                .collect();
            // Counts (and claims) over `items`: chunks with their owner
            // bytes, and where a window is given, the slot that keeps the
            // keys in it.
            type Items<'b> = Vec<(usize, (&'b mut [u8], Option<&'b mut Vec<Vec<u32>>>))>;
            let count = |items: Items, window: Option<Window>| {
                stream.fold(
                    &which,
                    items,
                    || (vec![0u32; BINS], 0usize, 0u64),
                    |(mut high, mut free, mut taken), c, (owner, slot), chunk| {
                        with_keys(stream.chunk_len(c), |keys| {
                            if let Some((j, cut)) = &pending {
                                keys_of(*j, c, chunk[0], chunk[2], owner, keys);
                                taken += claim(owner, keys, cut.rule(c), *j);
                            }
                            keys_of(k, c, chunk[0], chunk[1], owner, keys);
                            match (slot, window) {
                                (Some(slot), Some(w)) => {
                                    count_high_keeping(&mut high, keys, w, &mut slot[0])
                                }
                                _ => count_high(&mut high, keys),
                            }
                            free += owner.iter().filter(|&&o| o == UNOWNED).count();
                        });
                        (high, free, taken)
                    },
                    |a, b| (select::add_counts(a.0, b.0), a.1 + b.1, a.2 + b.2),
                )
            };
            let mut parts: Vec<Option<&mut [u8]>> =
                owner.chunks_mut(stream.chunk_size()).map(Some).collect();
            let mut take = |c: usize| parts[c].take().expect("each chunk once");
            let quota = quota(p.retain[k], n);
            let (high, free, taken, kept) = match select::sample(stream) {
                None => {
                    let all = (0..stream.chunks()).map(|c| (c, (take(c), None))).collect();
                    let (high, free, taken) = count(all, None);
                    (high, free, taken, None)
                }
                Some(sample) => {
                    // The sample first: it guesses where k's cut falls, so
                    // the other chunks keep the keys there.
                    let items = sample.iter().map(|&c| (c, (take(c), None))).collect();
                    let (high, free, taken) = count(items, None);
                    let seen: usize = sample.iter().map(|&c| stream.chunk_len(c)).sum();
                    let fraction = (quota as f64 / n as f64).min(free as f64 / seen as f64);
                    let window = select::guess(&select::totals(&high, 1)[0], fraction);
                    let mut kept = Kept::new(stream, vec![window]);
                    let (_, slots) = kept.slots();
                    let items = slots
                        .into_iter()
                        .map(|(c, s)| (c, (take(c), Some(s))))
                        .collect();
                    let rest = count(items, window);
                    let high = select::add_counts(high, rest.0);
                    (high, free + rest.1, taken + rest.2, Some(kept))
                }
            };
            if let Some((j, _)) = pending {
                won[j] = taken;
            }
            let wanted = quota.min(free);
            let counts: Vec<Count> = vec![Box::new(move |_: &[u64], _| wanted)];
            let owner = &owner[..];
            let cut = select::cuts_counted(
                stream,
                &[0, 1 + k],
                &high,
                &counts,
                kept.as_ref(),
                &[],
                &|_, c, chunk, keys| {
                    let start = c * stream.chunk_size();
                    keys_of(
                        k,
                        c,
                        chunk[0],
                        chunk[1],
                        &owner[start..start + keys.len()],
                        keys,
                    );
                },
            )
            .pop()
            .unwrap_or(Cut::Nothing);
            pending = Some((k, cut));
        }
        let all: Vec<usize> = (0..=m).collect();
        let taken = AtomicU64::new(0);
        let scale = p.scale as f32;
        let (bytes, non_finite) = stream.write(
            &all,
            owner.chunks_mut(stream.chunk_size()).collect(),
            dtype,
            out,
            |c, owner, chunk| {
                let Some((b, xs)) = chunk.split_first_mut() else {
                    return;
                };
                if let Some((j, cut)) = &pending {
                    let t = with_keys(b.len(), |keys| {
                        keys_of(*j, c, b, xs[*j], owner, keys);
                        claim(owner, keys, cut.rule(c), *j)
                    });
                    taken.fetch_add(t, Ordering::Relaxed);
                }
                for (k, x) in xs.iter().enumerate() {
                    for ((b, &o), &x) in b.iter_mut().zip(owner.iter()).zip(x.iter()) {
                        // A select on bits: the compiler keeps a branch for `if`.
                        let won = u32::from(o == k as u8).wrapping_neg();
                        let sum = (*b + scale * (x - *b)).to_bits();
                        *b = f32::from_bits((sum & won) | (b.to_bits() & !won));
                    }
                }
            },
        );
        if let Some((j, _)) = pending {
            won[j] = taken.into_inner();
        }
        Ok(Written {
            bytes,
            non_finite,
            won: Some(won),
        })
    })
}

/// The saliency (as f32 bits) of δ = x − b at positions `start..` of a
/// tensor with `cols` columns: δ² (magnitude), δ²·d_j (OBD, d_j the column's
/// Σ x² of activations), δ²·tokens (a bias's OBD).
fn saliency(
    stats: Option<ObdStats>,
    cols: usize,
    start: usize,
    b: &[f32],
    x: &[f32],
    keys: &mut [u32],
) {
    let delta = |i: usize| x[i] - b[i];
    match stats {
        Some(ObdStats::Columns(dj)) => {
            // Row by row, so that d_j is a slice too.
            let mut i = 0;
            while i < keys.len() {
                let col = (start + i) % cols;
                let len = (cols - col).min(keys.len() - i);
                for (j, (key, &dj)) in keys[i..i + len]
                    .iter_mut()
                    .zip(&dj[col..col + len])
                    .enumerate()
                {
                    let d = f64::from(delta(i + j));
                    *key = ((d * d * f64::from(dj)) as f32).to_bits();
                }
                i += len;
            }
        }
        Some(ObdStats::Tokens(t)) => {
            for (i, key) in keys.iter_mut().enumerate() {
                let d = f64::from(delta(i));
                *key = ((d * d * t) as f32).to_bits();
            }
        }
        None => {
            for (key, (x, b)) in keys.iter_mut().zip(x.iter().zip(b)) {
                let d = x - b;
                *key = (d * d).to_bits();
            }
        }
    }
}
