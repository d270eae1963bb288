//! Tensor data in and out. Input shards are memory-mapped and read one tensor
//! at a time (converted to f32, the only arithmetic type); outputs are
//! written shard by shard as tensors arrive, into a staging directory that
//! is renamed into place only when complete. The only `unsafe` in obim is the
//! mmap here.

use crate::checkpoint::TensorInfo;
use crate::recipe::Dtype;
use memmap2::Mmap;
use rayon::prelude::*;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
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
        to_f32(&map[range], &info.dtype).ok_or_else(|| TensorError::Tensor {
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

/// Little-endian bytes of a floating-point dtype → f32.
pub fn to_f32(bytes: &[u8], dtype: &str) -> Option<Vec<f32>> {
    let mut out = Vec::new();
    to_f32_into(bytes, dtype, &mut out).then_some(out)
}

/// The same into a reused buffer (no page faults for a buffer that has
/// held a tensor this large before; zero-filled only where it grows).
/// False for a non-float dtype.
pub fn to_f32_into(bytes: &[u8], dtype: &str, out: &mut Vec<f32>) -> bool {
    match dtype {
        "BF16" => decode(bytes, out, |b| bf16_to_f32(u16::from_le_bytes(b))),
        "F16" => decode(bytes, out, |b| half::f16::from_le_bytes(b).to_f32()),
        "F32" => decode(bytes, out, f32::from_le_bytes),
        _ => return false,
    }
    true
}

/// `out` ← `value` of each `W`-byte element of `bytes`, in parallel chunks.
fn decode<const W: usize>(bytes: &[u8], out: &mut Vec<f32>, value: impl Fn([u8; W]) -> f32 + Sync) {
    let n = bytes.len() / W;
    if out.len() < n {
        out.resize(n, 0.0);
    } else {
        out.truncate(n);
    }
    out.par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(CHUNK * W))
        .for_each(|(o, b)| {
            for (o, &b) in o.iter_mut().zip(b.as_chunks::<W>().0) {
                *o = value(b);
            }
        });
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

/// The same into a reused buffer (zero-filled only where it grows).
pub fn from_f32_into(values: &[f32], dtype: Dtype, out: &mut Vec<u8>) {
    let size = dtype_bytes(dtype);
    let n = values.len() * size;
    if out.len() < n {
        out.resize(n, 0);
    } else {
        out.truncate(n);
    }
    out.par_chunks_mut(CHUNK * size)
        .zip(values.par_chunks(CHUNK))
        .for_each(|(o, v)| match dtype {
            Dtype::Bf16 => o
                .chunks_exact_mut(2)
                .zip(v)
                .for_each(|(o, v)| o.copy_from_slice(&f32_to_bf16(*v).to_le_bytes())),
            Dtype::F16 => o
                .chunks_exact_mut(2)
                .zip(v)
                .for_each(|(o, v)| o.copy_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
            Dtype::F32 => o
                .chunks_exact_mut(4)
                .zip(v)
                .for_each(|(o, v)| o.copy_from_slice(&v.to_le_bytes())),
        });
}

pub fn dtype_bytes(dtype: Dtype) -> usize {
    match dtype {
        Dtype::Bf16 | Dtype::F16 => 2,
        Dtype::F32 => 4,
    }
}

pub fn safetensors_dtype(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::Bf16 => "BF16",
        Dtype::F16 => "F16",
        Dtype::F32 => "F32",
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
    current: Option<(usize, BufWriter<File>)>,
}

impl CheckpointWriter {
    pub fn new(dir: &Path, dtype: Dtype, tensors: Vec<TensorSpec>, shard_size: u64) -> Self {
        let layout = shard_layout(&tensors, shard_size);
        let names = shard_names(layout.len());
        CheckpointWriter {
            dir: dir.to_path_buf(),
            dtype,
            tensors,
            layout,
            names,
            next: 0,
            current: None,
        }
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
        let path = self.dir.join(&self.names[shard]);
        let werr = |source| TensorError::Write {
            path: path.clone(),
            source,
        };
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
        let mut json = serde_json::to_vec(&header).map_err(|e| werr(std::io::Error::other(e)))?;
        // Pad the header to a multiple of 8 bytes, as the safetensors writer does.
        while json.len() % 8 != 0 {
            json.push(b' ');
        }
        let mut file = BufWriter::with_capacity(1 << 20, File::create(&path).map_err(werr)?);
        file.write_all(&(json.len() as u64).to_le_bytes())
            .map_err(werr)?;
        file.write_all(&json).map_err(werr)?;
        self.current = Some((shard, file));
        Ok(())
    }

    /// Writes the next tensor; tensors must come in the order given to `new`.
    pub fn write(&mut self, name: &str, data: &[u8]) -> Result<(), TensorError> {
        let index = self.next;
        let spec = self.tensors.get(index).ok_or_else(|| TensorError::Tensor {
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
        if self.current.as_ref().map(|(s, _)| *s) != Some(shard) {
            self.finish_shard()?;
            self.open_shard(shard)?;
        }
        let path = self.dir.join(&self.names[shard]);
        if let Some((_, file)) = self.current.as_mut() {
            file.write_all(data)
                .map_err(|source| TensorError::Write { path, source })?;
        }
        self.next += 1;
        Ok(())
    }

    fn finish_shard(&mut self) -> Result<(), TensorError> {
        if let Some((shard, mut file)) = self.current.take() {
            let path = self.dir.join(&self.names[shard]);
            file.flush().map_err(|source| TensorError::Write {
                path: path.clone(),
                source,
            })?;
            file.get_ref()
                .sync_all()
                .map_err(|source| TensorError::Write { path, source })?;
        }
        Ok(())
    }

    /// Closes the last shard and writes the index (when there are several).
    pub fn finish(mut self) -> Result<Vec<String>, TensorError> {
        self.finish_shard()?;
        if self.next != self.tensors.len() {
            return Err(TensorError::Tensor {
                path: self.dir.clone(),
                tensor: self
                    .tensors
                    .get(self.next)
                    .map_or_else(String::new, |t| t.name.clone()),
                reason: "never written".into(),
            });
        }
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
        Ok(self.names)
    }
}

/// A directory being written beside its final place: removed if dropped
/// before [`Staging::commit`], so a failed or interrupted run leaves no half
/// output and the previous output intact.
pub struct Staging {
    target: PathBuf,
    temp: PathBuf,
    committed: bool,
}

impl Staging {
    pub fn new(target: &Path, force: bool) -> Result<Staging, TensorError> {
        if target.exists() && !force {
            return Err(TensorError::OutputExists(target.to_path_buf()));
        }
        let parent = target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = target
            .file_name()
            .map_or_else(|| "output".into(), |n| n.to_string_lossy().into_owned());
        std::fs::create_dir_all(parent).map_err(|source| TensorError::Write {
            path: parent.to_path_buf(),
            source,
        })?;
        let temp = parent.join(format!(".{name}.obim-partial-{}", std::process::id()));
        if temp.exists() {
            let _ = std::fs::remove_dir_all(&temp);
        }
        std::fs::create_dir(&temp).map_err(|source| TensorError::Write {
            path: temp.clone(),
            source,
        })?;
        Ok(Staging {
            target: target.to_path_buf(),
            temp,
            committed: false,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.temp
    }

    /// Moves the finished directory into place (replacing the old one, which
    /// is kept until the new one is there).
    pub fn commit(mut self) -> Result<(), TensorError> {
        let werr = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TensorError::Write { path, source }
        };
        let old = self.temp.with_extension("old");
        if self.target.exists() {
            std::fs::rename(&self.target, &old).map_err(werr(&self.target))?;
        }
        std::fs::rename(&self.temp, &self.target).map_err(werr(&self.target))?;
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(werr(&old))?;
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.temp);
        }
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
