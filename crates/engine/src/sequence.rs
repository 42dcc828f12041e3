//! A sequence being generated, and what it becomes: each carries its own tokens, KV cache,
//! sampler, detokenizer and adapter slot, so any mix of sequences can share a forward pass
//! ([`crate::Engine::execute`]) and the scheduler can drop or resume any one of them.

use serde::{Deserialize, Serialize};

use crate::detokenizer::Detokenizer;
use crate::kv::KvCache;
use crate::lora::{LoraRequest, LoraSlot};
use crate::pooling::PoolState;
use crate::sampling::{SampledToken, Sampler, SamplingParams};

/// Why a sequence stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// End-of-sequence token, stop token or stop string.
    Stop,
    /// `max_tokens` or the model length reached.
    Length,
    /// The answer is tool calls: set by the server once it parsed them, never by the engine.
    #[serde(rename = "tool_calls")]
    ToolCalls,
}

impl FinishReason {
    /// The OpenAI `finish_reason` string.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
        }
    }
}

/// A sequence being generated.
pub struct Sequence {
    pub id: u64,
    pub(crate) lora: Option<LoraRequest>,
    pub(crate) slot: Option<LoraSlot>,
    pub prompt_ids: Vec<u32>,
    pub output_ids: Vec<u32>,
    /// Per output token, when logprobs were asked for.
    pub logprobs: Vec<SampledToken>,
    /// Per prompt token after the first (entry `i` is prompt token `i + 1`), when prompt
    /// logprobs were asked for.
    pub prompt_logprobs: Vec<SampledToken>,
    pub(crate) cache: KvCache,
    pub(crate) sampler: Sampler,
    pub finish: Option<FinishReason>,
    pub(crate) detokenizer: Detokenizer,
    pub(crate) max_len: usize,
    /// Root of the prefix-cache chains of the weights it runs on.
    pub(crate) prefix_root: u64,
    /// An embedding request's vector so far (it generates nothing).
    pub(crate) pooled: Option<PoolState>,
}

impl Sequence {
    /// Prompt plus generated tokens.
    pub fn len(&self) -> usize {
        self.prompt_ids.len() + self.output_ids.len()
    }

    /// Whether the sequence has no tokens (never true for a valid sequence).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens already in the KV cache.
    pub fn cached_len(&self) -> usize {
        self.cache.len()
    }

    /// Tokens still to be fed before the next token can be sampled.
    pub fn pending_len(&self) -> usize {
        self.len() - self.cache.len()
    }

    /// The sequence's KV cache, for memory accounting.
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Frees the KV cache (the sequence can be recomputed from its tokens later).
    pub fn drop_cache(&mut self) {
        self.cache.clear();
    }

    /// The adapter the sequence runs with.
    pub fn lora(&self) -> Option<&LoraRequest> {
        self.lora.as_ref()
    }

    /// Whether the sequence runs with an adapter slot (rows of one slot are batched together).
    pub(crate) fn slot(&self) -> Option<LoraSlot> {
        self.slot
    }

    /// Sampling parameters of the request.
    pub fn params(&self) -> &SamplingParams {
        self.sampler.params()
    }

    /// Output text since the last call that can no longer change: while running, the tail
    /// that might still become a stop string is held back.
    pub fn take_new_text(&mut self) -> &str {
        let finished = self.finish.is_some();
        self.detokenizer.take_stable(finished)
    }

    /// Where the sequence stands, to put it back after a failed pass.
    pub(crate) fn mark(&self) -> SeqMark {
        SeqMark { cached: self.cache.len(), outputs: self.output_ids.len() }
    }

    /// Whether the sequence got a token since `mark`.
    pub(crate) fn advanced_since(&self, mark: &SeqMark) -> bool {
        self.output_ids.len() > mark.outputs
    }

    /// Puts the cache back to `mark` unless the sequence got its token (then the pass did
    /// its work for it). A pass that panicked midway may have appended to some layers only.
    pub(crate) fn rollback_unless_advanced(&mut self, mark: SeqMark) {
        if !self.advanced_since(&mark) {
            self.cache.truncate(mark.cached);
        }
    }

    /// The finished request.
    pub fn into_completion(self) -> Completion {
        Completion {
            lora: self.lora,
            prompt_tokens: self.prompt_ids.len(),
            text: self.detokenizer.into_text(),
            token_ids: self.output_ids,
            finish_reason: self.finish.unwrap_or(FinishReason::Length),
            logprobs: self.logprobs,
            prompt_logprobs: self.sampler.params().prompt_logprobs.map(|_| self.prompt_logprobs),
            prompt_token_ids: self.prompt_ids,
            embedding: self.pooled.map(PoolState::into_vector),
        }
    }
}

/// A sequence's cache and output lengths before a pass.
pub(crate) struct SeqMark {
    cached: usize,
    outputs: usize,
}

/// A finished request.
#[derive(Clone, Debug, Serialize)]
pub struct Completion {
    /// The adapter it ran with.
    #[serde(rename = "adapter")]
    pub lora: Option<LoraRequest>,
    pub text: String,
    pub token_ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub finish_reason: FinishReason,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub logprobs: Vec<SampledToken>,
    /// Log-probabilities of prompt tokens 1.. (token 0 has none); `Some` when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<Vec<SampledToken>>,
    /// The prompt's tokens (what `echo` and prompt logprobs are reported against).
    #[serde(skip)]
    pub prompt_token_ids: Vec<u32>,
    /// An embedding request's pooled vector (not normalised).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embedding: Option<Vec<f32>>,
}
