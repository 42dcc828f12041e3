//! What a model's files say besides its weights: the configuration from a GGUF header,
//! and from a Hugging Face directory the end-of-sequence tokens and the chat template.
//! Read before (or without) loading the weights.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::Device;

use crate::models::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::models::Architecture;
use crate::registry::ModelLocation;
use crate::tokenizer::Tokenizer;
use crate::weights::WeightSource;

pub(crate) fn gguf_config(md: &HashMap<String, Value>, src: &WeightSource) -> Result<ModelConfig> {
    let path = src.path();
    let err = |m: String| EngineError::model(path, m);
    let arch_name = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .ok_or_else(|| err("GGUF has no general.architecture".into()))?
        .clone();
    let architecture = Architecture::from_gguf_name(&arch_name).ok_or_else(|| {
        err(format!("unsupported GGUF architecture '{arch_name}' (supported: {})", Architecture::supported_gguf_names()))
    })?;
    let key = |k: &str| format!("{arch_name}.{k}");
    let int = |k: &str| -> Result<usize> {
        md.get(&key(k))
            .and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)))
            .map(|v| v as usize)
            .ok_or_else(|| err(format!("GGUF metadata {} missing", key(k))))
    };
    let float = |k: &str| md.get(&key(k)).and_then(|v| v.to_f32().ok()).map(f64::from);
    let heads = int("attention.head_count")?;
    let hidden = int("embedding_length")?;
    if heads == 0 {
        return Err(err(format!("GGUF metadata {} must be positive, got 0", key("attention.head_count"))));
    }
    let vocab = md
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.to_vec().ok())
        .map(|v| v.len())
        .ok_or_else(|| err("GGUF has no tokenizer.ggml.tokens".into()))?;
    let cfg = ModelConfig {
        architecture,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: int("feed_forward_length")?,
        num_hidden_layers: int("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: int("attention.head_count_kv").unwrap_or(heads),
        head_dim: int("attention.key_length").unwrap_or(hidden / heads),
        rms_norm_eps: float("attention.layer_norm_rms_epsilon").unwrap_or(1e-6),
        rope_theta: float("rope.freq_base").unwrap_or(10_000.0),
        rope_scaling: None,
        max_position_embeddings: int("context_length").unwrap_or(4096),
        tie_word_embeddings: !src.contains("lm_head.weight"),
        attention_bias: architecture.spec().attention_bias,
        qk_norm: architecture.spec().qk_norm,
    };
    cfg.check_dimensions().map_err(|m| err(format!("GGUF metadata: {m}")))?;
    Ok(cfg)
}

pub(crate) fn read_eos_ids(dir: &Path, tokenizer: &Tokenizer) -> Vec<u32> {
    let mut ids = Vec::new();
    if let Ok(text) = std::fs::read_to_string(dir.join("generation_config.json")) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            match v.get("eos_token_id") {
                Some(serde_json::Value::Number(n)) => ids.extend(n.as_u64().map(|x| x as u32)),
                Some(serde_json::Value::Array(a)) => ids.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32)),
                _ => {}
            }
        }
    }
    if let Some(id) = tokenizer.eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
        ids.push(id);
    }
    ids
}

pub(crate) fn read_chat_template(dir: &Path) -> Option<String> {
    if let Ok(t) = std::fs::read_to_string(dir.join("chat_template.jinja")) {
        return Some(t);
    }
    let text = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    match v.get("chat_template")? {
        serde_json::Value::String(s) => Some(s.clone()),
        // A list of named templates: take "default".
        serde_json::Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    }
}

/// A model's configuration without loading its weights (GGUF header or `config.json`):
/// benchmarks use it to make adapters that fit a base before any server loads it.
pub fn read_model_config(location: &ModelLocation) -> Result<ModelConfig> {
    match location {
        ModelLocation::Gguf(path) => {
            let src = WeightSource::open_gguf(path, &Device::Cpu, false)?;
            gguf_config(src.gguf_metadata().expect("gguf source has metadata"), &src)
        }
        ModelLocation::HfDir(dir) => ModelConfig::from_hf_file(&dir.join("config.json")),
    }
}
