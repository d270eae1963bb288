//! mergekit's `arcee_fusion` streamed by whole rows: importance =
//! |x − base| · KL(softmax(x) ‖ softmax(base)) of the position's row (the
//! last axis); the positions whose importance reaches median + 1.5·IQR take
//! x, the rest keep the base. One pass finds each row's divergence (one f32
//! per row is kept), the two counting passes of `select.rs` find the three
//! quantiles as top-k cuts of the importance, and the writing pass decides
//! each position. Quantiles are exact here; mergekit estimates them from 1M
//! random positions in tensors larger than that.

use super::Written;
use super::select::{self, Count, Cut};
use crate::merge::TensorContext;
use crate::merge::kernels::{from_order_key, order_key};
use crate::recipe::Dtype;
use crate::stream::{Stream, nothing};

/// Merges `stream` (the base, then the input) into `out`.
pub(super) fn merge<'o>(
    stream: &Stream,
    ctx: &TensorContext,
    dtype: Dtype,
    out: &'o mut [u8],
) -> Written<'o> {
    let n = stream.len();
    let cols = ctx.shape.last().copied().unwrap_or(n).max(1);
    let rows = stream.in_rows(cols);
    let per_chunk = rows.map(&[0, 1], |_, chunk| {
        chunk[0]
            .chunks(cols)
            .zip(chunk[1].chunks(cols))
            .map(|(b, x)| divergence(b, x))
            .collect::<Vec<f32>>()
    });
    let divergence: Vec<f32> = per_chunk.concat();
    let [median, q1, q3] = quantiles(&rows, cols, &divergence);
    let threshold = median + 1.5 * (q3 - q1);
    Written::of(
        rows.write(&[0, 1], nothing(&rows), dtype, out, |c, (), chunk| {
            let [b, x] = chunk else {
                return;
            };
            let d = row_divergences(&rows, cols, &divergence, c, b.len());
            for ((b, x), d) in b.chunks_mut(cols).zip(x.chunks(cols)).zip(d) {
                for (b, x) in b.iter_mut().zip(x.iter()) {
                    if (x - *b).abs() * d >= threshold {
                        *b += x - *b;
                    }
                }
            }
        }),
    )
}

/// The divergences of the rows in chunk `c` of `rows` (`len` positions).
fn row_divergences<'d>(
    rows: &Stream,
    cols: usize,
    divergence: &'d [f32],
    c: usize,
    len: usize,
) -> &'d [f32] {
    let first = c * rows.chunk_size() / cols;
    &divergence[first..first + len.div_ceil(cols)]
}

/// The importance's median, first and third quartiles as mergekit takes
/// them: sorted[(q · (n − 1)).long()], the product in f32, ascending, that
/// is the (n − rank)-th largest, found as three top-k cuts of the same keys.
fn quantiles(rows: &Stream, cols: usize, divergence: &[f32]) -> [f32; 3] {
    let n = rows.len();
    let rank = |q: f32| (q * n.saturating_sub(1) as f32) as usize;
    let counts: Vec<Count> = [0.5f32, 0.25, 0.75]
        .into_iter()
        .map(|q| -> Count {
            let k = n - rank(q);
            Box::new(move |_: &[u64], _| k)
        })
        .collect();
    let cuts = select::cuts(
        rows,
        &[0, 1],
        &counts,
        &[false, true, true],
        &|_, c, chunk, keys| {
            let d = row_divergences(rows, cols, divergence, c, keys.len());
            let rows = chunk[0].chunks(cols).zip(chunk[1].chunks(cols));
            for ((b, x), (keys, d)) in rows.zip(keys.chunks_mut(cols).zip(d)) {
                for ((key, b), x) in keys.iter_mut().zip(b).zip(x) {
                    *key = order_key((x - b).abs() * d);
                }
            }
        },
    );
    let value = |cut: &Cut| match *cut {
        Cut::At { threshold, .. } => from_order_key(threshold),
        // The k-th largest of n ≥ k keys is always in the keys.
        Cut::Nothing | Cut::Everything => f32::NAN,
    };
    std::array::from_fn(|s| cuts.get(s).map_or(f32::NAN, value))
}

/// KL(softmax(x) ‖ softmax(b)) of one row, each probability + 1e-8 as in
/// mergekit. In f64: the divergence of two nearly equal distributions is a
/// small difference of terms, which mergekit's f32 rounds differently (by
/// about 1e-4 relative), so positions within that of the threshold may go
/// either way there.
fn divergence(b: &[f32], x: &[f32]) -> f32 {
    let softmax = |row: &[f32]| -> Vec<f64> {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v)) as f64;
        let e: Vec<f64> = row.iter().map(|v| (*v as f64 - max).exp()).collect();
        let s: f64 = e.iter().sum();
        e.into_iter().map(|v| v / s + 1e-8).collect()
    };
    let (p, q) = (softmax(x), softmax(b));
    p.iter().zip(&q).map(|(p, q)| p * (p / q).ln()).sum::<f64>() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The quartiles equal those of sorting every importance, on keys
    /// that are mostly distinct, so a rank off by one shows.
    #[test]
    fn quantiles_equal_sorting() {
        let n = 64 * crate::stream::CHUNK + 333;
        let cols = 7;
        let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let x: Vec<f32> = (0..n)
            .map(|i| b[i] + 0.1 * (i as f32 * 1.3).sin())
            .collect();
        let bytes: Vec<Vec<u8>> = [&b, &x]
            .iter()
            .map(|v| v.iter().flat_map(|f| f.to_le_bytes()).collect())
            .collect();
        let stream = Stream::new(
            bytes
                .iter()
                .map(|b| (b.as_slice(), crate::checkpoint::TensorDtype::F32))
                .collect(),
        )
        .expect("f32");
        let rows = stream.in_rows(cols);
        let divergence: Vec<f32> = b
            .chunks(cols)
            .zip(x.chunks(cols))
            .map(|(b, x)| divergence(b, x))
            .collect();
        let mut sorted: Vec<f32> = (0..n)
            .map(|i| (x[i] - b[i]).abs() * divergence[i / cols])
            .collect();
        sorted.sort_by(f32::total_cmp);
        let at = |q: f32| sorted[(q * (n - 1) as f32) as usize];
        assert_eq!(
            quantiles(&rows, cols, &divergence),
            [at(0.5), at(0.25), at(0.75)]
        );
    }
}
