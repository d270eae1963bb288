//! Methods that treat tensors as vectors and interpolate on the sphere, or
//! by the angle between task vectors: mergekit 0.1.5's `nuslerp`,
//! `multislerp`, `karcher` and `model_stock`. Reductions (norms, dots) run
//! in f64; mergekit's run in f32, which the bf16 output cannot tell apart.

use rayon::prelude::*;

use super::kernels::update;
use crate::plan::{MultislerpParams, NuslerpParams};

const CHUNK: usize = 1 << 16;

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.par_chunks(CHUNK)
        .zip(b.par_chunks(CHUNK))
        .map(|(a, b)| {
            a.iter()
                .zip(b)
                .map(|(x, y)| *x as f64 * *y as f64)
                .sum::<f64>()
        })
        .sum()
}

/// The vectors a tensor of `shape` is cut into: `count` of `len` elements,
/// contiguous (rows, or the whole tensor) or `strided` (along the first
/// axis: element `i` of vector `v` at `i·count + v`).
#[derive(Debug, Clone, Copy)]
struct Vectors {
    count: usize,
    len: usize,
    /// Vectors along the first axis (elements `count` apart).
    strided: bool,
}

impl Vectors {
    fn whole(n: usize) -> Vectors {
        Vectors {
            count: 1,
            len: n,
            strided: false,
        }
    }

    /// Rows: vectors along the last axis.
    fn rows(n: usize, shape: &[usize]) -> Vectors {
        let len = shape.last().copied().unwrap_or(n).max(1);
        Vectors {
            count: n / len,
            len,
            strided: false,
        }
    }

    /// Vectors along the first axis, one per position of the other axes.
    fn columns(n: usize, shape: &[usize]) -> Vectors {
        let len = shape.first().copied().unwrap_or(n).max(1);
        Vectors {
            count: n / len,
            len,
            strided: true,
        }
    }
}

/// mergekit's `nuslerp`: SLERP of `a` and `b` at t = w_b / (w_a + w_b)
/// (0.5 when the weights sum to ≈ 0), per row, per column (`row_wise`) or
/// over the whole tensor (`flatten`); with a base, of the task vectors,
/// added back to the base. Written into `a`.
pub fn nuslerp(
    p: &NuslerpParams,
    base: Option<&[f32]>,
    a: &mut [f32],
    b: &mut [f32],
    shape: &[usize],
) {
    let total = p.weights[0] + p.weights[1];
    let t = if total.abs() < 1e-6 {
        0.5
    } else {
        p.weights[1] / total
    };
    if let Some(base) = base {
        a.iter_mut().zip(base).for_each(|(x, b)| *x -= b);
        b.iter_mut().zip(base).for_each(|(x, b)| *x -= b);
    }
    let n = a.len();
    let vectors = if p.flatten || shape.len() < 2 {
        Vectors::whole(n)
    } else if p.row_wise {
        Vectors::columns(n, shape)
    } else {
        Vectors::rows(n, shape)
    };
    // Per vector: Σa², Σb², Σab (one vector: over the whole tensor, in
    // parallel chunks; rows: a row per task; columns: row by row, summed).
    let sums: Vec<[f64; 3]> = if vectors.count == 1 {
        let (a, b) = (&*a, &*b);
        vec![[dot(a, a), dot(b, b), dot(a, b)]]
    } else if !vectors.strided {
        a.par_chunks(vectors.len)
            .zip(b.par_chunks(vectors.len))
            .map(|(a, b)| {
                a.iter().zip(b).fold([0f64; 3], |[aa, bb, ab], (x, y)| {
                    let (x, y) = (*x as f64, *y as f64);
                    [aa + x * x, bb + y * y, ab + x * y]
                })
            })
            .collect()
    } else {
        let add = |mut s: Vec<[f64; 3]>, (a, b): (&[f32], &[f32])| {
            for ((s, x), y) in s.iter_mut().zip(a).zip(b) {
                let (x, y) = (*x as f64, *y as f64);
                *s = [s[0] + x * x, s[1] + y * y, s[2] + x * y];
            }
            s
        };
        a.par_chunks(vectors.count)
            .zip(b.par_chunks(vectors.count))
            .fold(|| vec![[0f64; 3]; vectors.count], add)
            .reduce(
                || vec![[0f64; 3]; vectors.count],
                |mut x, y| {
                    for (x, y) in x.iter_mut().zip(y) {
                        *x = [x[0] + y[0], x[1] + y[1], x[2] + y[2]];
                    }
                    x
                },
            )
    };
    let coefficients: Vec<(f32, f32)> = sums
        .iter()
        .map(|[aa, bb, ab]| {
            let cos = (ab / (aa.sqrt().max(1e-7) * bb.sqrt().max(1e-7))).clamp(-1.0, 1.0);
            // mergekit: colinear when 1 − cos² ≤ eps² (eps 1e-8), in f32.
            let c = cos as f32;
            if 1.0 - c * c <= 1e-16 {
                return ((1.0 - t) as f32, t as f32);
            }
            let theta = cos.acos();
            let s = theta.sin();
            (
                (((1.0 - t) * theta).sin() / s) as f32,
                ((t * theta).sin() / s) as f32,
            )
        })
        .collect();
    let b = &*b;
    update(a, |j, x| {
        let v = if vectors.strided {
            j % vectors.count
        } else {
            j / vectors.len
        };
        let (ca, cb) = coefficients[v];
        ca * x + cb * b[j]
    });
    if let Some(base) = base {
        a.iter_mut().zip(base).for_each(|(x, b)| *x += b);
    }
}

/// K × K quadratic form cᵀ·G·c: the squared norm of Σₖ cₖ·xₖ, where `g`
/// is the Gram matrix of the xₖ (never below 0).
fn quadratic(g: &[f64], c: &[f64]) -> f64 {
    let k = c.len();
    let mut sum = 0.0;
    for x in 0..k {
        for y in 0..k {
            sum += c[x] * c[y] * g[x * k + y];
        }
    }
    sum.max(0.0)
}

/// G·c: each xₖ's dot with Σⱼ cⱼ·xⱼ.
fn times(g: &[f64], c: &[f64]) -> Vec<f64> {
    let k = c.len();
    (0..k)
        .map(|x| (0..k).map(|y| g[x * k + y] * c[y]).sum())
        .collect()
}

/// mergekit's `multislerp`: the inputs (task vectors with a base) as points
/// on the unit sphere, their weighted mean taken in the tangent space at
/// their normalised weighted Euclidean mean and mapped back, scaled by the
/// weighted mean norm. One input is returned as it is.
///
/// Every vector mergekit forms (the mean, the tangent, the result) is a
/// linear combination of the K inputs, and every norm and dot it takes is
/// one of the Gram matrix `g` (K × K, of the task vectors): so this returns
/// the result's coefficients r, merged = Σₖ rₖ·xₖ (+ the base), found in K
/// dimensions rather than over the tensor. (mergekit's tangent is 0 to
/// rounding, since Σₖ wₖ·dotₖ = ‖Σₖ wₖ·unitₖ‖: the result is the
/// normalised weighted mean of the directions times the weighted mean norm.
/// The steps are kept as mergekit writes them.)
pub(super) fn multislerp(p: &MultislerpParams, g: &[f64]) -> Result<Vec<f64>, String> {
    let k = p.weights.len();
    if k == 1 {
        return Ok(vec![1.0]);
    }
    let eps = p.eps;
    let total: f64 = p.weights.iter().sum();
    let weights: Vec<f64> = if p.normalize_weights {
        p.weights.iter().map(|w| w / total).collect()
    } else {
        p.weights.clone()
    };
    let norms: Vec<f64> = (0..k).map(|x| g[x * k + x].max(0.0).sqrt()).collect();
    // mean = Σₖ wₖ·xₖ / (‖xₖ‖ + ε), normalised.
    let mut mean: Vec<f64> = weights
        .iter()
        .zip(&norms)
        .map(|(w, n)| w / (n + eps))
        .collect();
    let mean_norm = quadratic(g, &mean).sqrt();
    if mean_norm < eps {
        if k == 2 {
            return Ok(weights);
        }
        return Err(
            "the weighted sum of the inputs is zero (antipodal inputs with \
                    balancing weights); change the weights"
                .to_string(),
        );
    }
    mean.iter_mut().for_each(|m| *m /= mean_norm);
    // dotₖ = xₖ / (‖xₖ‖ + ε) · mean.
    let dots: Vec<f64> = times(g, &mean)
        .iter()
        .zip(&norms)
        .map(|(d, n)| d / (n + eps))
        .collect();
    // tangent = Σₖ wₖ·(xₖ / (‖xₖ‖ + ε) − dotₖ·mean).
    let along: f64 = weights.iter().zip(&dots).map(|(w, d)| w * d).sum();
    let tangent: Vec<f64> = (0..k)
        .map(|x| weights[x] / (norms[x] + eps) - along * mean[x])
        .collect();
    let tangent_norm = quadratic(g, &tangent).sqrt() + eps;
    let average_norm: f64 = norms.iter().zip(&weights).map(|(n, w)| n * w).sum();
    let (c, s) = (tangent_norm.cos(), tangent_norm.sin() / tangent_norm);
    Ok((0..k)
        .map(|x| (mean[x] * c + tangent[x] * s) * average_norm)
        .collect())
}

/// mergekit's `karcher`: the Karcher (Riemannian) mean of the inputs'
/// directions on the unit sphere, equal weights, at most `max_iter` steps
/// until the tangent step is below `tol`, scaled by the mean of the norms.
///
/// As for [`multislerp`], the mean stays a linear combination of the K
/// inputs through every step, so this iterates on its coefficients with the
/// inputs' Gram matrix `g` and returns r, merged = Σₖ rₖ·xₖ.
pub(super) fn karcher(g: &[f64], k: usize, max_iter: usize, tol: f64) -> Vec<f64> {
    if k == 1 {
        return vec![1.0];
    }
    let alpha = 1.0 / k as f64;
    let norms: Vec<f64> = (0..k).map(|x| g[x * k + x].max(0.0).sqrt()).collect();
    let valid: Vec<usize> = (0..k).filter(|x| norms[*x] > tol).collect();
    let Some(&first) = valid.first() else {
        return vec![0.0; k];
    };
    let a = 1.0 / valid.len() as f64;
    // unitₖ = xₖ / ‖xₖ‖; the mean starts at their normalised average.
    let mut mean = vec![0.0; k];
    valid.iter().for_each(|&x| mean[x] = a / norms[x]);
    let mean_norm = quadratic(g, &mean).sqrt();
    if mean_norm < tol {
        mean = vec![0.0; k];
        mean[first] = 1.0 / norms[first];
    } else {
        mean.iter_mut().for_each(|m| *m /= mean_norm);
    }
    for _ in 0..max_iter {
        let along = times(g, &mean);
        let mut tangent = vec![0.0; k];
        for &x in &valid {
            let dot = (along[x] / norms[x]).clamp(-1.0, 1.0);
            let theta = dot.acos();
            if theta < tol {
                continue;
            }
            // f·(unitₓ − dot·mean)
            let f = a * theta / theta.sin();
            tangent[x] += f / norms[x];
            tangent
                .iter_mut()
                .zip(&mean)
                .for_each(|(t, m)| *t -= f * dot * m);
        }
        let tangent_norm = quadratic(g, &tangent).sqrt();
        if tangent_norm < tol {
            break;
        }
        let (c, s) = (tangent_norm.cos(), tangent_norm.sin() / tangent_norm);
        mean.iter_mut()
            .zip(&tangent)
            .for_each(|(m, t)| *m = c * *m + s * t);
        let unit_norm = quadratic(g, &mean).sqrt();
        if unit_norm > tol {
            mean.iter_mut().for_each(|m| *m /= unit_norm);
        }
    }
    let scale: f64 = norms.iter().map(|n| alpha * n).sum();
    mean.iter().map(|m| scale * m).collect()
}

/// mergekit's `model_stock`: per tensor (or per row with `filter_wise`),
/// t = K·cos / (1 + (K − 1)·cos) from the mean cosine between the inputs'
/// task vectors (0 where the denominator is ≈ 0), then
/// t·mean(inputs) + (1 − t)·base. Written into `base`. Per tensor, the
/// merge streams (`streamed/`) with the same three functions below.
pub fn model_stock(base: &mut [f32], inputs: &[Vec<f32>], shape: &[usize], filter_wise: bool) {
    let n = base.len();
    let vectors = if filter_wise {
        Vectors::rows(n, shape)
    } else {
        Vectors::whole(n)
    };
    let k = inputs.len();
    let gram = |range: std::ops::Range<usize>| {
        let at: Vec<&[f32]> = inputs.iter().map(|x| &x[range.clone()]).collect();
        gram(Some(&base[range]), &at)
    };
    let grams: Vec<Vec<f64>> = if vectors.count == 1 {
        let chunks: Vec<usize> = (0..n).step_by(CHUNK).collect();
        let total = chunks
            .into_par_iter()
            .map(|start| gram(start..(start + CHUNK).min(n)))
            .reduce(
                || vec![0f64; k * k],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                    a
                },
            );
        vec![total]
    } else {
        (0..vectors.count)
            .into_par_iter()
            .map(|v| gram(v * vectors.len..(v + 1) * vectors.len))
            .collect()
    };
    let ratios: Vec<f32> = grams.iter().map(|g| stock_ratio(g, k)).collect();
    update(base, |i, w0| {
        stock_merge(ratios[i / vectors.len], w0, inputs.iter().map(|x| x[i]))
    });
}

/// The Gram matrix (K × K, f64) of `inputs` at a run of positions, or of
/// their task vectors `inputs[x] − base` (each difference in f32).
pub(super) fn gram(base: Option<&[f32]>, inputs: &[&[f32]]) -> Vec<f64> {
    let k = inputs.len();
    let mut g = vec![0f64; k * k];
    for x in 0..k {
        for y in x..k {
            let dot = match base {
                Some(b) => dot_from(b, inputs[x], inputs[y]),
                None => dot_lanes(inputs[x], inputs[y]),
            };
            g[x * k + y] = dot;
            g[y * k + x] = dot;
        }
    }
    g
}

/// (x − b)·(y − b), each difference in f32, summed in 8 f64 lanes, which
/// the compiler vectorizes.
fn dot_from(b: &[f32], x: &[f32], y: &[f32]) -> f64 {
    let (bs, b_tail) = b.as_chunks::<8>();
    let (xs, x_tail) = x[..b.len()].as_chunks::<8>();
    let (ys, y_tail) = y[..b.len()].as_chunks::<8>();
    let mut lanes = [0f64; 8];
    for ((b, xv), yv) in bs.iter().zip(xs).zip(ys) {
        for j in 0..8 {
            lanes[j] += f64::from(xv[j] - b[j]) * f64::from(yv[j] - b[j]);
        }
    }
    let mut sum: f64 = lanes.iter().sum();
    for ((b, xv), yv) in b_tail.iter().zip(x_tail).zip(y_tail) {
        sum += f64::from(xv - b) * f64::from(yv - b);
    }
    sum
}

/// x·y summed in 8 f64 lanes.
fn dot_lanes(x: &[f32], y: &[f32]) -> f64 {
    let (xs, x_tail) = x.as_chunks::<8>();
    let (ys, y_tail) = y[..x.len()].as_chunks::<8>();
    let mut lanes = [0f64; 8];
    for (xv, yv) in xs.iter().zip(ys) {
        for j in 0..8 {
            lanes[j] += f64::from(xv[j]) * f64::from(yv[j]);
        }
    }
    let mut sum: f64 = lanes.iter().sum();
    for (xv, yv) in x_tail.iter().zip(y_tail) {
        sum += f64::from(*xv) * f64::from(*yv);
    }
    sum
}

/// model_stock's t from the Gram matrix of K task vectors.
pub(super) fn stock_ratio(g: &[f64], k: usize) -> f32 {
    let mut cosines = Vec::new();
    for x in 0..k {
        for y in x + 1..k {
            let norms = g[x * k + x].sqrt() * g[y * k + y].sqrt();
            cosines.push((g[x * k + y] / norms.max(1e-6)).clamp(-1.0, 1.0));
        }
    }
    let cos = cosines.iter().sum::<f64>() / cosines.len().max(1) as f64;
    let denominator = 1.0 + (k as f64 - 1.0) * cos;
    if denominator.abs() < 1e-6 {
        0.0
    } else {
        (k as f64 * cos / denominator) as f32
    }
}

/// mergekit: sum(ws) / count, then t·average + (1 − t)·w₀, in f32.
pub(super) fn stock_merge(t: f32, w0: f32, inputs: impl ExactSizeIterator<Item = f32>) -> f32 {
    let count = inputs.len() as f32;
    let sum = inputs.fold(0f32, |s, x| s + x);
    t * (sum / count) + (1.0 - t) * w0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nuslerp_of_orthogonal_unit_rows_stays_on_the_circle() {
        let p = NuslerpParams {
            weights: vec![1.0, 1.0],
            row_wise: false,
            flatten: false,
        };
        // Two rows; each pair orthogonal: the midpoint has norm 1.
        let mut a = vec![1.0f32, 0.0, 0.0, 2.0];
        let mut b = vec![0.0f32, 1.0, 2.0, 0.0];
        nuslerp(&p, None, &mut a, &mut b, &[2, 2]);
        let h = std::f32::consts::FRAC_1_SQRT_2;
        for (x, y) in a.iter().zip([h, h, 2.0 * h, 2.0 * h]) {
            assert!((x - y).abs() < 1e-6, "{a:?}");
        }
    }

    /// Σₖ rₖ·xₖ.
    fn combined(r: &[f64], inputs: &[&[f32]]) -> Vec<f32> {
        (0..inputs[0].len())
            .map(|i| {
                inputs
                    .iter()
                    .zip(r)
                    .map(|(x, r)| r * f64::from(x[i]))
                    .sum::<f64>() as f32
            })
            .collect()
    }

    #[test]
    fn multislerp_of_equal_inputs_is_that_input() {
        let p = MultislerpParams {
            weights: vec![1.0, 2.0],
            normalize_weights: true,
            eps: 1e-8,
        };
        let x = [0.5f32, -1.0, 2.0];
        let r = multislerp(&p, &gram(None, &[&x, &x])).unwrap();
        let out = combined(&r, &[&x, &x]);
        for (a, b) in out.iter().zip(&x) {
            assert!((a - b).abs() < 1e-5, "{out:?}");
        }
    }

    #[test]
    fn multislerp_of_balancing_antipodes_is_refused_past_two() {
        let p = MultislerpParams {
            weights: vec![1.0, 1.0, 0.0],
            normalize_weights: false,
            eps: 1e-8,
        };
        let (a, b, c) = ([1.0f32, 2.0], [-1.0f32, -2.0], [3.0f32, 0.0]);
        assert!(multislerp(&p, &gram(None, &[&a, &b, &c])).is_err());
        // Two inputs fall back to their weighted sum.
        let two = MultislerpParams {
            weights: vec![1.0, 1.0],
            ..p
        };
        assert_eq!(multislerp(&two, &gram(None, &[&a, &b])), Ok(vec![1.0, 1.0]));
    }

    #[test]
    fn karcher_of_two_directions_bisects_them() {
        let (a, b) = ([2.0f32, 0.0], [0.0f32, 4.0]);
        let r = karcher(&gram(None, &[&a, &b]), 2, 50, 1e-9);
        let out = combined(&r, &[&a, &b]);
        // Direction (1, 1)/√2, scaled by the mean norm 3.
        let e = 3.0 * std::f32::consts::FRAC_1_SQRT_2;
        assert!(
            (out[0] - e).abs() < 1e-5 && (out[1] - e).abs() < 1e-5,
            "{out:?}"
        );
    }

    #[test]
    fn karcher_of_three_directions_is_their_spherical_centre() {
        // Three unit axes: by symmetry the mean is (1, 1, 1)/√3, scaled by
        // the mean norm (1 + 2 + 3)/3 = 2.
        let (a, b, c) = ([1.0f32, 0.0, 0.0], [0.0f32, 2.0, 0.0], [0.0f32, 0.0, 3.0]);
        let r = karcher(&gram(None, &[&a, &b, &c]), 3, 50, 1e-12);
        let out = combined(&r, &[&a, &b, &c]);
        let e = 2.0 / 3f32.sqrt();
        assert!(out.iter().all(|x| (x - e).abs() < 1e-5), "{out:?}");
    }

    #[test]
    fn model_stock_of_orthogonal_task_vectors_keeps_the_base() {
        // cos = 0: t = 0, the base.
        let mut base = vec![1.0f32, 1.0];
        model_stock(&mut base, &[vec![2.0, 1.0], vec![1.0, 2.0]], &[2], false);
        assert_eq!(base, vec![1.0, 1.0]);
        // Identical task vectors: cos = 1, t = 1, their mean.
        let mut base = vec![1.0f32, 1.0];
        model_stock(&mut base, &[vec![2.0, 3.0], vec![2.0, 3.0]], &[2], false);
        assert_eq!(base, vec![2.0, 3.0]);
    }
}
