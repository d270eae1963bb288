//! PEFT LoRA adapters as merge inputs: `model chat = lora("./adapter",
//! base: llama)` is the base's checkpoint with W + s·B·A added to every
//! weight the adapter targets, on the fly as each tensor is read (no merged
//! copy on disk). s = lora_alpha / r, or lora_alpha / √r with `use_rslora`;
//! with `fan_in_fan_out` the weight is stored transposed (GPT-2's Conv1D),
//! and so is the product. As peft's `merge_and_unload` computes it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("`{path}`: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{path}`: not a PEFT LoRA adapter config: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("`{path}`: {reason}")]
    Weights { path: PathBuf, reason: String },
}

/// One targeted weight's factors: A is r × in, B is out × r (row-major f32).
#[derive(Debug, Clone)]
struct Factors {
    a: Vec<f32>,
    b: Vec<f32>,
    rank: usize,
    inputs: usize,
    outputs: usize,
}

#[derive(Debug, Clone)]
pub struct Adapter {
    pub dir: PathBuf,
    scaling: f32,
    fan_in_fan_out: bool,
    /// By the base checkpoint's weight name (`model.layers.0.self_attn.q_proj.weight`).
    factors: HashMap<String, Factors>,
    /// blake3 of the adapter's config and weights.
    pub hash: String,
}

impl Adapter {
    /// Reads `adapter_config.json` and `adapter_model.safetensors` from `dir`.
    pub fn open(dir: &Path) -> Result<Adapter, LoraError> {
        let config_path = dir.join("adapter_config.json");
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| LoraError::Read {
                path: path.to_path_buf(),
                source,
            })
        };
        let config_bytes = read(&config_path)?;
        let bad = |reason: String| LoraError::Config {
            path: config_path.clone(),
            reason,
        };
        let config: serde_json::Value =
            serde_json::from_slice(&config_bytes).map_err(|e| bad(e.to_string()))?;
        if let Some(kind) = config["peft_type"].as_str()
            && kind != "LORA"
        {
            return Err(bad(format!(
                "peft_type is {kind}; obim reads LoRA adapters"
            )));
        }
        let rank = config["r"]
            .as_f64()
            .filter(|r| *r > 0.0)
            .ok_or_else(|| bad("no positive `r`".into()))?;
        let alpha = config["lora_alpha"].as_f64().unwrap_or(rank);
        for pattern in ["rank_pattern", "alpha_pattern"] {
            if config[pattern].as_object().is_some_and(|p| !p.is_empty()) {
                return Err(bad(format!(
                    "`{pattern}` (per-module ranks) is not supported yet"
                )));
            }
        }
        if config["use_dora"].as_bool() == Some(true) {
            return Err(bad("DoRA adapters (`use_dora`) are not supported".into()));
        }
        let scaling = if config["use_rslora"].as_bool() == Some(true) {
            alpha / rank.sqrt()
        } else {
            alpha / rank
        } as f32;
        let weights_path = dir.join("adapter_model.safetensors");
        let bytes = read(&weights_path)?;
        let wbad = |reason: String| LoraError::Weights {
            path: weights_path.clone(),
            reason,
        };
        let tensors =
            safetensors::SafeTensors::deserialize(&bytes).map_err(|e| wbad(e.to_string()))?;
        // By weight name: lora_A and lora_B, each values and shape.
        type Half = Option<(Vec<f32>, Vec<usize>)>;
        let mut halves: HashMap<String, (Half, Half)> = HashMap::new();
        for (name, view) in tensors.tensors() {
            let (module, is_a) = match (
                name.strip_suffix(".lora_A.weight"),
                name.strip_suffix(".lora_B.weight"),
            ) {
                (Some(m), _) => (m, true),
                (_, Some(m)) => (m, false),
                _ => {
                    return Err(wbad(format!(
                        "`{name}` is not a LoRA factor (lora_A/lora_B); such adapters are not supported yet"
                    )));
                }
            };
            let module = module.strip_prefix("base_model.model.").unwrap_or(module);
            let dtype = match view.dtype() {
                safetensors::Dtype::F32 => crate::checkpoint::TensorDtype::F32,
                safetensors::Dtype::F16 => crate::checkpoint::TensorDtype::F16,
                safetensors::Dtype::BF16 => crate::checkpoint::TensorDtype::Bf16,
                other => return Err(wbad(format!("`{name}` has dtype {other:?}"))),
            };
            let values = crate::tensors::to_f32(view.data(), dtype)
                .ok_or_else(|| wbad(format!("`{name}` cannot be decoded")))?;
            let entry = halves.entry(format!("{module}.weight")).or_default();
            let half = Some((values, view.shape().to_vec()));
            if is_a {
                entry.0 = half;
            } else {
                entry.1 = half;
            }
        }
        let mut factors = HashMap::new();
        for (weight, pair) in halves {
            let (Some((a, a_shape)), Some((b, b_shape))) = pair else {
                return Err(wbad(format!(
                    "`{weight}` has only one of lora_A and lora_B"
                )));
            };
            let (&[r, inputs], &[outputs, r2]) = (&a_shape[..], &b_shape[..]) else {
                return Err(wbad(format!("`{weight}`: the factors are not matrices")));
            };
            if r != r2 {
                return Err(wbad(format!(
                    "`{weight}`: lora_A has rank {r}, lora_B {r2}"
                )));
            }
            factors.insert(
                weight,
                Factors {
                    a,
                    b,
                    rank: r,
                    inputs,
                    outputs,
                },
            );
        }
        let mut h = blake3::Hasher::new();
        h.update(&config_bytes);
        h.update(&bytes);
        Ok(Adapter {
            dir: dir.to_path_buf(),
            scaling,
            fan_in_fan_out: config["fan_in_fan_out"].as_bool() == Some(true),
            factors,
            hash: h.finalize().to_hex().to_string(),
        })
    }

    /// Whether the adapter changes tensor `name`.
    pub fn targets(&self, name: &str) -> bool {
        self.factors.contains_key(name)
    }

    /// The targeted weights, by name.
    pub fn targeted(&self) -> impl Iterator<Item = &str> {
        self.factors.keys().map(String::as_str)
    }

    /// Adds s·B·A to `values`, the base's tensor `name` of `shape`.
    pub fn apply(&self, name: &str, values: &mut [f32], shape: &[usize]) -> Result<(), String> {
        let Some(f) = self.factors.get(name) else {
            return Ok(());
        };
        let (rows, cols) = if self.fan_in_fan_out {
            (f.inputs, f.outputs)
        } else {
            (f.outputs, f.inputs)
        };
        if shape != [rows, cols] {
            return Err(format!(
                "the adapter's factors make a [{rows}, {cols}] update, the tensor is {shape:?}"
            ));
        }
        let (s, r, fan) = (self.scaling, f.rank, self.fan_in_fan_out);
        values
            .par_chunks_mut(cols)
            .enumerate()
            .for_each(|(row, out)| {
                for (col, w) in out.iter_mut().enumerate() {
                    // (B·A)[o, i] = Σ_k B[o, k]·A[k, i]; transposed when fan_in_fan_out.
                    let (o, i) = if fan { (col, row) } else { (row, col) };
                    let mut dot = 0f32;
                    for k in 0..r {
                        dot += f.b[o * r + k] * f.a[k * f.inputs + i];
                    }
                    *w += dot * s;
                }
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_is_scaled_product_of_the_factors() {
        let adapter = Adapter {
            dir: PathBuf::new(),
            scaling: 2.0,
            fan_in_fan_out: false,
            factors: HashMap::from([(
                "w".to_string(),
                Factors {
                    // A: 1 × 3, B: 2 × 1.
                    a: vec![1.0, 2.0, 3.0],
                    b: vec![1.0, -1.0],
                    rank: 1,
                    inputs: 3,
                    outputs: 2,
                },
            )]),
            hash: String::new(),
        };
        let mut w = vec![0.0f32; 6];
        adapter.apply("w", &mut w, &[2, 3]).unwrap();
        assert_eq!(w, vec![2.0, 4.0, 6.0, -2.0, -4.0, -6.0]);
        assert!(adapter.apply("w", &mut w, &[3, 2]).is_err());
        let mut untouched = vec![1.0f32; 2];
        adapter.apply("other", &mut untouched, &[2]).unwrap();
        assert_eq!(untouched, vec![1.0, 1.0]);
    }
}
