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

/// Runs `sequences` through `model` layer by layer and returns the statistics.
pub fn calibrate(
    model: &ModelInfo,
    sequences: &[Vec<u32>],
    device: &Device,
) -> Result<ActStats, CalibrationError> {
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
        let tmp = path.with_extension("safetensors.partial");
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
