//! Methods that decide per position which task vectors count, from
//! statistics of the whole tensor: mergekit 0.1.5's `ram`, `ramplus_tl`
//! and `arcee_fusion` (`sce` streams: `streamed/sce.rs`). Element arithmetic is f32 in
//! mergekit's order; tensor-wide statistics are summed in f64.

use rayon::prelude::*;

use super::kernels::update;

/// mergekit's `ramplus_tl` (plain `ram` is pointwise: `Pointwise::Ram`): a
/// position changed (|δ| > ε) by one input takes that input's δ, times
/// 1 + r·min(α, shared/unique) from that input's counts over the tensor of
/// positions it shares with others and changes alone; one changed by
/// several takes their mean.
pub fn ram_plus(base: &mut [f32], deltas: &mut [Vec<f32>], epsilon: f64, r: f64, alpha: f64) {
    for d in deltas.iter_mut() {
        d.iter_mut().zip(base.iter()).for_each(|(x, b)| *x -= b);
    }
    let epsilon = epsilon as f32;
    let changed = |d: &[f32], i: usize| d[i].abs() > epsilon;
    // How many inputs change each position (at most 255 are counted).
    let counts: Vec<u8> = (0..base.len())
        .into_par_iter()
        .map(|i| deltas.iter().filter(|d| changed(d, i)).count().min(255) as u8)
        .collect();
    let lambdas: Vec<f32> = deltas
        .iter()
        .map(|d| {
            let (shared, unique) = counts
                .par_iter()
                .enumerate()
                .filter(|(i, _)| changed(d, *i))
                .map(|(_, c)| if *c == 1 { (0u64, 1u64) } else { (1, 0) })
                .reduce(|| (0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
            let rho = shared as f32 / (unique as f32).max(epsilon);
            // torch.clamp(min=0, max=alpha): max wins when alpha < 0.
            1.0 + r as f32 * rho.max(0.0).min(alpha as f32)
        })
        .collect();
    update(base, |i, b| {
        let c = counts[i];
        let mut merged = 0f32;
        for (d, lambda) in deltas.iter().zip(&lambdas) {
            let x = if changed(d, i) { d[i] } else { 0.0 };
            merged += match c {
                1 => x * lambda,
                0 => 0.0,
                c => x / f32::from(c),
            };
        }
        b + merged
    });
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_plus_boosts_unique_changes_by_overlap() {
        let mut base = vec![0.0f32; 4];
        // Input 0 shares position 0 and changes position 1 alone: ρ = 1,
        // λ = 1 + 0.5·min(0.2, 1) = 1.1. Input 1 shares 0, and changes
        // position 3 by less than ε: ρ = 1/ε, λ = 1.1 too.
        let mut d = vec![vec![1.0, 2.0, 0.0, 0.0], vec![3.0, 0.0, 0.0, 1e-6]];
        ram_plus(&mut base, &mut d, 1e-5, 0.5, 0.2);
        assert_eq!(base, vec![2.0, 2.2, 0.0, 0.0]);
    }
}
