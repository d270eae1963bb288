//! mergekit's `ramplus_tl` streamed (plain `ram` is pointwise:
//! `Pointwise::Ram`): one pass counts, per input, the positions it changes
//! (|δ| > ε) together with another input and those it changes alone; the
//! writing pass counts each position's changers again and merges. A
//! position changed by one input takes its δ times
//! λₖ = 1 + r·min(α, shared/unique); one changed by several takes their
//! mean δ.

use super::Written;
use crate::recipe::Dtype;
use crate::stream::{Stream, nothing};

/// Merges `stream` (the base, then the inputs) into `out`.
pub(super) fn merge<'o>(
    epsilon: f64,
    r: f64,
    alpha: f64,
    stream: &Stream,
    dtype: Dtype,
    out: &'o mut [u8],
) -> Written<'o> {
    let m = stream.operands() - 1;
    let all: Vec<usize> = (0..=m).collect();
    let epsilon = epsilon as f32;
    let changed = |x: f32, b: f32| (x - b).abs() > epsilon;
    // Per input: (positions shared with another input, positions alone).
    let chunks = (0..stream.chunks()).map(|c| (c, ())).collect();
    let overlap = stream.fold(
        &all,
        chunks,
        || vec![(0u64, 0u64); m],
        |mut overlap, _, (), chunk| {
            let Some((b, xs)) = chunk.split_first() else {
                return overlap;
            };
            let counts = changers(b, xs, &changed);
            for (o, x) in overlap.iter_mut().zip(xs) {
                for ((&c, x), b) in counts.iter().zip(x.iter()).zip(b.iter()) {
                    let mine = u64::from(changed(*x, *b));
                    let alone = u64::from(c == 1);
                    o.0 += mine & (alone ^ 1);
                    o.1 += mine & alone;
                }
            }
            overlap
        },
        |mut a, b| {
            a.iter_mut().zip(b).for_each(|(a, b)| {
                a.0 += b.0;
                a.1 += b.1;
            });
            a
        },
    );
    let lambdas: Vec<f32> = overlap
        .iter()
        .map(|&(shared, unique)| {
            let rho = shared as f32 / (unique as f32).max(epsilon);
            // torch.clamp(min=0, max=alpha): max wins when alpha < 0.
            1.0 + r as f32 * rho.max(0.0).min(alpha as f32)
        })
        .collect();
    Written::of(
        stream.write(&all, nothing(stream), dtype, out, |_, (), chunk| {
            let Some((b, xs)) = chunk.split_first_mut() else {
                return;
            };
            let counts = changers(b, xs, &changed);
            // Summed input by input, each position in input order as
            // mergekit sums; with no changer every d is 0, and d / 1 adds 0
            // as mergekit's 0 does.
            let mut merged = vec![0f32; b.len()];
            for (x, lambda) in xs.iter().zip(&lambdas) {
                for (((m, &c), x), b) in merged.iter_mut().zip(&counts).zip(x.iter()).zip(b.iter())
                {
                    let d = if changed(*x, *b) { x - b } else { 0.0 };
                    *m += if c == 1 {
                        d * lambda
                    } else {
                        d / f32::from(c.max(1))
                    };
                }
            }
            b.iter_mut().zip(&merged).for_each(|(b, m)| *b += m);
        }),
    )
}

/// How many of `xs` change each position of `b` (at most 255 counted).
fn changers<X: AsRef<[f32]>>(b: &[f32], xs: &[X], changed: &impl Fn(f32, f32) -> bool) -> Vec<u8> {
    let mut counts = vec![0u8; b.len()];
    for x in xs {
        for ((c, x), b) in counts.iter_mut().zip(x.as_ref()).zip(b) {
            *c = c.saturating_add(u8::from(changed(*x, *b)));
        }
    }
    counts
}
