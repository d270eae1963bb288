//! Tensor data in and out. Input shards are memory-mapped and read one tensor
//! at a time (converted to f32, the only arithmetic type); outputs are
//! written shard by shard as tensors arrive (into the staging directory of
//! `staging.rs`). Merges that run chunk by chunk from the mapped bytes are
//! in `stream.rs`. obim's `unsafe` is here (the mmap, an uninitialised
//! decode buffer, a writeback hint) and in `staging.rs` (the `flock`).

use crate::checkpoint::{TensorDtype, TensorInfo};
use crate::recipe::Dtype;
use crate::sink::Sink;
use memmap2::Mmap;
use rayon::prelude::*;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TensorError {
    #[error("failed to read `{path}`: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to write `{path}`: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{path}`: tensor `{tensor}`: {reason}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },
    #[error("output `{0}` already exists; pass --force to replace it")]
    OutputExists(PathBuf),
    #[error("failed to rename `{from}` to `{to}`: {source}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "another obim run{} is writing `{output}` (it holds `{lock}`)",
        pid.map_or_else(String::new, |p| format!(" (pid {p})"))
    )]
    Busy {
        output: PathBuf,
        lock: PathBuf,
        pid: Option<u32>,
    },
}

/// Memory maps of the shards that have been touched, shared by all readers.
#[derive(Default)]
pub struct Shards {
    maps: HashMap<PathBuf, Arc<Mmap>>,
}

impl Shards {
    fn map(&mut self, path: &Path) -> Result<Arc<Mmap>, TensorError> {
        if let Some(m) = self.maps.get(path) {
            return Ok(m.clone());
        }
        let read = |source| TensorError::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(read)?;
        // SAFETY: the map is read-only; obim never writes input files. A file
        // truncated by another process after the header check would fault, as
        // with any mmap-based reader (safetensors, candle, mergekit via torch).
        #[expect(
            unsafe_code,
            reason = "memory-mapping input shards is the point of this module"
        )]
        let map = unsafe { Mmap::map(&file) }.map_err(read)?;
        let map = Arc::new(map);
        self.maps.insert(path.to_path_buf(), map.clone());
        Ok(map)
    }

    /// The raw bytes of one tensor.
    pub fn bytes(
        &mut self,
        name: &str,
        info: &TensorInfo,
    ) -> Result<(Arc<Mmap>, std::ops::Range<usize>), TensorError> {
        let map = self.map(&info.file)?;
        let start = (info.data_start + info.offsets.0) as usize;
        let end = (info.data_start + info.offsets.1) as usize;
        if end > map.len() {
            return Err(TensorError::Tensor {
                path: info.file.clone(),
                tensor: name.to_string(),
                reason: format!(
                    "data ends at byte {end} but the file has {} bytes (truncated since it was opened?)",
                    map.len()
                ),
            });
        }
        Ok((map, start..end))
    }

    /// Tells the kernel the tensor's pages are no longer needed, so a
    /// streamed model does not accumulate in the process's resident memory.
    pub fn release(&mut self, info: &TensorInfo) {
        if let Some(map) = self.maps.get(&info.file) {
            let start = (info.data_start + info.offsets.0) as usize;
            let len = (info.offsets.1 - info.offsets.0) as usize;
            if start + len <= map.len() && len > 0 {
                // SAFETY: MADV_DONTNEED on a read-only file mapping only drops
                // pages; the next access reads them from the file again, and no
                // slice into this range is alive (callers copy out first).
                #[expect(unsafe_code, reason = "dropping consumed pages of a read-only mapping")]
                let _ = unsafe {
                    map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len)
                };
            }
        }
    }

    /// One tensor as f32.
    pub fn load_f32(&mut self, name: &str, info: &TensorInfo) -> Result<Vec<f32>, TensorError> {
        let (map, range) = self.bytes(name, info)?;
        to_f32(&map[range], info.dtype).ok_or_else(|| TensorError::Tensor {
            path: info.file.clone(),
            tensor: name.to_string(),
            reason: format!(
                "dtype {} cannot be merged (bf16, f16 and f32 can)",
                info.dtype
            ),
        })
    }
}

const CHUNK: usize = 1 << 16;

/// Whether decoded values were all finite (checked as they are decoded:
/// no extra pass).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Values {
    Finite,
    /// Some value is NaN or ±∞.
    NonFinite,
}

impl Values {
    fn of(all_finite: bool) -> Values {
        if all_finite {
            Values::Finite
        } else {
            Values::NonFinite
        }
    }
}

/// Little-endian bytes of a floating-point dtype → f32 (NaN and ±∞ kept).
pub fn to_f32(bytes: &[u8], dtype: TensorDtype) -> Option<Vec<f32>> {
    let mut out = Vec::new();
    to_f32_into(bytes, dtype, &mut out).map(|_| out)
}

/// The same into a reused buffer (no page faults for a buffer that has
/// held a tensor this large before, and no zero-filling: every element is
/// written once), saying whether every value is finite. `None` for a
/// non-float dtype.
pub fn to_f32_into(bytes: &[u8], dtype: TensorDtype, out: &mut Vec<f32>) -> Option<Values> {
    let width = dtype
        .float_width()
        .filter(|w| bytes.len().is_multiple_of(*w))?;
    let n = bytes.len() / width;
    out.clear();
    out.reserve(n);
    let finite = out.spare_capacity_mut()[..n]
        .par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(CHUNK * width))
        .map(|(o, b)| decode_slice(b, dtype, o))
        .reduce(|| true, |a, b| a & b);
    // SAFETY: `decode_slice` wrote all `n` elements: `bytes` holds exactly
    // `n` elements of `width` bytes, and each chunk pairs with its bytes.
    #[expect(
        unsafe_code,
        reason = "skips zero-filling a buffer every element of which is written"
    )]
    unsafe {
        out.set_len(n)
    };
    Some(Values::of(finite))
}

/// A place a decoded value goes: an f32, or one not yet initialised.
pub(crate) trait Slot {
    fn set(&mut self, value: f32);
}

impl Slot for f32 {
    fn set(&mut self, value: f32) {
        *self = value;
    }
}

impl Slot for std::mem::MaybeUninit<f32> {
    fn set(&mut self, value: f32) {
        self.write(value);
    }
}

/// `out[i]` ← element `i` of `bytes` in `dtype`, for `out.len()` elements
/// (a non-float dtype writes nothing; callers check `float_width` first).
/// Returns whether every value written is finite.
pub(crate) fn decode_slice<S: Slot>(bytes: &[u8], dtype: TensorDtype, out: &mut [S]) -> bool {
    fn each<const W: usize, S: Slot>(
        bytes: &[u8],
        out: &mut [S],
        value: impl Fn([u8; W]) -> f32,
    ) -> bool {
        let mut finite = true;
        for (o, &b) in out.iter_mut().zip(bytes.as_chunks::<W>().0) {
            let v = value(b);
            finite &= v.is_finite();
            o.set(v);
        }
        finite
    }
    match dtype {
        TensorDtype::Bf16 => each(bytes, out, |b| bf16_to_f32(u16::from_le_bytes(b))),
        TensorDtype::F16 => each(bytes, out, |b| half::f16::from_le_bytes(b).to_f32()),
        TensorDtype::F32 => each(bytes, out, f32::from_le_bytes),
        _ => true,
    }
}

/// bf16 bits → f32: the upper half of an f32, exactly.
fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// f32 → bf16 bits, rounded to nearest even; NaN stays a (quiet) NaN.
fn f32_to_bf16(v: f32) -> u16 {
    let bits = v.to_bits();
    if v.is_nan() {
        return ((bits >> 16) | 0x0040) as u16;
    }
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

/// f32 → little-endian bytes of the output dtype (round to nearest even).
pub fn from_f32(values: &[f32], dtype: Dtype) -> Vec<u8> {
    let mut out = Vec::new();
    from_f32_into(values, dtype, &mut out);
    out
}

/// The same into a reused buffer, which only grows (so it is zero-filled
/// once, not per tensor); the encoded bytes are the returned front of it.
pub fn from_f32_into<'a>(values: &[f32], dtype: Dtype, out: &'a mut Vec<u8>) -> &'a [u8] {
    let size = dtype_bytes(dtype);
    let bytes = front(out, values.len() * size);
    bytes
        .par_chunks_mut(CHUNK * size)
        .zip(values.par_chunks(CHUNK))
        .for_each(|(o, v)| encode_slice(v, dtype, o));
    bytes
}

/// The first `n` elements of `buffer`, grown (zero-filled) if it is shorter.
pub(crate) fn front<T: Clone + Default>(buffer: &mut Vec<T>, n: usize) -> &mut [T] {
    if buffer.len() < n {
        buffer.resize(n, T::default());
    }
    &mut buffer[..n]
}

/// `out` ← `values` as little-endian bytes of `dtype`.
pub(crate) fn encode_slice(values: &[f32], dtype: Dtype, out: &mut [u8]) {
    match dtype {
        Dtype::Bf16 => out
            .chunks_exact_mut(2)
            .zip(values)
            .for_each(|(o, v)| o.copy_from_slice(&f32_to_bf16(*v).to_le_bytes())),
        Dtype::F16 => out
            .chunks_exact_mut(2)
            .zip(values)
            .for_each(|(o, v)| o.copy_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
        Dtype::F32 => out
            .chunks_exact_mut(4)
            .zip(values)
            .for_each(|(o, v)| o.copy_from_slice(&v.to_le_bytes())),
    }
}

pub fn dtype_bytes(dtype: Dtype) -> usize {
    match dtype {
        Dtype::Bf16 | Dtype::F16 => 2,
        Dtype::F32 => 4,
    }
}

pub fn safetensors_dtype(dtype: Dtype) -> TensorDtype {
    match dtype {
        Dtype::Bf16 => TensorDtype::Bf16,
        Dtype::F16 => TensorDtype::F16,
        Dtype::F32 => TensorDtype::F32,
    }
}

/// One tensor to be written: name, shape, bytes.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub bytes: u64,
}

/// Splits tensors, in order, into shards of at most `shard_size` bytes (a
/// tensor larger than that gets a shard of its own).
pub fn shard_layout(tensors: &[TensorSpec], shard_size: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut current = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        match shards.last_mut() {
            Some(last) if current + t.bytes <= shard_size => {
                last.push(i);
                current += t.bytes;
            }
            _ => {
                shards.push(vec![i]);
                current = t.bytes;
            }
        }
    }
    shards
}

/// File names as Hugging Face writes them: `model.safetensors` for one shard,
/// `model-00001-of-00003.safetensors` and an index for several.
pub fn shard_names(count: usize) -> Vec<String> {
    if count == 1 {
        return vec!["model.safetensors".into()];
    }
    (1..=count)
        .map(|i| format!("model-{i:05}-of-{count:05}.safetensors"))
        .collect()
}

/// Writes a checkpoint's weights shard by shard, in the order the layout fixes.
pub struct CheckpointWriter {
    dir: PathBuf,
    dtype: Dtype,
    tensors: Vec<TensorSpec>,
    layout: Vec<Vec<usize>>,
    names: Vec<String>,
    /// (shard index, position in shard) of the next tensor.
    next: usize,
    /// One past the last tensor this writer writes (all, or a part's).
    end: usize,
    /// Whether `finish` writes the index (not for one part of several).
    index: bool,
    current: Option<OpenShard>,
}

/// The shard being written.
struct OpenShard {
    index: usize,
    file: Sink,
}

impl CheckpointWriter {
    pub fn new(dir: &Path, dtype: Dtype, tensors: Vec<TensorSpec>, shard_size: u64) -> Self {
        let layout = shard_layout(&tensors, shard_size);
        let names = shard_names(layout.len());
        CheckpointWriter {
            dir: dir.to_path_buf(),
            dtype,
            end: tensors.len(),
            tensors,
            layout,
            names,
            next: 0,
            index: true,
            current: None,
        }
    }

    /// Part `k` of `n` (1-based): this writer writes only its shards (a
    /// contiguous run of the layout, shards ⌊(k−1)·S/n⌋ up to ⌊k·S/n⌋), each
    /// as `NAME.partial` renamed when whole, and no index. Returns the range
    /// of tensors to write, in order, and the range of shards.
    pub fn part(&mut self, k: usize, n: usize) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        let shards = self.layout.len() as u128;
        let (k, n) = (k as u128, n as u128);
        let (from, to) = (((k - 1) * shards / n) as usize, (k * shards / n) as usize);
        let first = self.layout[from..to]
            .first()
            .and_then(|s| s.first())
            .copied()
            .unwrap_or(self.tensors.len());
        let last = self.layout[from..to]
            .last()
            .and_then(|s| s.last())
            .map_or(first, |l| l + 1);
        self.next = first;
        self.end = last;
        self.index = false;
        (first..last, from..to)
    }

    /// Where shard `shard` is written: its name, or for a part `NAME.partial`
    /// (renamed when whole, so that a new file never truncates one an
    /// assembled output links to).
    fn staged(&self, shard: usize) -> PathBuf {
        let name = &self.names[shard];
        match self.index {
            true => self.dir.join(name),
            false => self.dir.join(format!("{name}.partial")),
        }
    }

    /// Each shard's file name and its exact size in bytes (header and data).
    pub fn shard_files(&self) -> Vec<(String, u64)> {
        (0..self.layout.len())
            .map(|shard| {
                let data: u64 = self.layout[shard]
                    .iter()
                    .map(|&i| self.tensors[i].bytes)
                    .sum();
                (
                    self.names[shard].clone(),
                    8 + self.header(shard).len() as u64 + data,
                )
            })
            .collect()
    }

    /// Writes the index of a sharded checkpoint whose shards are in place.
    pub fn write_index(&self) -> Result<(), TensorError> {
        if self.layout.len() > 1 {
            let mut map = serde_json::Map::new();
            for (shard, indices) in self.layout.iter().enumerate() {
                for &i in indices {
                    map.insert(
                        self.tensors[i].name.clone(),
                        self.names[shard].clone().into(),
                    );
                }
            }
            let total: u64 = self.tensors.iter().map(|t| t.bytes).sum();
            let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": map});
            let path = self.dir.join("model.safetensors.index.json");
            let text = serde_json::to_string_pretty(&index).unwrap_or_default();
            std::fs::write(&path, text).map_err(|source| TensorError::Write { path, source })?;
        }
        Ok(())
    }

    /// Shard `shard`'s JSON header, padded to a multiple of 8 bytes.
    fn header(&self, shard: usize) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        let mut offset = 0u64;
        for &i in &self.layout[shard] {
            let t = &self.tensors[i];
            header.insert(
                t.name.clone(),
                serde_json::json!({"dtype": safetensors_dtype(self.dtype), "shape": t.shape, "data_offsets": [offset, offset + t.bytes]}),
            );
            offset += t.bytes;
        }
        let mut json = serde_json::to_vec(&header).unwrap_or_default();
        // Pad the header to a multiple of 8 bytes, as the safetensors writer does.
        while !json.len().is_multiple_of(8) {
            json.push(b' ');
        }
        json
    }

    pub fn shard_count(&self) -> usize {
        self.layout.len()
    }

    fn shard_of(&self, tensor: usize) -> usize {
        self.layout
            .iter()
            .position(|s| s.contains(&tensor))
            .unwrap_or(0)
    }

    fn open_shard(&mut self, shard: usize) -> Result<(), TensorError> {
        let path = self.staged(shard);
        let werr = |source| TensorError::Write {
            path: path.clone(),
            source,
        };
        let json = self.header(shard);
        let mut file = Sink::create(&path).map_err(werr)?;
        file.write_all(&(json.len() as u64).to_le_bytes())
            .map_err(werr)?;
        file.write_all(&json).map_err(werr)?;
        self.current = Some(OpenShard { index: shard, file });
        Ok(())
    }

    /// Writes the next tensor; tensors must come in the order given to `new`.
    pub fn write(&mut self, name: &str, data: &[u8]) -> Result<(), TensorError> {
        let index = self.next;
        let spec = self.tensors[..self.end]
            .get(index)
            .ok_or_else(|| TensorError::Tensor {
                path: self.dir.clone(),
                tensor: name.to_string(),
                reason: "more tensors written than planned".into(),
            })?;
        if spec.name != name || spec.bytes != data.len() as u64 {
            return Err(TensorError::Tensor {
                path: self.dir.clone(),
                tensor: name.to_string(),
                reason: format!(
                    "expected `{}` with {} bytes, got {} bytes",
                    spec.name,
                    spec.bytes,
                    data.len()
                ),
            });
        }
        let shard = self.shard_of(index);
        if self.current.as_ref().map(|s| s.index) != Some(shard) {
            self.finish_shard()?;
            self.open_shard(shard)?;
        }
        if let Some(open) = self.current.as_mut() {
            let werr = |source| TensorError::Write {
                path: self.dir.join(&self.names[shard]),
                source,
            };
            open.file.write_all(data).map_err(werr)?;
        }
        self.next += 1;
        Ok(())
    }

    fn finish_shard(&mut self) -> Result<(), TensorError> {
        if let Some(OpenShard { index: shard, file }) = self.current.take() {
            let path = self.staged(shard);
            file.finish().map_err(|source| TensorError::Write {
                path: path.clone(),
                source,
            })?;
            let done = self.dir.join(&self.names[shard]);
            if path != done {
                std::fs::rename(&path, &done)
                    .map_err(|source| TensorError::Write { path: done, source })?;
            }
        }
        Ok(())
    }

    /// Closes the last shard and writes the index (when there are several).
    pub fn finish(mut self) -> Result<Vec<String>, TensorError> {
        self.finish_shard()?;
        if self.next != self.end {
            return Err(TensorError::Tensor {
                path: self.dir.clone(),
                tensor: self
                    .tensors
                    .get(self.next)
                    .map_or_else(String::new, |t| t.name.clone()),
                reason: "never written".into(),
            });
        }
        if self.index {
            self.write_index()?;
        }
        Ok(self.names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts() {
        let t = |n: &str, b| TensorSpec {
            name: n.into(),
            shape: vec![b as usize],
            bytes: b,
        };
        let tensors = vec![t("a", 4), t("b", 4), t("c", 10), t("d", 1)];
        assert_eq!(
            shard_layout(&tensors, 8),
            vec![vec![0, 1], vec![2], vec![3]]
        );
        assert_eq!(shard_layout(&tensors, 100), vec![vec![0, 1, 2, 3]]);
        assert_eq!(shard_names(1), vec!["model.safetensors"]);
        assert_eq!(shard_names(2)[1], "model-00002-of-00002.safetensors");
    }

    #[test]
    fn bf16_rounding_matches_half() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let specials = [
            0.0f32,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
            -1e-45,
        ];
        let random = (0..200_000).map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            f32::from_bits((state >> 32) as u32)
        });
        for v in specials.into_iter().chain(random) {
            let ours = f32_to_bf16(v);
            let theirs = half::bf16::from_f32(v);
            if v.is_nan() {
                assert!(half::bf16::from_bits(ours).is_nan(), "{v}");
            } else {
                assert_eq!(ours, theirs.to_bits(), "{v:e} ({:#x})", v.to_bits());
            }
            assert_eq!(
                bf16_to_f32(theirs.to_bits()).to_bits(),
                theirs.to_f32().to_bits()
            );
        }
        // Exact ties round to even.
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
    }

    #[test]
    fn conversions_round_trip() {
        let v = vec![1.0f32, -2.5, 0.1, 65504.0];
        for d in [Dtype::Bf16, Dtype::F16, Dtype::F32] {
            let name = safetensors_dtype(d);
            let back = to_f32(&from_f32(&v, d), name).unwrap();
            for (a, b) in v.iter().zip(&back) {
                assert!((a - b).abs() <= a.abs() * 1e-2, "{d:?}: {a} vs {b}");
            }
        }
    }
}
