//! The optional second router (`--router-model`): a dedicated sentence-embedding model,
//! sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters), read from a
//! Hugging Face folder with candle-transformers' BERT, and used as sentence-transformers
//! uses it: WordPiece ids of the text, capped at `max_seq_length` (256), mean-pooled over
//! every token. It reads the text a user wrote (the user turns of a chat, a completions
//! prompt), not the chat-template rendering the base router reads, which it never saw in
//! training. It is what the base-model router is measured against (`loramux bench route`).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};

use super::embedder::Embedder;
use crate::error::{EngineError, Result};
use crate::input::Prompt;

/// Longest input when the folder has no `sentence_bert_config.json`.
const DEFAULT_MAX_SEQ_LENGTH: usize = 256;

/// A BERT sentence-embedding model from a Hugging Face folder.
pub struct SentenceEmbedder {
    model: BertModel,
    tokenizer: tokenizers::Tokenizer,
    max_seq_length: usize,
    fingerprint: String,
    device: Device,
}

fn model_err(path: &Path, message: impl Into<String>) -> EngineError {
    EngineError::Model { path: path.to_path_buf(), message: message.into() }
}

fn read(path: PathBuf) -> Result<Vec<u8>> {
    std::fs::read(&path).map_err(|source| EngineError::Io { path, source })
}

impl SentenceEmbedder {
    /// Loads `config.json`, `model.safetensors` and `tokenizer.json` from `dir` (a
    /// sentence-transformers folder; `sentence_bert_config.json` gives the length cap).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config: Config = serde_json::from_slice(&read(dir.join("config.json"))?)
            .map_err(|e| model_err(&dir.join("config.json"), format!("not a BERT config: {e}")))?;
        let max_seq_length = std::fs::read(dir.join("sentence_bert_config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v.get("max_seq_length")?.as_u64())
            .map_or(DEFAULT_MAX_SEQ_LENGTH, |n| n as usize)
            .clamp(2, config.max_position_embeddings);
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            return Err(model_err(dir, "no model.safetensors"));
        }
        // SAFETY: the file is mapped read-only and not modified while the model lives.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device)? };
        let model = BertModel::load(vb, &config).map_err(|e| model_err(&weights, format!("not a BERT checkpoint: {e}")))?;
        let mut tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| model_err(&dir.join("tokenizer.json"), e.to_string()))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| model_err(&dir.join("tokenizer.json"), e.to_string()))?;
        let bytes = std::fs::metadata(&weights).map(|m| m.len()).unwrap_or(0);
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let fingerprint = format!("sentence-{name}-{bytes}-max{max_seq_length}");
        Ok(Self { model, tokenizer, max_seq_length, fingerprint, device: device.clone() })
    }

    /// The text the model reads: a completions prompt, or a chat's user turns.
    fn text_of(prompt: &Prompt) -> Result<String> {
        match prompt {
            Prompt::Text(t) => Ok(t.clone()),
            Prompt::Chat(messages) => {
                let user: Vec<&str> = messages.iter().filter(|m| m.role == "user").map(|m| m.content.as_str()).collect();
                let all: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
                Ok(if user.is_empty() { all } else { user }.join("\n"))
            }
            Prompt::Tokens(_) => Err(EngineError::InvalidRequest(
                "the sentence-embedding router reads text: send the prompt as a string, not token ids".into(),
            )),
        }
    }
}

impl Embedder for SentenceEmbedder {
    fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let text = Self::text_of(prompt)?;
        let enc = self.tokenizer.encode(text, true).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        if ids.len() > self.max_seq_length {
            // Keep [CLS] ... and the final [SEP], as the tokenizer's own truncation would.
            let sep = ids[ids.len() - 1];
            ids.truncate(self.max_seq_length - 1);
            ids.push(sep);
        }
        Ok(ids)
    }

    fn example_prompt(&self, text: &str) -> Prompt {
        Prompt::Text(text.to_string())
    }

    fn embed(&self, ids: &[u32]) -> Result<Vec<f32>> {
        if ids.len() <= 2 {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        let input = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let types = input.zeros_like()?;
        let hidden = self.model.forward(&input, &types, None)?;
        Ok(hidden.squeeze(0)?.mean(0)?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
    }
}
