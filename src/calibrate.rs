//! Calibration: the statistics OBD saliency needs, from real forward passes.
//!
//! For every linear module (q/k/v/o_proj, gate/up/down_proj, lm_head),
//! `d_j = Σ_t x_{t,j}²` of the module's input over all calibration tokens,
//! accumulated in f64, plus the token count. The model runs layer by layer
//! (DESIGN §4): the hidden states of all sequences stay in memory, one
//! decoder layer's weights are read (mmap, one tensor at a time), every
//! sequence goes through it, the layer is dropped. Peak memory is one layer
//! plus the activations, whatever the model's depth.
//!
//! Statistics are stored as safetensors with the fixtures' key names
//! (`<module>` f32 `[in_features]`, `n_tokens` i64 `[1]`), and cached under a
//! key that hashes the model's checkpoint and the exact token ids, so any
//! change of data, tokenizer, `samples`, `seq_len` or `seed` misses the cache
//! and anything else (a retention ratio) hits it.

use crate::checkpoint::ModelInfo;
use crate::model::ModelConfig;
use crate::model::blocks::{self, ForwardError, Observer, Weights};
use crate::model::stream;
use candle_core::{Device, Tensor};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Statistics of one model on one data source.
#[derive(Debug, Clone, PartialEq)]
pub struct ActStats {
    /// Module name → Σ_t x_j², rounded to f32 (as stored).
    pub sums: BTreeMap<String, Vec<f32>>,
    pub tokens: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CalibrationError {
    #[error("`{dir}`: {source}")]
    Config {
        dir: PathBuf,
        source: crate::model::ConfigError,
    },
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error("no calibration tokens")]
    NoTokens,
    #[error("token id {id} is outside the vocabulary ({vocab} tokens) of `{dir}`")]
    Vocab { id: u32, vocab: usize, dir: PathBuf },
    #[error("statistics file `{path}`: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("statistics file `{path}`")]
    FileIo {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("statistics file `{path}`")]
    Format {
        path: PathBuf,
        source: safetensors::SafeTensorError,
    },
}

/// Accumulates Σ x² per input feature of every observed module.
#[derive(Default)]
struct SquareSums {
    sums: HashMap<String, Vec<f64>>,
}

impl Observer for SquareSums {
    fn observe(&mut self, modules: &[String], x: &Tensor) -> blocks::Result<()> {
        let cols = x.dim(1)?;
        let values = x.flatten_all()?.to_vec1::<f32>()?;
        let mut acc = vec![0f64; cols];
        for row in values.chunks_exact(cols) {
            for (a, v) in acc.iter_mut().zip(row) {
                let v = f64::from(*v);
                *a += v * v;
            }
        }
        for m in modules {
            let sum = self
                .sums
                .entry(m.clone())
                .or_insert_with(|| vec![0.0; cols]);
            for (s, a) in sum.iter_mut().zip(&acc) {
                *s += a;
            }
        }
        Ok(())
    }
}

/// The model's config and the sequences' token count, after checking that
/// there are tokens and that every id is in the vocabulary.
fn checked(
    model: &ModelInfo,
    sequences: &[Vec<u32>],
) -> Result<(ModelConfig, usize), CalibrationError> {
    let cfg = ModelConfig::of(model).map_err(|source| CalibrationError::Config {
        dir: model.dir.clone(),
        source,
    })?;
    let tokens: usize = sequences.iter().map(Vec::len).sum();
    if tokens == 0 {
        return Err(CalibrationError::NoTokens);
    }
    if let Some(&id) = sequences
        .iter()
        .flatten()
        .find(|&&id| id as usize >= cfg.vocab_size)
    {
        return Err(CalibrationError::Vocab {
            id,
            vocab: cfg.vocab_size,
            dir: model.dir.clone(),
        });
    }
    Ok((cfg, tokens))
}

/// Runs `sequences` through `model` layer by layer and returns the statistics.
pub fn calibrate(
    model: &ModelInfo,
    sequences: &[Vec<u32>],
    device: &Device,
) -> Result<ActStats, CalibrationError> {
    let (cfg, tokens) = checked(model, sequences)?;
    let mut weights = Weights::new(model, device.clone());
    let mut observer = SquareSums::default();
    stream::pass(&cfg, &mut weights, sequences, &mut observer)?;
    Ok(ActStats {
        sums: observer
            .sums
            .into_iter()
            .map(|(k, v)| (k, v.into_iter().map(|x| x as f32).collect()))
            .collect(),
        tokens: tokens as u64,
    })
}

impl ActStats {
    /// Writes the statistics as safetensors (via a temporary file, renamed):
    /// one F32 vector per module and the token count as I64 `n_tokens`.
    pub fn save(&self, path: &Path) -> Result<(), CalibrationError> {
        let fail = |reason: String| CalibrationError::File {
            path: path.to_path_buf(),
            reason,
        };
        let mut bytes: Vec<(String, Dtype, usize, Vec<u8>)> = self
            .sums
            .iter()
            .map(|(name, sums)| {
                let data = sums.iter().flat_map(|x| x.to_le_bytes()).collect();
                (name.clone(), Dtype::F32, sums.len(), data)
            })
            .collect();
        let n = (self.tokens as i64).to_le_bytes().to_vec();
        bytes.push(("n_tokens".to_string(), Dtype::I64, 1, n));
        let views = bytes
            .iter()
            .map(|(name, dtype, len, data)| {
                TensorView::new(*dtype, vec![*len], data)
                    .map(|v| (name.as_str(), v))
                    .map_err(|e| fail(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        // A name of this process's own: parts of one run may calibrate at once.
        let tmp = path.with_extension(format!("safetensors.{}", unique_suffix()));
        safetensors::serialize_to_file(views, None, &tmp).map_err(|source| {
            CalibrationError::Format {
                path: tmp.clone(),
                source,
            }
        })?;
        std::fs::rename(&tmp, path).map_err(io(path))
    }

    /// Reads statistics written by [`ActStats::save`]; keys under `prefix`
    /// (`""`, or e.g. `"expert_add/add/"` in the fixtures' reference file).
    pub fn load(path: &Path, prefix: &str) -> Result<ActStats, CalibrationError> {
        let fail = |reason: String| CalibrationError::File {
            path: path.to_path_buf(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(io(path))?;
        let file = SafeTensors::deserialize(&bytes).map_err(|source| CalibrationError::Format {
            path: path.to_path_buf(),
            source,
        })?;
        let mut sums = BTreeMap::new();
        let mut tokens = None;
        for (key, t) in file.tensors() {
            let Some(name) = key.strip_prefix(prefix) else {
                continue;
            };
            match (name, t.dtype()) {
                ("n_tokens", Dtype::I64) => {
                    tokens = t.data().first_chunk::<8>().map(|b| i64::from_le_bytes(*b));
                }
                (_, Dtype::F32) if !name.contains('/') => {
                    let (chunks, _) = t.data().as_chunks::<4>();
                    sums.insert(
                        name.to_string(),
                        chunks.iter().map(|b| f32::from_le_bytes(*b)).collect(),
                    );
                }
                (_, dtype) if !name.contains('/') => {
                    return Err(fail(format!(
                        "`{key}` is {dtype:?}, expected F32 (I64 for n_tokens)"
                    )));
                }
                _ => {}
            }
        }
        let tokens = tokens.ok_or_else(|| fail(format!("no `{prefix}n_tokens`")))?;
        Ok(ActStats {
            sums,
            tokens: tokens as u64,
        })
    }
}

/// An I/O error on `path` as a calibration error.
fn io(path: &Path) -> impl Fn(std::io::Error) -> CalibrationError + '_ {
    move |source| CalibrationError::FileIo {
        path: path.to_path_buf(),
        source,
    }
}

/// The cache key of a model's statistics on given token sequences.
pub fn cache_key(model: &ModelInfo, sequences: &[Vec<u32>]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"obim actstats v1\0");
    h.update(model.hash.as_bytes());
    hash_tokens(&mut h, sequences);
    h.finalize().to_hex()[..32].to_string()
}

/// Feeds token sequences (with their lengths) into a cache key.
pub fn hash_tokens(h: &mut blake3::Hasher, sequences: &[Vec<u32>]) {
    for s in sequences {
        h.update(&(s.len() as u64).to_le_bytes());
        for id in s {
            h.update(&id.to_le_bytes());
        }
    }
}

/// Where cached statistics of that key live.
pub fn cache_path(cache: &Path, key: &str) -> PathBuf {
    cache.join("actstats").join(format!("{key}.safetensors"))
}

/// Which moments of the linear inputs a calibration collects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Moments {
    /// Σ x² per input feature (OBD's diagonal Hessian).
    Diagonal,
    /// Σ x xᵀ, the whole Gram matrix (RegMean).
    Gram,
}

/// A model's Gram matrices on one data source, as written by [`gram`]: one
/// safetensors file per decoder layer (and one for `lm_head`) in a cache
/// directory, so neither the calibration nor a merge holds more than one
/// layer's matrices. Modules that read the same input (q/k/v, gate/up)
/// share one matrix.
#[derive(Debug, Clone)]
pub struct Grams {
    pub dir: PathBuf,
    pub tokens: u64,
    /// Module → (file in `dir`, tensor key in it, in_features).
    modules: BTreeMap<String, (String, String, usize)>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct GramIndex {
    tokens: u64,
    /// Module → [file, key, in_features].
    modules: BTreeMap<String, (String, String, usize)>,
}

/// Accumulates Σ x xᵀ (f64) of every observed input, one layer at a time:
/// when a module of the next layer shows up, the finished layer's matrices
/// are written to `dir` and dropped.
struct GramSums {
    dir: PathBuf,
    layer: Option<String>,
    /// First module → (every module reading that input, d, Σ x xᵀ).
    current: BTreeMap<String, (Vec<String>, usize, Vec<f64>)>,
    index: BTreeMap<String, (String, String, usize)>,
    files: usize,
    failed: Option<CalibrationError>,
}

/// `model.layers.3` for `model.layers.3.mlp.up_proj`; `lm_head` for itself.
fn layer_of(module: &str) -> &str {
    let mut dots = module.match_indices('.').map(|(i, _)| i);
    match (dots.next(), dots.next(), dots.next()) {
        (Some(_), Some(_), Some(end)) if module.starts_with("model.layers.") => &module[..end],
        _ => module,
    }
}

impl GramSums {
    fn flush(&mut self) -> Result<(), CalibrationError> {
        if self.current.is_empty() {
            return Ok(());
        }
        let file = format!("{:04}.safetensors", self.files);
        self.files += 1;
        let path = self.dir.join(&file);
        let fail = |reason: String| CalibrationError::File {
            path: path.clone(),
            reason,
        };
        let current = std::mem::take(&mut self.current);
        let bytes: Vec<(String, usize, Vec<u8>)> = current
            .iter()
            .map(|(key, (_, d, sums))| {
                let data = sums
                    .iter()
                    .flat_map(|x| (*x as f32).to_le_bytes())
                    .collect();
                (key.clone(), *d, data)
            })
            .collect();
        let views = bytes
            .iter()
            .map(|(key, d, data)| {
                TensorView::new(Dtype::F32, vec![*d, *d], data)
                    .map(|v| (key.as_str(), v))
                    .map_err(|e| fail(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        safetensors::serialize_to_file(views, None, &path).map_err(|source| {
            CalibrationError::Format {
                path: path.clone(),
                source,
            }
        })?;
        for (key, (modules, d, _)) in current {
            for m in modules {
                self.index.insert(m, (file.clone(), key.clone(), d));
            }
        }
        Ok(())
    }
}

impl Observer for GramSums {
    fn observe(&mut self, modules: &[String], x: &Tensor) -> blocks::Result<()> {
        let Some(first) = modules.first() else {
            return Ok(());
        };
        if self.failed.is_some() {
            return Ok(());
        }
        let layer = layer_of(first);
        if self.layer.as_deref() != Some(layer) {
            if let Err(e) = self.flush() {
                self.failed = Some(e);
                return Ok(());
            }
            self.layer = Some(layer.to_string());
        }
        let x = x.to_dtype(candle_core::DType::F64)?;
        let d = x.dim(1)?;
        let gram = x.t()?.matmul(&x)?.flatten_all()?.to_vec1::<f64>()?;
        let (_, _, sums) = self
            .current
            .entry(first.clone())
            .or_insert_with(|| (modules.to_vec(), d, vec![0.0; d * d]));
        for (s, g) in sums.iter_mut().zip(&gram) {
            *s += g;
        }
        Ok(())
    }
}

/// Runs `sequences` through `model` layer by layer and writes the Gram
/// matrix of every linear input into `dir` (made anew; a partial directory
/// beside it is renamed into place when complete).
pub fn gram(
    model: &ModelInfo,
    sequences: &[Vec<u32>],
    device: &Device,
    dir: &Path,
) -> Result<Grams, CalibrationError> {
    let (cfg, tokens) = checked(model, sequences)?;
    let partial = dir.with_extension(unique_suffix());
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).map_err(io(&partial))?;
    let mut observer = GramSums {
        dir: partial.clone(),
        layer: None,
        current: BTreeMap::new(),
        index: BTreeMap::new(),
        files: 0,
        failed: None,
    };
    let mut weights = Weights::new(model, device.clone());
    let passed = stream::pass(&cfg, &mut weights, sequences, &mut observer);
    let flushed = observer.flush();
    let written = match (passed, observer.failed.take(), flushed) {
        (Err(e), _, _) => Err(e.into()),
        (_, Some(e), _) | (_, _, Err(e)) => Err(e),
        _ => {
            let index = GramIndex {
                tokens: tokens as u64,
                modules: observer.index,
            };
            let json = serde_json::to_vec_pretty(&index).expect("the index serialises");
            let path = partial.join("index.json");
            std::fs::write(&path, json).map_err(io(&path))
        }
    };
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(e);
    }
    // Another process (a part of the same run) may have finished first:
    // its matrices are the same, and may be in use.
    if dir.join("index.json").is_file() {
        let _ = std::fs::remove_dir_all(&partial);
        return Grams::load(dir);
    }
    if std::fs::rename(&partial, dir).is_err() {
        if dir.join("index.json").is_file() {
            // Renamed into place by another process meanwhile.
            let _ = std::fs::remove_dir_all(&partial);
        } else {
            // A directory without an index is a leftover (a rename is whole).
            let _ = std::fs::remove_dir_all(dir);
            std::fs::rename(&partial, dir).map_err(io(dir))?;
        }
    }
    Grams::load(dir)
}

/// `partial-PID-NANOS`: a temporary name no other process (on this machine
/// or another sharing the cache) picks.
fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("partial-{}-{nanos}", std::process::id())
}

impl Grams {
    /// Reads the index of Gram matrices written by [`gram`].
    pub fn load(dir: &Path) -> Result<Grams, CalibrationError> {
        let path = dir.join("index.json");
        let text = std::fs::read(&path).map_err(io(&path))?;
        let index: GramIndex =
            serde_json::from_slice(&text).map_err(|e| CalibrationError::File {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        Ok(Grams {
            dir: dir.to_path_buf(),
            tokens: index.tokens,
            modules: index.modules,
        })
    }

    /// Whether `module` (e.g. `model.layers.0.self_attn.q_proj`) has a matrix.
    pub fn has(&self, module: &str) -> bool {
        self.modules.contains_key(module)
    }

    /// The Gram matrix of `module`'s input, `[d, d]` row-major: its layer's
    /// file's header, then only this matrix's bytes, are read.
    pub fn matrix(&self, module: &str) -> Result<Option<Vec<f32>>, CalibrationError> {
        use std::io::{Read, Seek, SeekFrom};
        let Some((file, key, d)) = self.modules.get(module) else {
            return Ok(None);
        };
        let path = self.dir.join(file);
        let fail = |reason: String| CalibrationError::File {
            path: path.clone(),
            reason,
        };
        let mut handle = std::fs::File::open(&path).map_err(io(&path))?;
        let mut len = [0u8; 8];
        handle.read_exact(&mut len).map_err(io(&path))?;
        let len = u64::from_le_bytes(len);
        if len > 100_000_000 {
            return Err(fail(format!("a header of {len} bytes")));
        }
        let mut header = vec![0u8; len as usize];
        handle.read_exact(&mut header).map_err(io(&path))?;
        let header: serde_json::Value =
            serde_json::from_slice(&header).map_err(|e| fail(e.to_string()))?;
        let entry = &header[key.as_str()];
        let offsets = entry["data_offsets"]
            .as_array()
            .and_then(|o| Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?)));
        let wanted = serde_json::json!([d, d]);
        let (Some((start, end)), Some("F32"), true) =
            (offsets, entry["dtype"].as_str(), entry["shape"] == wanted)
        else {
            return Err(fail(format!("no F32 [{d}, {d}] tensor `{key}`")));
        };
        if end - start != (d * d * 4) as u64 {
            return Err(fail(format!("`{key}` has {} bytes", end - start)));
        }
        let mut bytes = vec![0u8; d * d * 4];
        handle
            .seek(SeekFrom::Start(8 + len + start))
            .and_then(|_| handle.read_exact(&mut bytes))
            .map_err(io(&path))?;
        let (chunks, _) = bytes.as_chunks::<4>();
        Ok(Some(
            chunks.iter().map(|b| f32::from_le_bytes(*b)).collect(),
        ))
    }
}

/// The cache key of a model's statistics on given token sequences.
pub fn moments_key(moments: Moments, model: &ModelInfo, sequences: &[Vec<u32>]) -> String {
    match moments {
        Moments::Diagonal => cache_key(model, sequences),
        Moments::Gram => {
            let mut h = blake3::Hasher::new();
            h.update(b"obim gram v1\0");
            h.update(model.hash.as_bytes());
            hash_tokens(&mut h, sequences);
            h.finalize().to_hex()[..32].to_string()
        }
    }
}

/// Where cached Gram matrices of that key live.
pub fn gram_path(cache: &Path, key: &str) -> PathBuf {
    cache.join("grams").join(key)
}
