//! Passes over tensors straight from their mapped bytes: each chunk of
//! positions is decoded into per-thread scratch, used while it is in cache
//! and dropped, so no whole-tensor f32 buffer exists. A pointwise merge is
//! one pass that writes ([`Stream::write`]); a merge that needs a
//! whole-tensor statistic first (a top-k threshold, an L1 norm) folds over
//! the chunks before it writes ([`Stream::fold`], [`Stream::map`]).

use crate::checkpoint::TensorDtype;
use crate::recipe::Dtype;
use crate::tensors::{Values, decode_slice, dtype_bytes, encode_slice, front};
use rayon::prelude::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Positions per chunk: a few operands' chunks stay in a core's cache
/// between decoding, computing and encoding.
pub const CHUNK: usize = 1 << 15;

/// The operands of one tensor's merge, as mapped bytes in their dtypes.
pub struct Stream<'a> {
    operands: Vec<(&'a [u8], TensorDtype)>,
    n: usize,
    /// Positions per chunk: [`CHUNK`], or whole rows ([`Stream::in_rows`]).
    chunk: usize,
    /// Shared with the views [`Stream::in_rows`] makes.
    non_finite: Arc<[AtomicBool]>,
}

thread_local! {
    /// Each thread's decoded chunks, kept between chunks and passes.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl<'a> Stream<'a> {
    /// `None` when an operand is not a float dtype or the operands'
    /// element counts differ.
    pub fn new(operands: Vec<(&'a [u8], TensorDtype)>) -> Option<Self> {
        let counts = operands
            .iter()
            .map(|(b, d)| Some(b.len() / d.float_width()?))
            .collect::<Option<Vec<usize>>>()?;
        let n = counts.first().copied().unwrap_or(0);
        if counts.iter().any(|&c| c != n) {
            return None;
        }
        let non_finite = operands.iter().map(|_| AtomicBool::new(false)).collect();
        Some(Stream {
            operands,
            n,
            chunk: CHUNK,
            non_finite,
        })
    }

    /// The same operands chunked by whole rows of `cols` positions (as many
    /// as fit in [`CHUNK`], at least one), for a merge that works row by
    /// row. What a pass over the view finds non-finite counts for `self`.
    pub fn in_rows(&self, cols: usize) -> Stream<'a> {
        let cols = cols.max(1);
        Stream {
            operands: self.operands.clone(),
            n: self.n,
            chunk: cols * (CHUNK / cols).max(1),
            non_finite: Arc::clone(&self.non_finite),
        }
    }

    /// Positions per chunk (the last may be short).
    pub fn chunk_size(&self) -> usize {
        self.chunk
    }

    /// Positions in chunk `c`.
    pub fn chunk_len(&self, c: usize) -> usize {
        self.chunk.min(self.n - c * self.chunk)
    }

    /// How many operands (the base first where the merge has one).
    pub fn operands(&self) -> usize {
        self.operands.len()
    }

    /// Positions per operand.
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// How many chunks (the last may be short).
    pub fn chunks(&self) -> usize {
        self.n.div_ceil(self.chunk)
    }

    /// Whether each operand's values were all finite, in every pass so far.
    pub fn values(&self) -> Vec<Values> {
        self.non_finite
            .iter()
            .map(|bad| {
                if bad.load(Ordering::Relaxed) {
                    Values::NonFinite
                } else {
                    Values::Finite
                }
            })
            .collect()
    }

    /// Decodes chunk `c` of the operands `which` into `scratch` (one slot of
    /// a chunk each) and returns their slices.
    fn decode<'s>(&self, c: usize, which: &[usize], scratch: &'s mut [f32]) -> Vec<&'s mut [f32]> {
        let start = c * self.chunk;
        let len = self.chunk_len(c);
        scratch
            .chunks_mut(self.chunk)
            .zip(which)
            .map(|(slot, &k)| {
                let (bytes, dtype) = self.operands[k];
                let w = dtype.float_width().unwrap_or(1);
                let slot = &mut slot[..len];
                if !decode_slice(&bytes[start * w..(start + len) * w], dtype, slot) {
                    self.non_finite[k].store(true, Ordering::Relaxed);
                }
                slot
            })
            .collect()
    }

    /// Runs `f` on chunk `c` decoded (operands `which`, in that order) in
    /// this thread's scratch.
    fn with_chunk<T>(&self, c: usize, which: &[usize], f: impl FnOnce(Vec<&mut [f32]>) -> T) -> T {
        SCRATCH.with_borrow_mut(|scratch| {
            let scratch = front(scratch, which.len().max(1) * self.chunk);
            f(self.decode(c, which, scratch))
        })
    }

    /// Folds `f(acc, c, item, chunk)` over the chunks `c` of `items`, in
    /// parallel: `items` pairs each chunk to visit with its item (a slice of
    /// a per-position buffer the pass updates, or `()`), `chunk` holds the
    /// operands `which` decoded. Per-thread accumulators from `init` are
    /// combined by `reduce`.
    pub fn fold<A: Send, X: Send>(
        &self,
        which: &[usize],
        items: Vec<(usize, X)>,
        init: impl Fn() -> A + Sync + Send,
        f: impl Fn(A, usize, X, &[&[f32]]) -> A + Sync + Send,
        reduce: impl Fn(A, A) -> A + Sync + Send,
    ) -> A {
        // A few pieces per thread, so accumulators are few.
        let min = items
            .len()
            .div_ceil(rayon::current_num_threads() * 4)
            .max(1);
        items
            .into_par_iter()
            .with_min_len(min)
            .fold(&init, |acc, (c, item)| {
                self.with_chunk(c, which, |chunk| {
                    let chunk: Vec<&[f32]> = chunk.into_iter().map(|s| &*s).collect();
                    f(acc, c, item, &chunk)
                })
            })
            .reduce(&init, reduce)
    }

    /// `f(c, chunk)` for every chunk, in parallel; the results in chunk order.
    pub fn map<T: Send>(
        &self,
        which: &[usize],
        f: impl Fn(usize, &[&[f32]]) -> T + Sync,
    ) -> Vec<T> {
        let all: Vec<usize> = (0..self.chunks()).collect();
        self.map_over(which, &all, f)
    }

    /// [`Stream::map`] over the chunks `chunks` only, results in their order.
    pub fn map_over<T: Send>(
        &self,
        which: &[usize],
        chunks: &[usize],
        f: impl Fn(usize, &[&[f32]]) -> T + Sync,
    ) -> Vec<T> {
        chunks
            .par_iter()
            .map(|&c| {
                self.with_chunk(c, which, |chunk| {
                    let chunk: Vec<&[f32]> = chunk.into_iter().map(|s| &*s).collect();
                    f(c, &chunk)
                })
            })
            .collect()
    }

    /// The writing pass: `merge(c, item, chunk)` leaves chunk `c`'s merged
    /// values in `chunk[0]` (the operands `which`, decoded, in that order,
    /// each free to be overwritten), which are encoded in `dtype` into the
    /// front of `out` (at least as long as the tensor in `dtype`). Returns
    /// the encoded bytes and how many merged values are not finite.
    pub fn write<'o, X: Send>(
        &self,
        which: &[usize],
        items: Vec<X>,
        dtype: Dtype,
        out: &'o mut [u8],
        merge: impl Fn(usize, X, &mut [&mut [f32]]) + Sync,
    ) -> (&'o [u8], u64) {
        debug_assert_eq!(items.len(), self.chunks());
        let size = dtype_bytes(dtype);
        let bytes = &mut out[..self.n * size];
        let bad = bytes
            .par_chunks_mut(self.chunk * size)
            .zip(items)
            .enumerate()
            .map(|(c, (o, item))| {
                self.with_chunk(c, which, |mut chunk| {
                    merge(c, item, &mut chunk);
                    let Some(merged) = chunk.first() else {
                        return 0;
                    };
                    encode_slice(merged, dtype, o);
                    merged.iter().filter(|v| !v.is_finite()).count() as u64
                })
            })
            .sum();
        (bytes, bad)
    }
}

/// A pointwise merge as a writing pass's `merge`: `chunk[0]` is its first
/// operand.
pub fn pointwise(merge: &crate::merge::Pointwise, chunk: &mut [&mut [f32]]) {
    let Some((first, rest)) = chunk.split_first_mut() else {
        return;
    };
    let rest: Vec<&[f32]> = rest.iter().map(|s| &**s).collect();
    merge.apply(first, &rest);
}

/// One `()` per chunk: the `items` of a pass that updates nothing.
pub fn nothing(stream: &Stream) -> Vec<()> {
    vec![(); stream.chunks()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::Pointwise;
    use crate::tensors::{from_f32, to_f32};

    /// A streamed merge (chunk by chunk from bytes) equals decoding whole
    /// tensors, merging them and encoding the result: across chunk borders,
    /// a short last chunk, mixed input dtypes and an output buffer that
    /// starts dirty and too short.
    #[test]
    fn streamed_merge_equals_whole_tensor_merge() {
        let n = 3 * CHUNK + 5;
        let operand = |k: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 7919 + k * 104_729) % 2003) as f32 / 1001.0 - 1.0)
                .collect()
        };
        let bytes = [
            from_f32(&operand(0), Dtype::Bf16),
            from_f32(&operand(1), Dtype::F32),
            from_f32(&operand(2), Dtype::F16),
        ];
        let operands: Vec<(&[u8], TensorDtype)> = bytes
            .iter()
            .zip([TensorDtype::Bf16, TensorDtype::F32, TensorDtype::F16])
            .map(|(b, d)| (b.as_slice(), d))
            .collect();
        let merges = [
            Pointwise::Linear {
                weights: vec![0.5, 1.0, 2.0],
                normalize: true,
            },
            Pointwise::TaskArithmetic {
                weights: vec![0.3, 0.7],
                divisor: Some(1.0),
                lambda: 0.9,
            },
        ];
        for merge in merges {
            for dtype in [Dtype::Bf16, Dtype::F32] {
                let stream = Stream::new(operands.clone()).expect("float operands");
                // Longer than the tensor: only its front is written.
                let mut out = vec![0xAA; stream.len() * 4 + 7];
                let (streamed, bad) = stream.write(
                    &[0, 1, 2],
                    nothing(&stream),
                    dtype,
                    &mut out,
                    |_, (), chunk| pointwise(&merge, chunk),
                );
                assert_eq!(bad, 0);
                assert!(stream.values().iter().all(|v| *v == Values::Finite));
                let streamed = streamed.to_vec();
                let decoded: Vec<Vec<f32>> = operands
                    .iter()
                    .map(|(b, d)| to_f32(b, *d).expect("float"))
                    .collect();
                let mut first = decoded[0].clone();
                let rest: Vec<&[f32]> = decoded[1..].iter().map(Vec::as_slice).collect();
                merge.apply(&mut first, &rest);
                assert_eq!(streamed, from_f32(&first, dtype), "{merge:?} {dtype:?}");
            }
        }
    }

    /// A fold sees every chunk once, with the operands asked for, and notes
    /// a non-finite value in the operand it is in.
    #[test]
    fn folds_see_every_chunk_and_note_non_finite_operands() {
        let n = 2 * CHUNK + 3;
        let mut a: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let b = vec![1f32; n];
        a[CHUNK + 1] = f32::NAN;
        let (a, b) = (from_f32(&a, Dtype::F32), from_f32(&b, Dtype::F32));
        let stream = Stream::new(vec![(&a, TensorDtype::F32), (&b, TensorDtype::F32)])
            .expect("float operands");
        let ones = stream.fold(
            &[1],
            (0..stream.chunks()).map(|c| (c, ())).collect(),
            || 0f64,
            |acc, _, (), chunk| acc + chunk[0].iter().map(|v| f64::from(*v)).sum::<f64>(),
            |x, y| x + y,
        );
        assert_eq!(ones, n as f64);
        assert_eq!(stream.values(), vec![Values::Finite; 2]);
        let lens = stream.map(&[0], |_, chunk| chunk[0].len());
        assert_eq!(lens, vec![CHUNK, CHUNK, 3]);
        assert_eq!(stream.values(), vec![Values::NonFinite, Values::Finite]);
    }
}
