//! The architectures obim runs forward passes of (Llama 2/3, Mistral, Qwen2):
//! their configuration read from `config.json` ([`ModelConfig`]), and the one
//! shared implementation of their blocks ([`blocks`]). What differs between
//! them is configuration (GQA, rope theta and scaling, sliding window) and
//! which tensors exist (q/k/v biases, a tied `lm_head`), both read here.

pub mod blocks;
pub mod stream;

use crate::checkpoint::ModelInfo;
use serde_json::Value;

/// The architectures with a forward pass, by `architectures[0]`.
pub const SUPPORTED: &[&str] = &["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];

#[derive(Debug, Clone, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "architecture `{0}` has no forward pass in obim (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)"
    )]
    Unsupported(String),
    #[error("config.json has no `architectures`")]
    NoArchitecture,
    #[error("config.json: `{0}` is missing or not a number")]
    Missing(&'static str),
    #[error("config.json: {0}")]
    Invalid(String),
}

/// How rotary frequencies are scaled (`rope_scaling` / `rope_parameters`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub rms_norm_eps: f64,
    /// Keys further back than this many positions are masked (Mistral).
    pub sliding_window: Option<usize>,
    /// `lm_head` is `embed_tokens` (no `lm_head.weight` tensor).
    pub tied_embeddings: bool,
}

fn number(config: &Value, key: &'static str) -> Result<f64, ConfigError> {
    config
        .get(key)
        .and_then(Value::as_f64)
        .ok_or(ConfigError::Missing(key))
}

fn count(config: &Value, key: &'static str) -> Result<usize, ConfigError> {
    config
        .get(key)
        .and_then(Value::as_u64)
        .map(|n| n as usize)
        .ok_or(ConfigError::Missing(key))
}

impl ModelConfig {
    /// Reads the configuration of a supported architecture.
    pub fn of(model: &ModelInfo) -> Result<ModelConfig, ConfigError> {
        let architecture = model
            .architecture
            .clone()
            .ok_or(ConfigError::NoArchitecture)?;
        if !SUPPORTED.contains(&architecture.as_str()) {
            return Err(ConfigError::Unsupported(architecture));
        }
        let c = &model.config;
        let hidden_size = count(c, "hidden_size")?;
        let num_heads = count(c, "num_attention_heads")?;
        let num_kv_heads = count(c, "num_key_value_heads").unwrap_or(num_heads);
        let head_dim = match c.get("head_dim").and_then(Value::as_u64) {
            Some(d) => d as usize,
            None => hidden_size / num_heads.max(1),
        };
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(ConfigError::Invalid(format!(
                "{num_heads} attention heads cannot share {num_kv_heads} key/value heads"
            )));
        }
        if head_dim % 2 != 0 {
            return Err(ConfigError::Invalid(format!("head_dim {head_dim} is odd")));
        }
        // transformers 5 writes `rope_parameters`; older configs `rope_theta` + `rope_scaling`.
        let rope = c.get("rope_parameters").filter(|v| v.is_object());
        let rope_theta = rope
            .and_then(|r| r.get("rope_theta"))
            .and_then(Value::as_f64)
            .or_else(|| c.get("rope_theta").and_then(Value::as_f64))
            .unwrap_or(10000.0);
        let scaling = rope.or_else(|| c.get("rope_scaling").filter(|v| v.is_object()));
        let rope_scaling = match scaling {
            None => RopeScaling::None,
            Some(s) => {
                let kind = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                let factor = || number(s, "factor");
                match kind {
                    "default" => RopeScaling::None,
                    "linear" => RopeScaling::Linear { factor: factor()? },
                    "llama3" => RopeScaling::Llama3 {
                        factor: factor()?,
                        low_freq_factor: number(s, "low_freq_factor")?,
                        high_freq_factor: number(s, "high_freq_factor")?,
                        original_max_position_embeddings: number(
                            s,
                            "original_max_position_embeddings",
                        )?,
                    },
                    other => {
                        return Err(ConfigError::Invalid(format!(
                            "rope scaling `{other}` is not supported (default, linear and llama3 are)"
                        )));
                    }
                }
            }
        };
        let sliding_window = match architecture.as_str() {
            "MistralForCausalLM" => c.get("sliding_window").and_then(Value::as_u64),
            "Qwen2ForCausalLM" if c.get("use_sliding_window") == Some(&Value::Bool(true)) => {
                return Err(ConfigError::Invalid(
                    "Qwen2 with `use_sliding_window: true` is not supported".into(),
                ));
            }
            _ => None,
        }
        .map(|w| w as usize);
        let tied_embeddings = !model.tensors.contains_key("lm_head.weight");
        let vocab_size = count(c, "vocab_size")?;
        // The tensors must have the shapes the config implies.
        let expect = |tensor: &str, shape: [usize; 2]| match model.tensors.get(tensor) {
            Some(t) if t.shape != shape => Err(ConfigError::Invalid(format!(
                "`{tensor}` is {:?}, but the config implies {shape:?}",
                t.shape
            ))),
            _ => Ok(()),
        };
        expect("model.embed_tokens.weight", [vocab_size, hidden_size])?;
        expect(
            "model.layers.0.self_attn.q_proj.weight",
            [num_heads * head_dim, hidden_size],
        )?;
        Ok(ModelConfig {
            vocab_size,
            hidden_size,
            intermediate_size: count(c, "intermediate_size")?,
            num_layers: count(c, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_theta,
            rope_scaling,
            rms_norm_eps: number(c, "rms_norm_eps")?,
            sliding_window,
            tied_embeddings,
            architecture,
        })
    }

    /// The inverse rotary frequencies, as transformers computes them
    /// (`rope_init_fn` of the config's rope type), in f32.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / d as f64))
            .collect();
        let scaled: Vec<f64> = match &self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen > low_wavelen {
                            f / factor
                        } else if wavelen < high_wavelen {
                            f
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        scaled.into_iter().map(|f| f as f32).collect()
    }

    /// The names of the linear modules whose inputs calibration measures,
    /// in forward order (the fixtures' key names).
    pub fn linear_modules(&self) -> Vec<String> {
        let mut names = Vec::new();
        for l in 0..self.num_layers {
            for m in [
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
            ] {
                names.push(format!("model.layers.{l}.{m}"));
            }
            for m in ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"] {
                names.push(format!("model.layers.{l}.{m}"));
            }
        }
        names.push("lm_head".into());
        names
    }
}
