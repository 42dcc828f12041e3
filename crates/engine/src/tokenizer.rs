//! Text ↔ token ids, from a `tokenizer.json` or rebuilt from GGUF metadata (so a lone
//! GGUF file needs nothing else), plus the special tokens generation needs.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::json;

use crate::error::{EngineError, Result};

/// A tokenizer with the model's special tokens.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Prepend BOS when encoding raw (non-template) prompts.
    add_bos: bool,
    bos_id: Option<u32>,
    /// Token strings, as chat templates want them.
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

// GPT-2's split, applied by tokenizers' ByteLevel when use_regex = true.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn token_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` and the special tokens of `tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| EngineError::model(&path, format!("cannot load tokenizer: {e}")))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = match std::fs::read_to_string(&cfg_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| EngineError::model(&cfg_path, format!("invalid JSON: {e}")))?,
            Err(_) => json!({}),
        };
        let bos_token = cfg.get("bos_token").and_then(token_text);
        let eos_token = cfg.get("eos_token").and_then(token_text);
        let bos_id = bos_token.as_deref().and_then(|t| inner.token_to_id(t));
        Ok(Self {
            // tokenizer.json's post-processor already adds BOS where the model wants it.
            add_bos: false,
            bos_id,
            inner,
            bos_token,
            eos_token,
        })
    }

    /// Rebuilds the tokenizer from GGUF `tokenizer.ggml.*` metadata.
    pub fn from_gguf(md: &HashMap<String, Value>, path: &Path) -> Result<Self> {
        let err = |m: String| EngineError::model(path, m);
        let get_str = |k: &str| md.get(k).and_then(|v| v.to_string().ok()).cloned();
        let get_u32 = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
        let model = get_str("tokenizer.ggml.model").ok_or_else(|| err("GGUF has no tokenizer.ggml.model".into()))?;
        if model != "gpt2" {
            return Err(err(format!(
                "GGUF tokenizer model '{model}' (SentencePiece) is not supported yet; use the model's Hugging Face directory instead"
            )));
        }
        let pre = get_str("tokenizer.ggml.pre").unwrap_or_else(|| "default".into());
        let tokens: Vec<String> = md
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .ok_or_else(|| err("GGUF has no tokenizer.ggml.tokens".into()))?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| err(format!("tokenizer.ggml.tokens: {e}")))?;
        let types: Vec<i32> = md
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.to_vec().ok())
            .map(|v| v.iter().map(|x| x.to_i32().unwrap_or(1)).collect())
            .unwrap_or_default();
        let merges: Vec<String> = md
            .get("tokenizer.ggml.merges")
            .and_then(|v| v.to_vec().ok())
            .ok_or_else(|| err("GGUF has no tokenizer.ggml.merges".into()))?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| err(format!("tokenizer.ggml.merges: {e}")))?;

        let vocab: serde_json::Map<String, serde_json::Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        // Control (3) and user-defined (4) tokens are matched whole in the input.
        let added: Vec<serde_json::Value> = types
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == 3 || t == 4)
            .map(|(i, _)| {
                json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let byte_level = |use_regex: bool| {
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
        };
        let split = |pattern: &str| {
            json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false})
        };
        // The same pre-tokenization as the models' original tokenizer.json (and llama.cpp's
        // per-`pre` regexes).
        let (pre_tokenizer, ignore_merges) = match pre.as_str() {
            "qwen2" => (json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]}), false),
            "llama3" | "llama-bpe" | "llama-v3" => (
                json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]}),
                true,
            ),
            "smollm" | "starcoder" | "refact" => (
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
                false,
            ),
            "gpt-2" | "gpt2" | "default" => (byte_level(true), false),
            other => {
                return Err(err(format!("GGUF tokenizer pre-tokenizer '{other}' is not supported")));
            }
        };
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges}
        });
        let bytes = serde_json::to_vec(&spec).map_err(|e| err(e.to_string()))?;
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| err(format!("cannot build tokenizer from GGUF metadata: {e}")))?;
        let bos_id = get_u32("tokenizer.ggml.bos_token_id");
        let eos_id = get_u32("tokenizer.ggml.eos_token_id");
        let add_bos = md
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        let name = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
        Ok(Self {
            inner,
            add_bos,
            bos_id,
            bos_token: name(bos_id),
            eos_token: name(eos_id),
        })
    }

    /// Encodes text. `raw_prompt` adds BOS where the model wants it; chat-template output
    /// already holds its special tokens and is encoded as is (as transformers does).
    pub fn encode(&self, text: &str, raw_prompt: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, raw_prompt)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        if raw_prompt && self.add_bos {
            if let Some(b) = self.bos_id {
                if ids.first() != Some(&b) {
                    ids.insert(0, b);
                }
            }
        }
        Ok(ids)
    }

    /// Decodes ids, dropping special tokens when asked.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    /// The id of a token string.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
