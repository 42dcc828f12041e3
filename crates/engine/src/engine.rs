//! The engine: one base model, its tokenizer and chat template, and the adapter manager.
//! Sequences carry their own KV cache, sampler and adapter slot; [`Engine::step`] runs one
//! forward pass for any mix of them (prefill chunks and decode tokens, any adapters) and
//! samples a token for each sequence whose prompt is fully in its cache. The server's
//! scheduler calls `step` in a loop; [`Engine::generate`] is the same loop for a fixed set.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::Device;
use serde::Serialize;

use crate::attention::SeqSpan;
use crate::chat::{ChatMessage, ChatTemplate};
use crate::config::{Architecture, ModelConfig};
use crate::error::{EngineError, Result};
use crate::kv::KvCache;
use crate::lora::manager::LoraLimits;
use crate::lora::{LoraBatch, LoraManager, LoraSlot, ModuleShapes};
use crate::model::{LogitsFor, Transformer};
use crate::registry::ModelLocation;
use crate::sampling::{SampledToken, Sampler, SamplingParams};
use crate::tokenizer::Tokenizer;
use crate::weights::WeightSource;

/// How to load the engine.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    pub device: Device,
    /// Dequantize GGUF projections to float32 (needed to merge adapters; the reference
    /// outputs are computed this way).
    pub dequantize: bool,
    /// Longest prompt + output; defaults to the model's context, capped at 8192.
    pub max_model_len: Option<usize>,
    pub lora: LoraLimits,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dequantize: false,
            max_model_len: None,
            lora: LoraLimits::default(),
        }
    }
}

/// What the model is asked to continue.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// Raw text (completions API).
    Text(String),
    /// Messages rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
    /// Token ids as they are.
    Tokens(Vec<u32>),
}

/// One generation request.
#[derive(Clone, Debug)]
pub struct Request {
    /// Adapter name, or `None` for the base model.
    pub adapter: Option<String>,
    pub prompt: Prompt,
    pub params: SamplingParams,
}

/// Why a sequence stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// End-of-sequence token, stop token or stop string.
    Stop,
    /// `max_tokens` or the model length reached.
    Length,
}

/// A sequence being generated.
pub struct Sequence {
    pub id: u64,
    pub adapter: Option<String>,
    slot: Option<LoraSlot>,
    pub prompt_ids: Vec<u32>,
    pub output_ids: Vec<u32>,
    /// Per output token, when logprobs were asked for.
    pub logprobs: Vec<SampledToken>,
    cache: KvCache,
    sampler: Sampler,
    pub finish: Option<FinishReason>,
    /// Output text so far, cut at a stop string when one matched.
    text: String,
    /// Bytes of `text` already handed out by [`Sequence::take_new_text`].
    emitted: usize,
    max_stop_len: usize,
    max_len: usize,
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

    /// The resident adapter slot this sequence runs with.
    pub fn slot(&self) -> Option<LoraSlot> {
        self.slot
    }

    /// The whole output text (final once `finish` is set).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Sampling parameters of the request.
    pub fn params(&self) -> &SamplingParams {
        self.sampler.params()
    }

    /// Text produced since the last call that can no longer change: while running, the
    /// tail that might still become a stop string is held back.
    pub fn take_new_text(&mut self) -> String {
        let mut end = self.text.len();
        if self.finish.is_none() {
            end = end.saturating_sub(self.max_stop_len.saturating_sub(1));
            // An incomplete UTF-8 character decodes to U+FFFD: wait for the rest.
            if let Some(i) = self.text.find('\u{FFFD}') {
                end = end.min(i);
            }
        }
        while end > self.emitted && !self.text.is_char_boundary(end) {
            end -= 1;
        }
        if end <= self.emitted {
            return String::new();
        }
        let s = self.text[self.emitted..end].to_string();
        self.emitted = end;
        s
    }
}

/// A finished request.
#[derive(Clone, Debug, Serialize)]
pub struct Completion {
    pub adapter: Option<String>,
    pub text: String,
    pub token_ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub finish_reason: FinishReason,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub logprobs: Vec<SampledToken>,
}

/// One base model with its adapters.
pub struct Engine {
    model: Transformer,
    tokenizer: Tokenizer,
    chat: Option<ChatTemplate>,
    loras: LoraManager,
    eos_ids: Vec<u32>,
    max_model_len: usize,
    next_id: u64,
    location: ModelLocation,
}

fn gguf_config(md: &HashMap<String, Value>, src: &WeightSource) -> Result<ModelConfig> {
    let path = src.path();
    let err = |m: String| EngineError::model(path, m);
    let arch_name = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .ok_or_else(|| err("GGUF has no general.architecture".into()))?
        .clone();
    let architecture = Architecture::from_gguf_name(&arch_name)
        .ok_or_else(|| err(format!("unsupported GGUF architecture '{arch_name}' (supported: llama, qwen2, qwen3)")))?;
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
    let vocab = md
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.to_vec().ok())
        .map(|v| v.len())
        .ok_or_else(|| err("GGUF has no tokenizer.ggml.tokens".into()))?;
    Ok(ModelConfig {
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
        attention_bias: architecture == Architecture::Qwen2,
        qk_norm: architecture == Architecture::Qwen3,
    })
}

fn read_eos_ids(dir: &Path, tokenizer: &Tokenizer) -> Vec<u32> {
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

fn read_chat_template(dir: &Path) -> Option<String> {
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

impl Engine {
    /// Loads a model from a resolved location.
    pub fn load(location: &ModelLocation, options: &EngineOptions) -> Result<Self> {
        let (cfg, src, tokenizer, template, mut eos_ids) = match location {
            ModelLocation::Gguf(path) => {
                let mut src = WeightSource::open_gguf(path, &options.device, options.dequantize)?;
                let md = src.gguf_metadata().expect("gguf source has metadata");
                let cfg = gguf_config(md, &src)?;
                let tokenizer = Tokenizer::from_gguf(md, path)?;
                let template = md.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned();
                let mut eos = Vec::new();
                for k in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
                    eos.extend(md.get(k).and_then(|v| v.to_u32().ok()));
                }
                src.prepare_for(&cfg);
                (cfg, src, tokenizer, template, eos)
            }
            ModelLocation::HfDir(dir) => {
                let cfg = ModelConfig::from_hf_file(&dir.join("config.json"))?;
                let mut src = WeightSource::open_safetensors_dir(dir, &options.device)?;
                src.prepare_for(&cfg);
                let tokenizer = Tokenizer::from_dir(dir)?;
                let eos = read_eos_ids(dir, &tokenizer);
                (cfg, src, tokenizer, read_chat_template(dir), eos)
            }
        };
        // End-of-turn tokens of chat models stop generation even if not declared.
        for t in ["<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>"] {
            if let Some(id) = tokenizer.token_to_id(t) {
                eos_ids.push(id);
            }
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        let max_model_len = options
            .max_model_len
            .unwrap_or(cfg.max_position_embeddings.min(8192))
            .min(cfg.max_position_embeddings);
        let model = Transformer::new(&cfg, &src, max_model_len)?;
        let chat = match template {
            Some(t) => Some(ChatTemplate::new(&t, tokenizer.bos_token.as_deref(), tokenizer.eos_token.as_deref())?),
            None => None,
        };
        if options.lora.max_rank > 256 {
            return Err(EngineError::InvalidRequest("max LoRA rank is at most 256".into()));
        }
        let loras = LoraManager::new(ModuleShapes::from_config(&cfg), options.lora.clone());
        Ok(Self {
            model,
            tokenizer,
            chat,
            loras,
            eos_ids,
            max_model_len,
            next_id: 0,
            location: location.clone(),
        })
    }

    /// The model.
    pub fn model(&self) -> &Transformer {
        &self.model
    }

    /// The model, mutably (merging adapters).
    pub fn model_mut(&mut self) -> &mut Transformer {
        &mut self.model
    }

    /// Where the model was loaded from.
    pub fn location(&self) -> &ModelLocation {
        &self.location
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The chat template, if the model has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat.as_ref()
    }

    /// The adapter manager.
    pub fn loras(&self) -> &LoraManager {
        &self.loras
    }

    /// The adapter manager, mutably (register, load, remove).
    pub fn loras_mut(&mut self) -> &mut LoraManager {
        &mut self.loras
    }

    /// Tokens that end generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Longest prompt plus output.
    pub fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    /// Floats of KV cache per token (all layers, K and V).
    pub fn kv_floats_per_token(&self) -> usize {
        self.model.config().kv_floats_per_token()
    }

    /// Token ids of a prompt.
    pub fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        match prompt {
            Prompt::Tokens(ids) => Ok(ids.clone()),
            Prompt::Text(t) => self.tokenizer.encode(t, true),
            Prompt::Chat(messages) => {
                let chat = self.chat.as_ref().ok_or_else(|| {
                    EngineError::InvalidRequest("this model has no chat template; send a plain prompt".into())
                })?;
                let text = chat.render(messages, true)?;
                self.tokenizer.encode(&text, false)
            }
        }
    }

    /// Starts a sequence: tokenizes, checks lengths and pins the adapter (loading it from
    /// disk if known but not resident). Call [`Engine::finish_sequence`] when done.
    pub fn add_sequence(&mut self, request: &Request) -> Result<Sequence> {
        request.params.validate()?;
        let prompt_ids = self.tokenize(&request.prompt)?;
        self.start_sequence(request, prompt_ids)
    }

    /// Starts a sequence from already tokenized prompt ids.
    pub fn start_sequence(&mut self, request: &Request, prompt_ids: Vec<u32>) -> Result<Sequence> {
        if prompt_ids.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        if prompt_ids.len() >= self.max_model_len {
            return Err(EngineError::InvalidRequest(format!(
                "the prompt has {} tokens, but the maximum model length is {} (prompt plus at least one generated token)",
                prompt_ids.len(),
                self.max_model_len
            )));
        }
        let vocab = self.model.config().vocab_size;
        if let Some(bad) = prompt_ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::InvalidRequest(format!("token id {bad} is outside the vocabulary ({vocab})")));
        }
        let slot = match (&request.adapter, self.model.merged_adapter()) {
            (Some(a), Some(m)) if a == m => None,
            (None, Some(m)) => {
                return Err(EngineError::InvalidRequest(format!(
                    "adapter '{m}' is merged into the base weights; the unmodified base model cannot run"
                )))
            }
            // Other adapters apply unmerged on top of the merged weights.
            (Some(a), _) => Some(self.loras.acquire(a)?),
            (None, None) => None,
        };
        self.next_id += 1;
        let params = request.params.clone();
        let max_len = (prompt_ids.len() + params.max_tokens).min(self.max_model_len);
        Ok(Sequence {
            id: self.next_id,
            adapter: request.adapter.clone(),
            slot,
            prompt_ids,
            output_ids: Vec::new(),
            logprobs: Vec::new(),
            cache: self.model.new_cache(),
            max_stop_len: params.stop.iter().map(|s| s.len()).max().unwrap_or(0),
            sampler: Sampler::new(params),
            finish: None,
            text: String::new(),
            emitted: 0,
            max_len,
        })
    }

    /// Releases a sequence's adapter pin and cache.
    pub fn finish_sequence(&mut self, seq: &mut Sequence) {
        if let Some(slot) = seq.slot.take() {
            self.loras.release(slot);
        }
        seq.cache.clear();
    }

    /// One forward pass over `seqs` (unfinished ones): each feeds its next `chunk` of
    /// uncached tokens (decode sequences feed one), at most `max_batch_tokens` rows in
    /// all with decode tokens first; sequences whose tokens are then all cached sample
    /// their next token. Returns the number of rows run.
    pub fn step(&mut self, seqs: &mut [&mut Sequence], max_batch_tokens: usize) -> Result<usize> {
        // Order by adapter slot so each adapter's rows are one contiguous segment.
        let mut order: Vec<usize> = (0..seqs.len()).filter(|&i| seqs[i].finish.is_none()).collect();
        order.sort_by_key(|&i| (seqs[i].slot.map_or(0, |s| s + 1), seqs[i].id));
        // Decode rows first, then prefill chunks in arrival order within the budget.
        let mut take = vec![0usize; seqs.len()];
        let mut budget = max_batch_tokens.max(1);
        for &i in &order {
            if seqs[i].pending_len() == 1 && budget > 0 {
                take[i] = 1;
                budget -= 1;
            }
        }
        let mut by_arrival: Vec<usize> = order.iter().copied().filter(|&i| take[i] == 0).collect();
        by_arrival.sort_by_key(|&i| seqs[i].id);
        for i in by_arrival {
            let n = seqs[i].pending_len().min(budget);
            take[i] = n;
            budget -= n;
        }
        let order: Vec<usize> = order.into_iter().filter(|&i| take[i] > 0).collect();
        if order.is_empty() {
            return Ok(0);
        }

        let mut tokens = Vec::new();
        let mut spans = Vec::with_capacity(order.len());
        let mut runs = Vec::with_capacity(order.len());
        for &i in &order {
            let s = &*seqs[i];
            let start = tokens.len();
            let from = s.cache.len();
            let all = s.prompt_ids.iter().chain(s.output_ids.iter());
            tokens.extend(all.skip(from).take(take[i]));
            spans.push(SeqSpan { start, len: take[i], pos: from });
            runs.push((start..start + take[i], s.slot));
        }
        let rows = tokens.len();
        let lora = LoraBatch::from_runs(runs.into_iter().map(|(r, slot)| (r, slot.and_then(|s| self.loras.get(s)))));
        let mut selected: Vec<Option<&mut Sequence>> = seqs.iter_mut().map(|s| Some(&mut **s)).collect();
        let mut batch: Vec<&mut Sequence> = order.iter().map(|&i| selected[i].take().expect("each sequence once")).collect();
        for (s, span) in batch.iter_mut().zip(&spans) {
            s.cache.reserve(span.pos + span.len);
        }
        let logits = {
            let mut caches: Vec<&mut KvCache> = batch.iter_mut().map(|s| &mut s.cache).collect();
            self.model.forward(&tokens, &spans, &mut caches, &lora, LogitsFor::LastOfEachSpan)?
        };
        let vocab = logits.dim(1)?;
        let logits = logits.flatten_all()?.to_vec1::<f32>()?;
        for (k, seq) in batch.into_iter().enumerate() {
            if seq.pending_len() > 0 {
                continue; // prompt not fully prefilled yet
            }
            let row = &logits[k * vocab..(k + 1) * vocab];
            let t = seq.sampler.sample(row);
            self.append_token(seq, t)?;
        }
        Ok(rows)
    }

    fn append_token(&self, seq: &mut Sequence, t: SampledToken) -> Result<()> {
        let id = t.id;
        seq.output_ids.push(id);
        if seq.params().logprobs.is_some() {
            seq.logprobs.push(t);
        }
        let params = seq.sampler.params();
        let is_eos = !params.ignore_eos && self.eos_ids.contains(&id);
        if is_eos || params.stop_token_ids.contains(&id) {
            seq.finish = Some(FinishReason::Stop);
        }
        seq.text = self.tokenizer.decode(&seq.output_ids, true)?;
        if let Some(cut) = params
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| seq.text.find(s.as_str()))
            .min()
        {
            seq.text.truncate(cut);
            seq.finish = Some(FinishReason::Stop);
        }
        if seq.finish.is_none() && (seq.output_ids.len() >= params.max_tokens || seq.len() >= seq.max_len) {
            seq.finish = Some(FinishReason::Length);
        }
        Ok(())
    }

    /// Runs requests to completion as one mixed batch (every adapter in the same forward
    /// passes); results come back in input order.
    pub fn generate(&mut self, requests: &[Request]) -> Result<Vec<Completion>> {
        let mut seqs = Vec::with_capacity(requests.len());
        for r in requests {
            match self.add_sequence(r) {
                Ok(s) => seqs.push(s),
                Err(e) => {
                    for s in &mut seqs {
                        self.finish_sequence(s);
                    }
                    return Err(e);
                }
            }
        }
        let result = (|| -> Result<()> {
            while seqs.iter().any(|s| s.finish.is_none()) {
                let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
                self.step(&mut refs, 8192)?;
            }
            Ok(())
        })();
        for s in &mut seqs {
            self.finish_sequence(s);
        }
        result?;
        Ok(seqs
            .into_iter()
            .map(|s| Completion {
                adapter: s.adapter,
                text: s.text,
                prompt_tokens: s.prompt_ids.len(),
                token_ids: s.output_ids,
                finish_reason: s.finish.expect("finished"),
                logprobs: s.logprobs,
            })
            .collect())
    }

    /// Folds a (resident or known) adapter into the float base weights.
    pub fn merge_adapter(&mut self, name: &str) -> Result<()> {
        let slot = self.loras.acquire(name)?;
        let adapter = self.loras.get_by_name(name).expect("just acquired");
        self.loras.release(slot);
        self.model.merge_lora(&adapter, true)
    }

    /// Restores the base weights.
    pub fn unmerge_adapter(&mut self) {
        self.model.unmerge_lora();
    }
}
