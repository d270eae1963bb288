//! The spherical merges that stream (`merge::spherical` defines them):
//! model_stock per tensor, multislerp and karcher. Each needs only the Gram
//! matrix of its K vectors, summed chunk by chunk in one pass. model_stock
//! turns it into its ratio t; multislerp's and karcher's results are linear
//! combinations of their inputs, whose K coefficients come from the Gram
//! matrix alone. A second pass writes the merge, so neither holds more than
//! a chunk of any tensor.

use super::Written;
use crate::merge::spherical::{self, gram, stock_merge, stock_ratio};
use crate::merge::{MergeError, TensorContext};
use crate::plan::MultislerpParams;
use crate::recipe::Dtype;
use crate::stream::{Stream, nothing};

/// The Gram matrix of the stream's inputs (every operand after the base
/// when `base`, else every operand), less the base when there is one,
/// summed chunk by chunk in order.
fn gram_of(stream: &Stream, base: bool) -> Vec<f64> {
    let all: Vec<usize> = (0..stream.operands()).collect();
    let k = stream.operands() - usize::from(base);
    let per_chunk = stream.map(&all, |_, chunk| {
        if base {
            gram(Some(chunk[0]), &chunk[1..])
        } else {
            gram(None, chunk)
        }
    });
    per_chunk.into_iter().fold(vec![0f64; k * k], |mut g, c| {
        g.iter_mut().zip(c).for_each(|(g, c)| *g += c);
        g
    })
}

/// model_stock per tensor (`spherical::model_stock`): t from the task
/// vectors' Gram matrix, then a pass that writes t·mean(inputs) + (1 − t)·base.
pub(super) fn model_stock<'o>(stream: &Stream, dtype: Dtype, out: &'o mut [u8]) -> Written<'o> {
    let k = stream.operands() - 1;
    let t = stock_ratio(&gram_of(stream, true), k);
    let all: Vec<usize> = (0..=k).collect();
    Written::of(
        stream.write(&all, nothing(stream), dtype, out, |_, (), chunk| {
            let Some((b, xs)) = chunk.split_first_mut() else {
                return;
            };
            for (i, w0) in b.iter_mut().enumerate() {
                *w0 = stock_merge(t, *w0, xs.iter().map(|x| x[i]));
            }
        }),
    )
}

/// multislerp (`spherical::multislerp`) of the task vectors when `base`
/// (the stream's first operand), else of the inputs themselves.
pub(super) fn multislerp<'o>(
    p: &MultislerpParams,
    stream: &Stream,
    base: bool,
    ctx: &TensorContext,
    dtype: Dtype,
    out: &'o mut [u8],
) -> Result<Written<'o>, MergeError> {
    let r =
        spherical::multislerp(p, &gram_of(stream, base)).map_err(|reason| MergeError::Invalid {
            tensor: ctx.name.to_string(),
            reason,
        })?;
    Ok(combine(stream, base, &r, dtype, out))
}

/// karcher (`spherical::karcher`) of every operand of the stream.
pub(super) fn karcher<'o>(
    max_iter: usize,
    tol: f64,
    stream: &Stream,
    dtype: Dtype,
    out: &'o mut [u8],
) -> Written<'o> {
    let k = stream.operands();
    let r = spherical::karcher(&gram_of(stream, false), k, max_iter, tol);
    combine(stream, false, &r, dtype, out)
}

/// The writing pass of a linear combination: Σₖ rₖ·xₖ in f64, to f32, of
/// the inputs, or with a base `b` of the task vectors (xₖ − b in f32), with
/// `b` added back in f32.
fn combine<'o>(
    stream: &Stream,
    base: bool,
    r: &[f64],
    dtype: Dtype,
    out: &'o mut [u8],
) -> Written<'o> {
    let all: Vec<usize> = (0..stream.operands()).collect();
    Written::of(
        stream.write(&all, nothing(stream), dtype, out, |_, (), chunk| {
            let Some((first, rest)) = chunk.split_first_mut() else {
                return;
            };
            if base {
                for (i, b) in first.iter_mut().enumerate() {
                    let sum: f64 = rest
                        .iter()
                        .zip(r)
                        .map(|(x, r)| r * f64::from(x[i] - *b))
                        .sum();
                    *b += sum as f32;
                }
            } else {
                for (i, x0) in first.iter_mut().enumerate() {
                    let sum: f64 = rest
                        .iter()
                        .zip(&r[1..])
                        .fold(r[0] * f64::from(*x0), |s, (x, r)| s + r * f64::from(x[i]));
                    *x0 = sum as f32;
                }
            }
        }),
    )
}
