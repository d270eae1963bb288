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
            for (i, &b) in b.iter().enumerate() {
                let count = xs.iter().filter(|x| changed(x[i], b)).count();
                for (o, x) in overlap.iter_mut().zip(xs) {
                    if changed(x[i], b) {
                        if count == 1 {
                            o.1 += 1;
                        } else {
                            o.0 += 1;
                        }
                    }
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
            for (i, b) in b.iter_mut().enumerate() {
                // How many inputs change the position (at most 255 counted).
                let count = xs.iter().filter(|x| changed(x[i], *b)).count().min(255);
                let mut merged = 0f32;
                for (x, lambda) in xs.iter().zip(&lambdas) {
                    let d = if changed(x[i], *b) { x[i] - *b } else { 0.0 };
                    merged += match count {
                        1 => d * lambda,
                        0 => 0.0,
                        c => d / c as f32,
                    };
                }
                *b += merged;
            }
        }),
    )
}
