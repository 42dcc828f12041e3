//! What turns a prompt into the vector the router compares: the base model's own hidden
//! states ([`BaseEmbedder`], the default: no second model, no second copy of any weight),
//! or a dedicated sentence-embedding model ([`super::sentence::SentenceEmbedder`],
//! `--router-model`). Both tokenize first, so the router's memory cache keys on the ids,
//! and both name themselves with a fingerprint that keys the disk cache of example
//! embeddings ([`super::store::EmbeddingStore`]).

use std::sync::Arc;

use crate::chat::ChatMessage;
use crate::error::{EngineError, Result};
use crate::input::{InputProcessor, Prompt};
use crate::models::Transformer;
pub use crate::pooling::{pool, Pooling};

/// A model that maps a prompt to one vector.
pub trait Embedder: Send + Sync {
    /// The model and every setting that changes its vectors (keys the disk cache).
    fn fingerprint(&self) -> &str;
    /// The ids the vector is computed from: a request's prompt as this embedder reads it.
    fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>>;
    /// An adapter's routing example as a request would carry it.
    fn example_prompt(&self, text: &str) -> Prompt;
    /// The vector of tokenized input (not normalised: the router compares by cosine).
    fn embed(&self, ids: &[u32]) -> Result<Vec<f32>>;
}

/// The default embedder: the pooled residual stream of one middle layer of a base-only
/// pass ([`Transformer::hidden_states`] on a [`Transformer::base_view`] that shares the
/// batch loop's weights, run on the caller's thread without touching the loop), over the
/// prompt rendered exactly as generation renders it (chat template included).
pub struct BaseEmbedder {
    model: Arc<Transformer>,
    input: Arc<InputProcessor>,
    layer: usize,
    pooling: Pooling,
    fingerprint: String,
}

impl BaseEmbedder {
    /// The default layer, by measurement (`loramux bench route`, BENCHMARKS.md): on the five
    /// task adapters' held-out prompts, layer 1 of SmolLM2-135M's 30 routes 97.5 % right for
    /// 4 % of a request's TTFT, and sends 88 % of off-topic prompts to the fallback; the
    /// middle layer (15) routes 100 % right but costs 48 % of TTFT and lets 75 % of
    /// off-topic prompts through; layers 3-8 do worse than 1 on both. Deeper layers are a
    /// flag away (`--router-layer`) for domains that differ in meaning more than in words.
    pub const DEFAULT_LAYER: usize = 1;

    /// The default layer, mean pooling without the first token. `model_id` names the
    /// weights (file name and size) for the disk cache.
    pub fn new(model: Arc<Transformer>, input: Arc<InputProcessor>, model_id: &str) -> Self {
        Self::with_layer(model, input, model_id, Self::DEFAULT_LAYER, Pooling::MeanSkipFirst)
    }

    /// A chosen layer (capped at the model's depth) and pooling.
    pub fn with_layer(model: Arc<Transformer>, input: Arc<InputProcessor>, model_id: &str, layer: usize, pooling: Pooling) -> Self {
        let layer = layer.min(model.config().num_hidden_layers);
        let fingerprint = format!("base-{model_id}-layer{layer}-{pooling:?}");
        Self { model, input, layer, pooling, fingerprint }
    }

    /// The layer pooled.
    pub fn layer(&self) -> usize {
        self.layer
    }
}

impl Embedder for BaseEmbedder {
    fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let mut ids = self.input.tokenize(prompt)?;
        ids.truncate(self.input.max_model_len().saturating_sub(1).max(1));
        Ok(ids)
    }

    fn example_prompt(&self, text: &str) -> Prompt {
        if self.input.chat_template().is_some() {
            Prompt::Chat(vec![ChatMessage::user(text)])
        } else {
            Prompt::Text(text.to_string())
        }
    }

    fn embed(&self, ids: &[u32]) -> Result<Vec<f32>> {
        if ids.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        let hidden = self.model.hidden_states(ids, &[self.layer])?;
        pool(&hidden[0], self.pooling)
    }
}
