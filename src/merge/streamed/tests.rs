//! The streamed merges against their definitions: sorting by magnitude or
//! saliency where they select, the whole-tensor kernels elsewhere.

use super::*;
use crate::checkpoint::TensorDtype;
use crate::merge::kernels::quota;
use crate::plan::{MultislerpParams, ObimParams};
use crate::recipe::Saliency;
use crate::stream::CHUNK;
use crate::tensors::{from_f32, to_f32};
use rayon::prelude::*;

/// `operands` encoded in `dtype`, one buffer each, for [`stream_of`].
pub(super) fn encoded(operands: &[Vec<f32>], dtype: Dtype) -> Vec<Vec<u8>> {
    operands.iter().map(|v| from_f32(v, dtype)).collect()
}

/// A stream over `bytes`, every operand stored in `dtype`.
pub(super) fn stream_of(bytes: &[Vec<u8>], dtype: TensorDtype) -> Stream<'_> {
    Stream::new(bytes.iter().map(|b| (b.as_slice(), dtype)).collect()).expect("same sizes")
}

/// `op` streamed from `operands` (the base, then the inputs) stored in
/// bf16, written in f32; with the positions each input won.
fn streamed(op: &Op, operands: &[Vec<f32>], cols: usize) -> (Vec<f32>, Option<Vec<u64>>) {
    streamed_from(op, operands, true, cols)
}

/// [`streamed`] where the first operand is the base only when `base`.
fn streamed_from(
    op: &Op,
    operands: &[Vec<f32>],
    base: bool,
    cols: usize,
) -> (Vec<f32>, Option<Vec<u64>>) {
    let bytes = encoded(operands, Dtype::Bf16);
    let stream = stream_of(&bytes, TensorDtype::Bf16);
    let n = operands[0].len();
    let obd = vec![None; operands.len() - usize::from(base)];
    let ctx = TensorContext {
        name: "t",
        shape: &[n / cols, cols],
        obd: &obd,
        grams: &[],
    };
    let mut out = vec![0; n * 4];
    let written = merge(op, &stream, base, &ctx, Dtype::F32, &mut out).expect("merges");
    assert_eq!(written.non_finite, 0);
    (
        to_f32(written.bytes, TensorDtype::F32).expect("f32"),
        written.won,
    )
}

/// Values rounded to bf16, so that many |δ| tie.
fn bf16(values: impl Iterator<Item = f32>) -> Vec<f32> {
    let v: Vec<f32> = values.collect();
    to_f32(&from_f32(&v, Dtype::Bf16), TensorDtype::Bf16).expect("bf16")
}

/// A base and three inputs over several chunks (and a short last one),
/// with many equal |δ| across chunk borders.
fn family(n: usize) -> Vec<Vec<f32>> {
    periodic_family(n, (7, 13, 29), 64.0)
}

/// A bf16 base and three inputs; input k's δ at position i is
/// ((i·(step + 2k) + k·offset) mod period − period/2) / scale.
fn periodic_family(
    n: usize,
    (step, offset, period): (usize, usize, usize),
    scale: f32,
) -> Vec<Vec<f32>> {
    let base = bf16((0..n).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0));
    let mut operands = vec![base.clone()];
    for k in 0..3 {
        let delta =
            |i: usize| ((i * (step + 2 * k) + k * offset) % period) as f32 - (period / 2) as f32;
        operands.push(bf16(
            base.iter().enumerate().map(|(i, b)| b + delta(i) / scale),
        ));
    }
    operands
}

/// A base and three inputs whose task vectors take many values, so that a
/// sample's histogram can name a narrow window for a cut.
fn smooth_family(n: usize) -> Vec<Vec<f32>> {
    let base = bf16((0..n).map(|i| (i as f32 * 0.37).sin()));
    let mut operands = vec![base.clone()];
    for k in 0..3 {
        let step = 1.3 + k as f32;
        operands.push(bf16(
            base.iter()
                .enumerate()
                .map(|(i, b)| b + 0.1 * (i as f32 * step + k as f32).sin()),
        ));
    }
    operands
}

/// `operands` with the task vectors `factor` times as large in the chunks the
/// counting passes sample: the cut they guess from the sample is wrong.
fn misleading_sample(mut operands: Vec<Vec<f32>>, factor: f32) -> Vec<Vec<f32>> {
    if let Some((base, xs)) = operands.split_first_mut() {
        for x in xs {
            for (i, (x, b)) in x.iter_mut().zip(&*base).enumerate() {
                if select::sampled(i / CHUNK) {
                    *x = bf16([b + factor * (*x - b)].into_iter())[0];
                }
            }
        }
    }
    operands
}

/// Positions by `key` descending, ties to the lower index.
fn ranked(n: usize, key: impl Fn(usize) -> f32) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
    order
}

fn ties(density: f64) -> Op {
    Op::TaskVectors(TaskVectorParams {
        sparsify: Sparsify::Magnitude,
        elect_signs: true,
        weights: vec![1.0, 0.5, 2.0],
        densities: vec![density, 0.3, 1.0],
        normalize: true,
        rescale: false,
        lambda: 0.8,
        seed: 0,
        int8_mask: false,
    })
}

/// The merge of task vectors when `kept(k, δ)` names the positions input
/// `k` keeps (each then weighted), as mergekit defines it.
fn kept_by_sorting(
    p: &TaskVectorParams,
    o: &[Vec<f32>],
    kept: impl Fn(usize, &[f32]) -> Vec<usize>,
) -> Vec<f32> {
    let n = o[0].len();
    let weights = f32s(&p.weights);
    let deltas: Vec<Vec<f32>> = (1..o.len())
        .map(|k| {
            let d: Vec<f32> = (0..n).map(|i| o[k][i] - o[0][i]).collect();
            let mut out = vec![0.0; n];
            for i in kept(k - 1, &d) {
                out[i] = d[i] * weights[k - 1];
            }
            out
        })
        .collect();
    let mut b = o[0].clone();
    let parts: Vec<&[f32]> = deltas.iter().map(Vec::as_slice).collect();
    add_task_vectors(p, &weights, &mut b, &parts);
    b
}

/// TIES by sorting every |δ|: the density's share with the largest.
fn ties_by_sorting(p: &TaskVectorParams, o: &[Vec<f32>]) -> Vec<f32> {
    kept_by_sorting(p, o, |k, d| {
        let n = d.len();
        let density = p.densities[k];
        let keep = if density >= 1.0 {
            n
        } else {
            ((density * n as f64) as usize).max(1)
        };
        ranked(n, |i| d[i].abs()).into_iter().take(keep).collect()
    })
}

#[test]
fn ties_equals_sorting_every_magnitude() {
    // 64 chunks and more: the cuts are guessed from a sample first.
    for (n, densities) in [
        (3 * CHUNK + 77, &[0.001, 0.5, 0.97][..]),
        (64 * CHUNK + 77, &[0.3]),
    ] {
        let o = family(n);
        for &density in densities {
            let op = ties(density);
            let Op::TaskVectors(p) = &op else {
                unreachable!()
            };
            assert!(
                streamed(&op, &o, 11).0 == ties_by_sorting(p, &o),
                "n {n}, density {density}"
            );
        }
    }
}

#[test]
fn breadcrumbs_drop_outliers_and_the_smallest() {
    let op = |density, gamma| {
        Op::TaskVectors(TaskVectorParams {
            sparsify: Sparsify::Outliers {
                gammas: vec![gamma],
            },
            elect_signs: false,
            weights: vec![2.0],
            densities: vec![density],
            normalize: false,
            rescale: false,
            lambda: 1.0,
            seed: 0,
            int8_mask: false,
        })
    };
    // |δ| ranks: 0.1 < 0.2 < ... < 1.0 (10 entries), base 0.
    let d: Vec<f32> = (1..=10).rev().map(|i| i as f32 / 10.0).collect();
    let o = vec![vec![0.0; 10], d];
    // density 0.5 keeps 5, gamma 0.2 drops the 2 largest: ranks 4..8 stay.
    let kept: Vec<f32> = streamed(&op(0.5, 0.2), &o, 10)
        .0
        .into_iter()
        .filter(|v| *v != 0.0)
        .collect();
    let expected: Vec<f32> = [0.8f32, 0.7, 0.6, 0.5, 0.4]
        .iter()
        .map(|v| bf16([*v].into_iter())[0] * 2.0)
        .collect();
    assert_eq!(kept, expected);
    // 9 kept and 5 outliers do not fit in 10: nothing from the bottom goes.
    let m = streamed(&op(0.9, 0.5), &o, 10).0;
    assert_eq!(m.iter().filter(|v| **v != 0.0).count(), 9);
    assert_eq!(m[0], 0.0, "the largest is dropped");
    // Ties across chunks: ascending, the lower index first.
    let n = 2 * CHUNK + 9;
    let o = vec![vec![0.0; n], vec![0.5; n]];
    let m = streamed(&op(0.5, 0.25), &o, 1).0;
    let (bottom, target) = (n - n / 2 - n / 4, n / 2);
    assert!(m[..bottom].iter().all(|v| *v == 0.0));
    assert!(m[bottom..bottom + target].iter().all(|v| *v == 1.0));
    assert!(m[bottom + target..].iter().all(|v| *v == 0.0));
}

#[test]
fn breadcrumbs_equal_sorting_every_magnitude() {
    let gammas = [0.01, 0.2, 0.0];
    let p = TaskVectorParams {
        sparsify: Sparsify::Outliers {
            gammas: gammas.to_vec(),
        },
        elect_signs: false,
        weights: vec![1.0, 0.5, 2.0],
        densities: vec![0.9, 0.5, 0.3],
        normalize: false,
        rescale: false,
        lambda: 1.0,
        seed: 0,
        int8_mask: false,
    };
    let op = Op::TaskVectors(p.clone());
    // Ascending |δ|, ties to the lower index: the smallest go, then the
    // density's share stays, the largest `gamma` share goes.
    let by_sorting = |o: &[Vec<f32>]| {
        kept_by_sorting(&p, o, |k, d| {
            let n = d.len();
            let target = (p.densities[k] * n as f64) as usize;
            let top = (gammas[k] * n as f64) as usize;
            let bottom = n.saturating_sub(target + top);
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| d[a].abs().total_cmp(&d[b].abs()).then(a.cmp(&b)));
            order[bottom..(bottom + target).min(n)].to_vec()
        })
    };
    // 64 chunks and more: the cuts are guessed from a sample first; where
    // the sample's deltas are unlike the others' the guess is wrong, and
    // the keys are counted again.
    for (n, misleading) in [
        (3 * CHUNK + 77, false),
        (64 * CHUNK + 77, false),
        (64 * CHUNK + 77, true),
    ] {
        let o = if misleading {
            misleading_sample(family(n), 8.0)
        } else {
            family(n)
        };
        assert!(
            streamed(&op, &o, 11).0 == by_sorting(&o),
            "n {n}, misleading {misleading}"
        );
    }
}

#[test]
fn model_stock_streams_as_it_merges_whole_tensors() {
    // family(): bf16 values, so the in-memory merge sees what the stream decodes.
    let o = family(3 * CHUNK + 77);
    let n = o[0].len();
    let merged = streamed(&Op::ModelStock { filter_wise: false }, &o, 1).0;
    let mut whole = o[0].clone();
    crate::merge::spherical::model_stock(&mut whole, &o[1..], &[n], false);
    // The Gram matrix is summed in another order there: t may differ in
    // its last bits.
    let worst = merged
        .iter()
        .zip(&whole)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-6, "{worst}");
    assert!(
        merged != o[0],
        "the inputs' task vectors are not orthogonal"
    );
}

#[test]
fn dare_masks_are_reproducible_and_independent_of_threads() {
    let op = Op::TaskVectors(TaskVectorParams {
        sparsify: Sparsify::Random,
        elect_signs: true,
        weights: vec![1.0, 1.0, 1.0],
        densities: vec![0.3, 0.3, 0.3],
        normalize: false,
        rescale: true,
        lambda: 1.0,
        seed: 42,
        int8_mask: false,
    });
    let o = family(2 * CHUNK + 5);
    let make = |threads| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("a pool");
        pool.install(|| streamed(&op, &o, 7).0)
    };
    let one = make(1);
    assert!(one == make(4));
    let changed = one.iter().zip(&o[0]).filter(|(m, b)| m != b).count();
    // Each input keeps ~30%; some positions are kept by none.
    let share = changed as f64 / one.len() as f64;
    assert!((0.5..0.75).contains(&share), "{share}");
}

/// OBIM by sorting: in order, each input takes the quota of free
/// positions with the largest δ², ties to the lower index.
fn obim_by_sorting(p: &ObimParams, o: &[Vec<f32>]) -> (Vec<f32>, Vec<u64>) {
    let n = o[0].len();
    let mut owner = vec![usize::MAX; n];
    let mut won = vec![0; p.retain.len()];
    for &k in &p.order {
        let d = |i: usize| o[k + 1][i] - o[0][i];
        let free: Vec<usize> = ranked(n, |i| d(i) * d(i))
            .into_iter()
            .filter(|&i| owner[i] == usize::MAX)
            .take(quota(p.retain[k], n))
            .collect();
        won[k] = free.len() as u64;
        free.into_iter().for_each(|i| owner[i] = k);
    }
    let scale = p.scale as f32;
    let merged = (0..n)
        .map(|i| match owner[i] {
            usize::MAX => o[0][i],
            k => o[0][i] + scale * (o[k + 1][i] - o[0][i]),
        })
        .collect();
    (merged, won)
}

#[test]
fn obim_equals_claiming_by_sorting() {
    let settings = [
        (vec![0, 1, 2], vec![0.3, 0.3, 0.3]),
        (vec![2, 0, 1], vec![0.5, 0.1, 0.6]),
        (vec![1, 2, 0], vec![0.0, 1.0, 0.2]),
    ];
    obim_equals_sorting(&family(3 * CHUNK + 77), &settings);
    obim_equals_sorting(&family(64 * CHUNK + 77), &settings[1..2]);
    // Many distinct keys: the sample names a window for each claim, right
    // or (where the sample misleads) wrong.
    let smooth = smooth_family(64 * CHUNK + 77);
    obim_equals_sorting(&smooth, &settings[1..2]);
    obim_equals_sorting(&misleading_sample(smooth, 1.25), &settings[1..2]);
}

fn obim_equals_sorting(o: &[Vec<f32>], settings: &[(Vec<usize>, Vec<f64>)]) {
    for (order, retain) in settings.iter().cloned() {
        let p = ObimParams {
            order,
            saliency: Saliency::Magnitude,
            retain,
            using: vec![None; 3],
            scale: 0.9,
        };
        let (merged, won) = streamed(&Op::Obim(p.clone()), o, 13);
        let (expected, expected_won) = obim_by_sorting(&p, o);
        assert_eq!(won, Some(expected_won), "{p:?}");
        assert!(merged == expected, "{p:?}");
    }
}

/// mergekit's `multislerp` over whole tensors, as obim merged it before
/// it streamed: the inputs (task vectors with a base) as points
/// on the unit sphere, their weighted mean taken in the tangent space at
/// their normalised weighted Euclidean mean and mapped back, scaled by the
/// weighted mean norm. One input is returned as it is.
fn multislerp_whole(
    p: &MultislerpParams,
    base: Option<&[f32]>,
    inputs: &mut [Vec<f32>],
) -> Result<Vec<f32>, String> {
    if inputs.len() == 1 {
        return Ok(std::mem::take(&mut inputs[0]));
    }
    if let Some(base) = base {
        for x in inputs.iter_mut() {
            x.iter_mut().zip(base).for_each(|(x, b)| *x -= b);
        }
    }
    let eps = p.eps;
    let total: f64 = p.weights.iter().sum();
    let weights: Vec<f64> = if p.normalize_weights {
        p.weights.iter().map(|w| w / total).collect()
    } else {
        p.weights.clone()
    };
    let norms: Vec<f64> = inputs.iter().map(|x| norm(x)).collect();
    let scale: Vec<f64> = norms
        .iter()
        .zip(&weights)
        .map(|(n, w)| w / (n + eps))
        .collect();
    let n = inputs[0].len();
    let mut mean: Vec<f64> = (0..n)
        .into_par_iter()
        .map(|i| {
            inputs
                .iter()
                .zip(&scale)
                .map(|(x, s)| x[i] as f64 * s)
                .sum()
        })
        .collect();
    let mean_norm = mean.iter().map(|m| m * m).sum::<f64>().sqrt();
    if mean_norm < eps {
        if inputs.len() == 2 {
            let (w0, w1) = (weights[0] as f32, weights[1] as f32);
            return Ok((0..n)
                .map(|i| inputs[0][i] * w0 + inputs[1][i] * w1 + base.map_or(0.0, |b| b[i]))
                .collect());
        }
        return Err(
            "the weighted sum of the inputs is zero (antipodal inputs with \
                    balancing weights); change the weights"
                .to_string(),
        );
    }
    mean.iter_mut().for_each(|m| *m /= mean_norm);
    // dotₖ = unitₖ · mean.
    let dots: Vec<f64> = inputs
        .iter()
        .zip(&norms)
        .map(|(x, nk)| {
            x.par_iter()
                .zip(mean.par_iter())
                .map(|(x, m)| *x as f64 / (nk + eps) * m)
                .sum::<f64>()
        })
        .collect();
    let tangent: Vec<f64> = (0..n)
        .into_par_iter()
        .map(|i| {
            inputs
                .iter()
                .enumerate()
                .map(|(k, x)| (x[i] as f64 / (norms[k] + eps) - dots[k] * mean[i]) * weights[k])
                .sum()
        })
        .collect();
    let tangent_norm = tangent.iter().map(|t| t * t).sum::<f64>().sqrt() + eps;
    let average_norm: f64 = norms.iter().zip(&weights).map(|(n, w)| n * w).sum();
    let (c, s) = (tangent_norm.cos(), tangent_norm.sin() / tangent_norm);
    Ok((0..n)
        .into_par_iter()
        .map(|i| {
            let r = ((mean[i] * c + tangent[i] * s) * average_norm) as f32;
            r + base.map_or(0.0, |b| b[i])
        })
        .collect())
}

/// mergekit's `karcher` over whole tensors, as obim merged it before it
/// streamed: the Karcher (Riemannian) mean of the inputs'
/// directions on the unit sphere, equal weights, at most `max_iter` steps
/// until the tangent step is below `tol`, scaled by the mean of the norms.
fn karcher_whole(inputs: &[Vec<f32>], max_iter: usize, tol: f64) -> Vec<f32> {
    if inputs.len() == 1 {
        return inputs[0].clone();
    }
    let n = inputs[0].len();
    let alpha = 1.0 / inputs.len() as f64;
    let norms: Vec<f64> = inputs.iter().map(|x| norm(x)).collect();
    let valid: Vec<usize> = (0..inputs.len()).filter(|k| norms[*k] > tol).collect();
    if valid.is_empty() {
        return vec![0.0; n];
    }
    let a = 1.0 / valid.len() as f64;
    let unit = |k: usize, i: usize| inputs[k][i] as f64 / norms[k];
    let mut mean: Vec<f64> = (0..n)
        .into_par_iter()
        .map(|i| valid.iter().map(|&k| a * unit(k, i)).sum())
        .collect();
    let length = |v: &[f64]| v.par_iter().map(|x| x * x).sum::<f64>().sqrt();
    let mean_norm = length(&mean);
    if mean_norm < tol {
        mean = (0..n).map(|i| unit(valid[0], i)).collect();
    } else {
        mean.iter_mut().for_each(|m| *m /= mean_norm);
    }
    for _ in 0..max_iter {
        let mut steps = Vec::new();
        for &k in &valid {
            let dot = mean
                .par_iter()
                .enumerate()
                .map(|(i, m)| m * unit(k, i))
                .sum::<f64>()
                .clamp(-1.0, 1.0);
            let theta = dot.acos();
            if theta < tol {
                continue;
            }
            steps.push((k, dot, a * theta / theta.sin()));
        }
        let tangent: Vec<f64> = (0..n)
            .into_par_iter()
            .map(|i| {
                steps
                    .iter()
                    .map(|&(k, dot, f)| f * (unit(k, i) - dot * mean[i]))
                    .sum()
            })
            .collect();
        let tangent_norm = length(&tangent);
        if tangent_norm < tol {
            break;
        }
        let (c, s) = (tangent_norm.cos(), tangent_norm.sin() / tangent_norm);
        mean.par_iter_mut()
            .zip(&tangent)
            .for_each(|(m, t)| *m = c * *m + s * t);
        let unit_norm = length(&mean);
        if unit_norm > tol {
            mean.iter_mut().for_each(|m| *m /= unit_norm);
        }
    }
    let scale: f64 = norms.iter().map(|n| alpha * n).sum();
    mean.into_par_iter().map(|m| (scale * m) as f32).collect()
}

fn norm(a: &[f32]) -> f64 {
    a.iter()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt()
}

/// A base and three inputs that differ from it by a few bf16 steps: the
/// fine-tunes' weights are nearly parallel, their task vectors are not.
fn fine_tunes(n: usize) -> Vec<Vec<f32>> {
    periodic_family(n, (5, 7, 13), 1024.0)
}

/// The largest |a − b| relative to the largest |b|.
fn relative_error(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let worst = a.iter().zip(b).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    worst / scale
}

#[test]
fn multislerp_and_karcher_stream_as_they_merge_whole_tensors() {
    // Coefficients from the Gram matrix against norms and dots over the
    // tensor: equal to f32 rounding, including karcher of nearly parallel
    // weights, where the Gram matrix is ill-conditioned.
    for o in [family(3 * CHUNK + 77), fine_tunes(3 * CHUNK + 77)] {
        let p = MultislerpParams {
            weights: vec![1.0, 0.5, 2.0],
            normalize_weights: true,
            eps: 1e-8,
        };
        let op = Op::Multislerp(p.clone());
        let merged = streamed_from(&op, &o, true, 1).0;
        let whole = multislerp_whole(&p, Some(&o[0]), &mut o[1..].to_vec()).expect("merges");
        let error = relative_error(&merged, &whole);
        assert!(error < 1e-6, "multislerp with a base: {error}");
        assert!(merged != o[0]);

        let merged = streamed_from(&op, &o[1..], false, 1).0;
        let whole = multislerp_whole(&p, None, &mut o[1..].to_vec()).expect("merges");
        let error = relative_error(&merged, &whole);
        assert!(error < 1e-6, "multislerp without a base: {error}");

        let op = Op::Karcher {
            max_iter: 10,
            tol: 1e-5,
        };
        let merged = streamed_from(&op, &o[1..], false, 1).0;
        let whole = karcher_whole(&o[1..], 10, 1e-5);
        let error = relative_error(&merged, &whole);
        assert!(error < 1e-6, "karcher: {error}");
        assert!(merged != o[1]);
    }
}

/// mergekit's `ramplus_tl` over whole tensors, as obim merged it before it
/// streamed: a
/// position changed (|δ| > ε) by one input takes that input's δ, times
/// 1 + r·min(α, shared/unique) from that input's counts over the tensor of
/// positions it shares with others and changes alone; one changed by
/// several takes their mean.
fn ram_plus_whole(base: &mut [f32], deltas: &mut [Vec<f32>], epsilon: f64, r: f64, alpha: f64) {
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
    crate::merge::kernels::update(base, |i, b| {
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

#[test]
fn ramplus_tl_streams_as_it_merges_whole_tensors() {
    // ε = 0.05 leaves some task vectors of family() unchanged, some
    // positions changed by one input and some by several; α = 100 leaves
    // each λ its own (no clamping), α = 0.2 clamps them all.
    for (epsilon, alpha) in [(0.05, 100.0), (0.05, 0.2), (1e-5, 100.0), (10.0, 100.0)] {
        let o = family(3 * CHUNK + 77);
        let op = Op::Ram(crate::plan::RamParams {
            epsilon,
            plus: Some((0.5, alpha)),
        });
        let merged = streamed(&op, &o, 1).0;
        let mut whole = o[0].clone();
        ram_plus_whole(&mut whole, &mut o[1..].to_vec(), epsilon, 0.5, alpha);
        assert!(merged == whole, "epsilon {epsilon}, alpha {alpha}");
    }
}

/// mergekit's `arcee_fusion` over whole tensors, as obim merged it before
/// it streamed: importance = |x − base| · KL(softmax(x) ‖
/// softmax(base)) per row (the last axis); the positions whose importance
/// reaches median + 1.5·IQR take x, the rest keep the base. Quantiles are
/// exact here; mergekit estimates them from 1M random positions in tensors
/// larger than that.
fn arcee_fusion_whole(base: &mut [f32], x: &[f32], shape: &[usize]) {
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
    crate::merge::kernels::update(base, |i, b| {
        if importance[i] >= threshold {
            b + (x[i] - b)
        } else {
            b
        }
    });
}

#[test]
fn arcee_fusion_streams_as_it_merges_whole_tensors() {
    // Rows of 11 and of a whole chunk and more (one row per chunk).
    for (n, cols) in [(3 * CHUNK + 77, 11), (3 * CHUNK + 77, CHUNK + 77)] {
        for o in [family(n), smooth_family(n)] {
            // Every 97th δ 20 times as large: a tail above median + 1.5·IQR.
            let (base, x) = (o[0].clone(), &o[2]);
            let x = bf16(x.iter().zip(&base).enumerate().map(|(i, (x, b))| {
                if i % 97 == 0 { b + 20.0 * (x - b) } else { *x }
            }));
            let o = vec![base, x];
            let merged = streamed(&Op::ArceeFusion, &o, cols).0;
            let mut whole = o[0].clone();
            arcee_fusion_whole(&mut whole, &o[1], &[n / cols, cols]);
            assert!(merged == whole, "cols {cols}");
            let taken = merged.iter().zip(&o[0]).filter(|(m, b)| m != b).count();
            assert!(taken > 0 && taken < n / 10, "cols {cols}: {taken} taken");
        }
    }
}
