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

fn norm(a: &[f32]) -> f64 {
    dot(a, a).sqrt()
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

/// mergekit's `multislerp`: the inputs (task vectors with a base) as points
/// on the unit sphere, their weighted mean taken in the tangent space at
/// their normalised weighted Euclidean mean and mapped back, scaled by the
/// weighted mean norm. One input is returned as it is.
pub fn multislerp(
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

/// mergekit's `karcher`: the Karcher (Riemannian) mean of the inputs'
/// directions on the unit sphere, equal weights, at most `max_iter` steps
/// until the tangent step is below `tol`, scaled by the mean of the norms.
pub fn karcher(inputs: &[Vec<f32>], max_iter: usize, tol: f64) -> Vec<f32> {
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
        stock_gram(&base[range], &at)
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

/// The Gram matrix (upper triangle of K × K, f64) of the task vectors
/// `inputs[x] − base` at a run of positions (each difference in f32).
/// Each entry is summed in 8 lanes, which the compiler vectorizes.
pub(super) fn stock_gram(base: &[f32], inputs: &[&[f32]]) -> Vec<f64> {
    let k = inputs.len();
    let mut g = vec![0f64; k * k];
    let (bases, base_tail) = base.as_chunks::<8>();
    for x in 0..k {
        for y in x..k {
            let (xs, x_tail) = inputs[x][..base.len()].as_chunks::<8>();
            let (ys, y_tail) = inputs[y][..base.len()].as_chunks::<8>();
            let mut lanes = [0f64; 8];
            for ((b, xv), yv) in bases.iter().zip(xs).zip(ys) {
                for j in 0..8 {
                    lanes[j] += f64::from(xv[j] - b[j]) * f64::from(yv[j] - b[j]);
                }
            }
            let mut sum: f64 = lanes.iter().sum();
            for ((b, xv), yv) in base_tail.iter().zip(x_tail).zip(y_tail) {
                sum += f64::from(xv - b) * f64::from(yv - b);
            }
            g[x * k + y] = sum;
        }
    }
    g
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

    #[test]
    fn multislerp_of_equal_inputs_is_that_input() {
        let p = MultislerpParams {
            weights: vec![1.0, 2.0],
            normalize_weights: true,
            eps: 1e-8,
        };
        let x = vec![0.5f32, -1.0, 2.0];
        let out = multislerp(&p, None, &mut [x.clone(), x.clone()]).unwrap();
        for (a, b) in out.iter().zip(&x) {
            assert!((a - b).abs() < 1e-5, "{out:?}");
        }
    }

    #[test]
    fn karcher_of_two_directions_bisects_them() {
        let out = karcher(&[vec![2.0, 0.0], vec![0.0, 4.0]], 50, 1e-9);
        // Direction (1, 1)/√2, scaled by the mean norm 3.
        let e = 3.0 * std::f32::consts::FRAC_1_SQRT_2;
        assert!(
            (out[0] - e).abs() < 1e-5 && (out[1] - e).abs() < 1e-5,
            "{out:?}"
        );
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
