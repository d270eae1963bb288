//! RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of
//! Language Models", arXiv 2212.09849). A linear layer's merged weight is
//! the one whose outputs are closest, in least squares, to every input
//! model's outputs on that model's own data:
//! `W = W_B + λ·(Σₖ δₖ G̃ₖ)(Σₖ G̃ₖ)⁻¹` with `Gₖ = Σ x xᵀ` of the layer's
//! input over input k's data and `G̃ₖ = α·Gₖ + (1 − α)·diag(Gₖ)`. The system
//! is solved in f64 by Cholesky; where the sum is not positive definite a
//! ridge (a multiple of its mean diagonal) is added until it is. Tensors
//! with no Gram matrix (embeddings, norms, biases) get `W_B + λ·mean(δₖ)`,
//! which is the solution with every G̃ₖ the identity.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::plan::RegmeanParams;

/// How a linear layer's system was solved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Solve {
    /// The ridge added to the diagonal, relative to its mean (0: none).
    pub ridge: f64,
    /// (largest / smallest Cholesky pivot)², a lower bound of the
    /// system's condition number.
    pub condition: f64,
}

/// Merges one tensor in place into `base`. `grams` is empty for a tensor
/// that is not a linear layer's weight, else one `[d, d]` matrix per input
/// with `d` the tensor's columns.
pub fn regmean(
    p: &RegmeanParams,
    base: &mut [f32],
    inputs: &[Vec<f32>],
    grams: &[Vec<f32>],
    shape: &[usize],
) -> Result<Option<Solve>, String> {
    if inputs.is_empty() {
        return Err("regmean needs an input".into());
    }
    if grams.is_empty() {
        let scale = p.lambda / inputs.len() as f64;
        for (j, b) in base.iter_mut().enumerate() {
            let sum: f64 = inputs.iter().map(|x| f64::from(x[j]) - f64::from(*b)).sum();
            *b = (f64::from(*b) + scale * sum) as f32;
        }
        return Ok(None);
    }
    let d: usize = shape.iter().skip(1).product();
    let rows = shape.first().copied().unwrap_or(1);
    if grams.len() != inputs.len() {
        return Err(format!(
            "{} Gram matrices for {} inputs",
            grams.len(),
            inputs.len()
        ));
    }
    if let Some(g) = grams.iter().find(|g| g.len() != d * d) {
        return Err(format!(
            "a Gram matrix of {} entries for a layer of {d} inputs",
            g.len()
        ));
    }
    let tensor_err = |e: candle_core::Error| e.to_string();
    let mut sum = vec![0f64; d * d];
    let mut product: Option<Tensor> = None;
    for (x, g) in inputs.iter().zip(grams) {
        let tilde: Vec<f64> = g
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let v = f64::from(*v);
                if i / d == i % d { v } else { p.alpha * v }
            })
            .collect();
        for (s, t) in sum.iter_mut().zip(&tilde) {
            *s += t;
        }
        let delta: Vec<f64> = x
            .iter()
            .zip(base.iter())
            .map(|(x, b)| f64::from(*x) - f64::from(*b))
            .collect();
        let delta = Tensor::from_vec(delta, (rows, d), &Device::Cpu).map_err(tensor_err)?;
        let tilde = Tensor::from_vec(tilde, (d, d), &Device::Cpu).map_err(tensor_err)?;
        let term = delta.matmul(&tilde).map_err(tensor_err)?;
        product = Some(match product {
            None => term,
            Some(acc) => (acc + term).map_err(tensor_err)?,
        });
    }
    let mut rhs = product
        .expect("at least one input")
        .flatten_all()
        .and_then(|t| t.to_vec1::<f64>())
        .map_err(tensor_err)?;
    let (lower, solve) = cholesky_with_ridge(&sum, d)?;
    let upper = transpose(&lower, d);
    // Each row r of the result solves A·xᵀ = rhs[r]ᵀ (A symmetric).
    rhs.par_chunks_mut(d).for_each(|row| {
        for i in 0..d {
            let dot: f64 = lower[i * d..i * d + i]
                .iter()
                .zip(&row[..i])
                .map(|(l, y)| l * y)
                .sum();
            row[i] = (row[i] - dot) / lower[i * d + i];
        }
        for i in (0..d).rev() {
            let dot: f64 = upper[i * d + i + 1..(i + 1) * d]
                .iter()
                .zip(&row[i + 1..])
                .map(|(u, x)| u * x)
                .sum();
            row[i] = (row[i] - dot) / upper[i * d + i];
        }
    });
    for (b, delta) in base.iter_mut().zip(&rhs) {
        *b = (f64::from(*b) + p.lambda * delta) as f32;
    }
    Ok(Some(solve))
}

/// The lower Cholesky factor of the symmetric `[d, d]` matrix `a`, with the
/// smallest ridge (1e-12, 1e-10, … of the mean diagonal) that makes it
/// positive definite. A matrix of zeros (a layer no token reached) is
/// taken as the identity.
fn cholesky_with_ridge(a: &[f64], d: usize) -> Result<(Vec<f64>, Solve), String> {
    let mean_diagonal = (0..d).map(|i| a[i * d + i]).sum::<f64>() / d as f64;
    if !mean_diagonal.is_finite() {
        return Err("the Gram matrices are not finite".into());
    }
    let scale = if mean_diagonal > 0.0 {
        mean_diagonal
    } else {
        1.0
    };
    let mut ridge = if mean_diagonal > 0.0 { 0.0 } else { 1.0 };
    loop {
        if let Some(lower) = cholesky(a, d, ridge * scale) {
            let pivots = (0..d).map(|i| lower[i * d + i]);
            let (lo, hi) = pivots.fold((f64::INFINITY, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
            let condition = (hi / lo).powi(2);
            return Ok((lower, Solve { ridge, condition }));
        }
        ridge = if ridge == 0.0 { 1e-12 } else { ridge * 100.0 };
        if ridge > 1.0 {
            return Err("the sum of the Gram matrices is not positive definite, even with a ridge of its mean diagonal".into());
        }
    }
}

/// Cholesky–Crout, row by row: `L[i][j] = (A[i][j] + ridge·[i=j] − L[i][..j]·L[j][..j]) / L[j][j]`.
/// `None` when a pivot is not positive.
fn cholesky(a: &[f64], d: usize, ridge: f64) -> Option<Vec<f64>> {
    let mut l = vec![0f64; d * d];
    for j in 0..d {
        let (done, rest) = l.split_at_mut((j + 1) * d);
        let row_j = &mut done[j * d..];
        let dot: f64 = row_j[..j].iter().map(|v| v * v).sum();
        let pivot = a[j * d + j] + ridge - dot;
        if !(pivot > 0.0 && pivot.is_finite()) {
            return None;
        }
        let pivot = pivot.sqrt();
        row_j[j] = pivot;
        let row_j = &done[j * d..j * d + j];
        rest.par_chunks_mut(d)
            .with_min_len(64)
            .enumerate()
            .for_each(|(k, row_i)| {
                let i = j + 1 + k;
                let dot: f64 = row_i[..j].iter().zip(row_j).map(|(x, y)| x * y).sum();
                row_i[j] = (a[i * d + j] - dot) / pivot;
            });
    }
    Some(l)
}

fn transpose(m: &[f64], d: usize) -> Vec<f64> {
    let mut t = vec![0f64; d * d];
    for i in 0..d {
        for j in 0..d {
            t[j * d + i] = m[i * d + j];
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(alpha: f64, lambda: f64) -> RegmeanParams {
        RegmeanParams {
            alpha,
            lambda,
            using: vec![None, None],
        }
    }

    /// With every Gram matrix the identity, RegMean is the mean of the inputs.
    #[test]
    fn identity_grams_give_the_mean() {
        let base = vec![0.0f32; 4];
        let inputs = vec![vec![1.0, 2.0, 3.0, 4.0], vec![3.0, 2.0, 1.0, 0.0]];
        let eye = vec![1.0, 0.0, 0.0, 1.0];
        let mut out = base.clone();
        let solve = regmean(
            &params(1.0, 1.0),
            &mut out,
            &inputs,
            &[eye.clone(), eye],
            &[2, 2],
        )
        .unwrap()
        .unwrap();
        assert_eq!(out, vec![2.0, 2.0, 2.0, 2.0]);
        assert_eq!(solve.ridge, 0.0);
    }

    /// One row, two features: the closed form by hand.
    #[test]
    fn two_inputs_by_hand() {
        // W₁ = [1, 0] on data x = (1, 1): G₁ = [[1, 1], [1, 1]];
        // W₂ = [0, 1] on x = (1, 0), (0, 1): G₂ = I.
        // Σ W G = [1, 1] + [0, 1] = [1, 2]; Σ G = [[2, 1], [1, 2]];
        // W = [1, 2]·[[2, -1], [-1, 2]]/3 = [0, 1].
        let mut out = vec![0.0f32, 0.0];
        let inputs = vec![vec![1.0, 0.0], vec![0.0, 1.0]];
        let grams = vec![vec![1.0, 1.0, 1.0, 1.0], vec![1.0, 0.0, 0.0, 1.0]];
        regmean(&params(1.0, 1.0), &mut out, &inputs, &grams, &[1, 2]).unwrap();
        assert!(
            (out[0] - 0.0).abs() < 1e-6 && (out[1] - 1.0).abs() < 1e-6,
            "{out:?}"
        );
        // α = 0 keeps only the diagonals: Σ W G̃ = [1, 1], Σ G̃ = 2·I.
        let mut out = vec![0.0f32, 0.0];
        regmean(&params(0.0, 1.0), &mut out, &inputs, &grams, &[1, 2]).unwrap();
        assert_eq!(out, vec![0.5, 0.5]);
    }

    /// A singular sum (one input seen along one direction only) gets a ridge.
    #[test]
    fn a_singular_system_gets_a_ridge() {
        let mut out = vec![0.0f32, 0.0];
        let inputs = vec![vec![1.0, 1.0]];
        let grams = vec![vec![1.0, 1.0, 1.0, 1.0]];
        let solve = regmean(&params(1.0, 1.0), &mut out, &inputs, &grams, &[1, 2])
            .unwrap()
            .unwrap();
        assert!(solve.ridge > 0.0, "{solve:?}");
        assert!(out.iter().all(|v| v.is_finite()));
        // Along the seen direction the output still matches: W·(1, 1) = 2.
        assert!((out[0] + out[1] - 2.0).abs() < 1e-3, "{out:?}");
    }
}
