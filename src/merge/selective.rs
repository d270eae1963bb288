//! mergekit 0.1.5's `arcee_fusion`, which decides per position whether an
//! input's value counts from statistics of its whole tensor (`ram` is
//! pointwise; `ramplus_tl` and `sce` stream: `streamed/ram.rs`,
//! `streamed/sce.rs`). Element arithmetic is f32 in mergekit's order;
//! tensor-wide statistics are summed in f64.

use rayon::prelude::*;

use super::kernels::update;

/// mergekit's `arcee_fusion`: importance = |x − base| · KL(softmax(x) ‖
/// softmax(base)) per row (the last axis); the positions whose importance
/// reaches median + 1.5·IQR take x, the rest keep the base. Quantiles are
/// exact here; mergekit estimates them from 1M random positions in tensors
/// larger than that.
pub fn arcee_fusion(base: &mut [f32], x: &[f32], shape: &[usize]) {
    let n = base.len();
    if n == 0 {
        return;
    }
    let cols = shape.last().copied().unwrap_or(n).max(1);
    // In f64: the divergence of two nearly equal distributions is a small
    // difference of terms, which mergekit's f32 rounds differently (by about
    // 1e-4 relative), so positions within that of the threshold may go
    // either way there.
    let softmax = |row: &[f32]| -> Vec<f64> {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v)) as f64;
        let e: Vec<f64> = row.iter().map(|v| (*v as f64 - max).exp()).collect();
        let s: f64 = e.iter().sum();
        e.into_iter().map(|v| v / s + 1e-8).collect()
    };
    let divergence: Vec<f32> = base
        .par_chunks(cols)
        .zip(x.par_chunks(cols))
        .map(|(b, x)| {
            let (p, q) = (softmax(x), softmax(b));
            p.iter().zip(&q).map(|(p, q)| p * (p / q).ln()).sum::<f64>() as f32
        })
        .collect();
    let importance: Vec<f32> = (0..n)
        .into_par_iter()
        .map(|i| (x[i] - base[i]).abs() * divergence[i / cols])
        .collect();
    // mergekit: sorted[(q · (n − 1)).long()], the product in f32. Three
    // selections stand in for the sort: the median's splits the rest.
    let rank = |q: f32| (q * (n - 1) as f32) as usize;
    let mut sorted = importance.clone();
    let (mid, q1_rank, q3_rank) = (rank(0.5), rank(0.25), rank(0.75));
    let (below, &mut median, above) = sorted.select_nth_unstable_by(mid, f32::total_cmp);
    let q1 = if q1_rank < mid {
        *below.select_nth_unstable_by(q1_rank, f32::total_cmp).1
    } else {
        median
    };
    let q3 = if q3_rank > mid {
        *above
            .select_nth_unstable_by(q3_rank - mid - 1, f32::total_cmp)
            .1
    } else {
        median
    };
    let threshold = median + 1.5 * (q3 - q1);
    update(base, |i, b| {
        if importance[i] >= threshold {
            b + (x[i] - b)
        } else {
            b
        }
    });
}
