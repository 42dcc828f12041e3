//! Model hyper-parameters, read from a Hugging Face `config.json` (transformers 4 and 5
//! styles) or from GGUF metadata, normalised into one struct the transformer is built from.

use std::path::Path;

use serde::Deserialize;

use crate::error::{EngineError, Result};
use super::Architecture;

/// How rotary frequencies are rescaled for long contexts.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Per-frequency divisors given as a tensor (GGUF `rope_freqs.weight`).
    FreqFactors(Vec<f32>),
}

/// Normalised model hyper-parameters.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (the architecture's, or `config.json`'s `attention_bias`).
    pub attention_bias: bool,
    /// Per-head RMS norm on q and k before rotary embedding (the architecture's).
    pub qk_norm: bool,
}

/// `config.json` as written by transformers 4 or 5; fields absent in one style are optional.
#[derive(Deserialize)]
struct HfConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    /// transformers 5 moves `rope_theta` and the scaling here.
    rope_parameters: Option<serde_json::Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
}

impl ModelConfig {
    /// Reads `config.json` from a model directory.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
        Self::from_hf_json(&text).map_err(|m| EngineError::model(path, m))
    }

    /// Parses the text of a `config.json`.
    pub fn from_hf_json(text: &str) -> std::result::Result<Self, String> {
        let raw: HfConfig =
            serde_json::from_str(text).map_err(|e| format!("config.json: {e}"))?;
        let names: Vec<&str> = raw
            .architectures
            .iter()
            .flatten()
            .map(String::as_str)
            .chain(raw.model_type.as_deref())
            .collect();
        let architecture = names
            .iter()
            .find_map(|n| Architecture::from_hf_name(n))
            .ok_or_else(|| {
                let supported: Vec<&str> = Architecture::ALL.iter().map(|a| a.spec().hf_names[0]).collect();
                format!("config.json: unsupported architecture {names:?} (supported: {})", supported.join(", "))
            })?;
        let rope_params = raw.rope_parameters.as_ref();
        let rope_theta = raw
            .rope_theta
            .or_else(|| rope_params.and_then(|p| p.get("rope_theta")).and_then(|v| v.as_f64()))
            .unwrap_or(10_000.0);
        let scaling_value = raw.rope_scaling.as_ref().or(rope_params);
        let rope_scaling = match scaling_value {
            Some(v) => parse_rope_scaling(v)?,
            None => None,
        };
        let heads = raw.num_attention_heads;
        if heads == 0 {
            return Err("config.json: num_attention_heads must be positive, got 0".into());
        }
        let cfg = Self {
            architecture,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: raw.num_key_value_heads.unwrap_or(heads),
            head_dim: raw.head_dim.unwrap_or(raw.hidden_size / heads),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: architecture.spec().attention_bias || raw.attention_bias.unwrap_or(false),
            qk_norm: architecture.spec().qk_norm,
        };
        cfg.check_dimensions().map_err(|m| format!("config.json: {m}"))?;
        Ok(cfg)
    }

    /// Refuses sizes no model can have (a zero head count, heads that do not divide into
    /// key/value groups), which would otherwise divide by zero or panic deep in loading.
    pub fn check_dimensions(&self) -> std::result::Result<(), String> {
        let positive = [
            ("vocab size", self.vocab_size),
            ("hidden size", self.hidden_size),
            ("intermediate size", self.intermediate_size),
            ("layer count", self.num_hidden_layers),
            ("attention head count", self.num_attention_heads),
            ("key/value head count", self.num_key_value_heads),
            ("head size", self.head_dim),
            ("context length", self.max_position_embeddings),
        ];
        if let Some((what, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("the {what} must be positive, got 0"));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(format!(
                "{} attention heads cannot be split into {} key/value groups",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("the head size must be even for rotary embeddings, got {}", self.head_dim));
        }
        Ok(())
    }

    /// Number of floats one token occupies in the KV cache across all layers (K and V).
    pub fn kv_floats_per_token(&self) -> usize {
        2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim
    }
}

fn parse_rope_scaling(v: &serde_json::Value) -> std::result::Result<Option<RopeScaling>, String> {
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let num = |key: &str| v.get(key).and_then(|x| x.as_f64());
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: num("factor").ok_or("rope_scaling.factor missing")?,
        })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: num("factor").ok_or("rope_scaling.factor missing")?,
            low_freq_factor: num("low_freq_factor").unwrap_or(1.0),
            high_freq_factor: num("high_freq_factor").unwrap_or(4.0),
            original_max_position_embeddings: num("original_max_position_embeddings")
                .unwrap_or(8192.0) as usize,
        })),
        other => Err(format!("config.json: rope scaling type '{other}' is not supported")),
    }
}

/// Inverse rotary frequencies for a head dimension, after any scaling.
pub fn rope_inv_freq(cfg: &ModelConfig) -> Vec<f32> {
    let dim = cfg.head_dim;
    let base: Vec<f64> = (0..dim / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / dim as f64))
        .collect();
    let scaled: Vec<f64> = match &cfg.rope_scaling {
        None => base,
        Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
        Some(RopeScaling::FreqFactors(factors)) => base
            .iter()
            .zip(factors)
            .map(|(f, d)| f / *d as f64)
            .collect(),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let old = *original_max_position_embeddings as f64;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&freq| {
                    let wavelen = 2.0 * std::f64::consts::PI / freq;
                    if wavelen < high_wavelen {
                        freq
                    } else if wavelen > low_wavelen {
                        freq / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * freq / factor + smooth * freq
                    }
                })
                .collect()
        }
    };
    scaled.into_iter().map(|f| f as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_transformers5_rope_parameters() {
        let cfg = ModelConfig::from_hf_json(
            r#"{"architectures":["LlamaForCausalLM"],"vocab_size":10,"hidden_size":8,
            "intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,
            "rope_parameters":{"rope_theta":500.0,"rope_type":"default"}}"#,
        )
        .unwrap();
        assert_eq!(cfg.rope_theta, 500.0);
        assert_eq!(cfg.num_key_value_heads, 2);
        assert_eq!(cfg.head_dim, 4);
        assert!(cfg.rope_scaling.is_none());
    }

    #[test]
    fn rejects_unknown_architecture() {
        let err = ModelConfig::from_hf_json(
            r#"{"architectures":["GPT2LMHeadModel"],"vocab_size":10,"hidden_size":8,
            "intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2}"#,
        )
        .unwrap_err();
        assert!(err.contains("GPT2LMHeadModel"), "{err}");
    }
}
