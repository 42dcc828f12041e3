//! The engine: one base model, its input processor (tokenizer, chat template) and the
//! adapter manager. [`Engine::execute`] runs one forward pass for any mix of
//! [`Sequence`]s (prefill chunks and decode tokens, any adapters) and samples a token for
//! each sequence whose prompt is then fully in its cache. The engine never decides what
//! runs: the [`crate::scheduler`] plans each pass and drives it (one-way: the scheduler
//! names the engine, never the reverse).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;

use crate::attention::SeqSpan;
use crate::chat::ChatTemplate;
use crate::models::config::ModelConfig;
use crate::detokenizer::Detokenizer;
use crate::error::{EngineError, Result};
use crate::input::{InputProcessor, ProcessedRequest};
use crate::kv::KvCache;
use crate::lora::manager::LoraLimits;
use crate::lora::{LoraBatch, LoraManager, LoraModel, ModuleShapes};
use crate::model_files::{gguf_config, read_chat_template, read_eos_ids};
use crate::models::{LogitsFor, Transformer};
use crate::pooling::PoolState;
use crate::prefix_cache::{PrefixCache, PrefixCacheStats};
use crate::registry::ModelLocation;
use crate::sampling::{token_logprobs, SampledToken, Sampler};
use crate::sequence::{FinishReason, Sequence};
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
    /// Memory for cached prompt prefixes (per adapter); 0 disables prefix caching.
    pub prefix_cache_bytes: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dequantize: false,
            max_model_len: None,
            lora: LoraLimits::default(),
            prefix_cache_bytes: 0,
        }
    }
}

/// One base model with its adapters.
pub struct Engine {
    model: Transformer,
    input: Arc<InputProcessor>,
    loras: LoraManager,
    prefix_cache: PrefixCache,
    /// The adapter folded into the weights for good (`merge_adapter_dir`): requests naming
    /// it run with no adapter applied and never need a slot.
    permanent_merge: Option<String>,
    eos_ids: Vec<u32>,
    next_id: u64,
    /// Fault injection for tests: a pass with a row of this adapter panics.
    panic_on_forward: Option<String>,
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
                src.unpermute_qk(qk_permuted_heads(&cfg));
                (cfg, src, tokenizer, template, eos)
            }
            ModelLocation::HfDir(dir) => {
                let cfg = ModelConfig::from_hf_file(&dir.join("config.json"))?;
                let mut src = WeightSource::open_safetensors_dir(dir, &options.device)?;
                src.unpermute_qk(qk_permuted_heads(&cfg));
                let tokenizer = Tokenizer::from_dir(dir)?;
                let eos = read_eos_ids(dir, &tokenizer);
                (cfg, src, tokenizer, read_chat_template(dir), eos)
            }
        };
        // End-of-turn tokens of chat models stop generation even if not declared.
        for t in crate::tokenizer::END_OF_TURN_TOKENS {
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
        let input = Arc::new(InputProcessor::new(Arc::new(tokenizer), chat, max_model_len, cfg.vocab_size));
        if options.lora.max_rank > 256 {
            return Err(EngineError::InvalidRequest("max LoRA rank is at most 256".into()));
        }
        let loras = LoraManager::new(ModuleShapes::from_config(&cfg), options.lora.clone());
        let prefix_cache = PrefixCache::new(options.prefix_cache_bytes, cfg.num_hidden_layers, cfg.num_key_value_heads * cfg.head_dim);
        Ok(Self { model, input, loras, prefix_cache, permanent_merge: None, eos_ids, next_id: 0, panic_on_forward: None })
    }

    /// Makes every forward pass with a row of adapter `name` panic (fault-injection tests only).
    #[doc(hidden)]
    pub fn inject_forward_panic(&mut self, name: Option<String>) {
        self.panic_on_forward = name;
    }

    /// The model.
    pub fn model(&self) -> &Transformer {
        &self.model
    }

    /// The input processor: shared with callers that tokenize off the batch loop.
    pub fn input(&self) -> &Arc<InputProcessor> {
        &self.input
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        self.input.tokenizer()
    }

    /// The chat template, if the model has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.input.chat_template()
    }

    /// The adapter manager.
    pub fn loras(&self) -> &LoraManager {
        &self.loras
    }

    /// The adapter manager, mutably (register, load, unload).
    pub fn loras_mut(&mut self) -> &mut LoraManager {
        &mut self.loras
    }

    /// Prefix-cache hit and size counters.
    pub fn prefix_cache_stats(&self) -> PrefixCacheStats {
        self.prefix_cache.stats()
    }

    /// Copies the cached blocks a sequence's prompt starts with (on its weights) into its
    /// empty cache: a new sequence, or one preempted and resumed. Returns the tokens reused.
    /// A sequence that asked for its prompt's log-probabilities reuses nothing: they are
    /// computed from the logits of every prompt position; nor does an embedding request,
    /// whose vector needs every position's last-layer state.
    pub fn reuse_cached_prefix(&mut self, seq: &mut Sequence) -> usize {
        if seq.params().prompt_logprobs.is_some() || seq.pooled.is_some() {
            return 0;
        }
        self.prefix_cache.fill(seq.prefix_root, &seq.prompt_ids, &mut seq.cache)
    }

    /// Longest prompt plus output.
    pub fn max_model_len(&self) -> usize {
        self.input.max_model_len()
    }

    /// Floats of KV cache per token (all layers, K and V).
    pub fn kv_floats_per_token(&self) -> usize {
        self.model.config().kv_floats_per_token()
    }

    /// Starts a sequence for a processed request, pinning its adapter (read from disk now
    /// if known but not resident). Call [`Engine::finish_sequence`] when done. A request
    /// for the adapter merged into the base weights for good runs with no adapter; one for
    /// an adapter merged for now still pins it, to run unmerged when it is unfolded.
    pub fn start_sequence(&mut self, request: ProcessedRequest) -> Result<Sequence> {
        let max_tokens = request.max_tokens();
        let (lora, prompt_ids, params, pooling) = request.into_parts();
        let slot = match &lora {
            Some(l) if self.permanent_merge.as_deref() == Some(l.lora_name.as_str()) => None,
            Some(l) => Some(self.loras.acquire(&l.lora_name)?),
            None => None,
        };
        self.next_id += 1;
        let max_len = (prompt_ids.len() + max_tokens).min(self.max_model_len());
        let prefix_root =
            PrefixCache::root(lora.as_ref().map(|l| (l.lora_name.as_str(), self.loras.generation(&l.lora_name))));
        let detokenizer = Detokenizer::new(&params.stop);
        let sampler = Sampler::for_sequence(params, &prompt_ids, &self.eos_ids);
        let pooled = pooling.map(|p| PoolState::new(p, prompt_ids.len(), self.model.config().hidden_size));
        let mut seq = Sequence {
            id: self.next_id,
            lora,
            slot,
            prompt_ids,
            output_ids: Vec::new(),
            logprobs: Vec::new(),
            prompt_logprobs: Vec::new(),
            cache: self.model.new_cache(),
            detokenizer,
            sampler,
            finish: None,
            max_len,
            prefix_root,
            pooled,
        };
        self.reuse_cached_prefix(&mut seq);
        Ok(seq)
    }

    /// Releases a sequence's adapter pin and cache.
    pub fn finish_sequence(&mut self, seq: &mut Sequence) {
        if let Some(slot) = seq.slot.take() {
            self.loras.release(slot);
        }
        seq.cache.clear();
    }

    /// One forward pass: `batch[i]` feeds its next `take[i]` uncached tokens (every
    /// `take[i] > 0`); sequences whose tokens are then all cached sample their next token.
    /// On error every cache is as it was before the call. Returns the rows run.
    pub fn execute(&mut self, batch: &mut [&mut Sequence], take: &[usize]) -> Result<usize> {
        if let Some(bad) = &self.panic_on_forward {
            if batch.iter().any(|s| s.lora.as_ref().is_some_and(|l| &l.lora_name == bad)) {
                panic!("injected fault: a forward pass with adapter '{bad}' panics");
            }
        }
        // Order by adapter slot so each adapter's rows are one contiguous segment.
        let mut order: Vec<usize> = (0..batch.len()).collect();
        order.sort_by_key(|&i| (batch[i].slot.map_or(0, |s| s + 1), batch[i].id));
        let mut tokens = Vec::with_capacity(take.iter().sum());
        let mut spans = Vec::with_capacity(order.len());
        for &i in &order {
            let s = &*batch[i];
            let start = tokens.len();
            let from = s.cache.len();
            tokens.extend(s.prompt_ids.iter().chain(s.output_ids.iter()).skip(from).take(take[i]));
            spans.push(SeqSpan { start, len: take[i], pos: from });
        }
        let rows = tokens.len();
        // Rows of the adapter folded into the weights get no update on top.
        let merged = self.model.merged_adapter();
        let unmerged_slot = |s: &Sequence| s.slot.filter(|_| merged.is_none() || s.lora.as_ref().map(|l| l.lora_name.as_str()) != merged);
        let lora = LoraBatch::from_runs(
            order.iter().zip(&spans).map(|(&i, span)| (span.start..span.start + span.len, unmerged_slot(batch[i]).and_then(|s| self.loras.get(s)))),
        );
        let mut ordered: Vec<&mut Sequence> = Vec::with_capacity(order.len());
        {
            let mut slots: Vec<Option<&mut Sequence>> = batch.iter_mut().map(|s| Some(&mut **s)).collect();
            ordered.extend(order.iter().map(|&i| slots[i].take().expect("each sequence once")));
        }
        for (s, span) in ordered.iter_mut().zip(&spans) {
            s.cache.reserve(span.pos + span.len);
        }
        // Logits of the last row of each span, and of every row of a sequence that asked
        // for its prompt's log-probabilities (`first_row[k]`: where span k's rows start);
        // none for an embedding request, which samples nothing but wants the last layer's
        // state of the rows its pooling counts (`hidden_rows`, in span order).
        let mut wanted: Vec<u32> = Vec::with_capacity(spans.len());
        let mut first_row = Vec::with_capacity(spans.len());
        let mut hidden_rows: Vec<u32> = Vec::new();
        for (s, span) in ordered.iter().zip(&spans) {
            first_row.push(wanted.len());
            if let Some(pooled) = &s.pooled {
                hidden_rows.extend((0..span.len).filter(|&r| pooled.wants(span.pos + r)).map(|r| (span.start + r) as u32));
                continue;
            }
            let from = if s.params().prompt_logprobs.is_some() { span.start } else { span.start + span.len - 1 };
            wanted.extend((from..span.start + span.len).map(|r| r as u32));
        }
        let (logits, hidden) = {
            let mut caches: Vec<&mut KvCache> = ordered.iter_mut().map(|s| &mut s.cache).collect();
            self.model.forward_with_hidden(&tokens, &spans, &mut caches, &lora, LogitsFor::Rows(&wanted), &hidden_rows)?
        };
        let vocab = logits.dim(1)?;
        let logits = logits.flatten_all()?.to_vec1::<f32>()?;
        let row = |i: usize| &logits[i * vocab..(i + 1) * vocab];
        let hidden_size = self.model.config().hidden_size;
        let hidden = match hidden {
            Some(h) => h.flatten_all()?.to_vec1::<f32>()?,
            None => Vec::new(),
        };
        let mut hidden_states = hidden.chunks_exact(hidden_size.max(1));
        for ((seq, span), &first) in ordered.into_iter().zip(&spans).zip(&first_row) {
            let prompt_len = seq.prompt_ids.len();
            if let Some(pooled) = &mut seq.pooled {
                for pos in span.pos..span.pos + span.len {
                    if pooled.wants(pos) {
                        pooled.add(pos, hidden_states.next().expect("one state per wanted row"));
                    }
                }
            }
            if span.pos < prompt_len && span.pos + span.len >= prompt_len {
                self.prefix_cache.insert(seq.prefix_root, &seq.prompt_ids, &seq.cache);
            }
            if let Some(top) = seq.params().prompt_logprobs {
                // Row r predicts the token after position span.pos + r; a recomputed span
                // (after preemption) finds its positions already recorded.
                for r in 0..span.len {
                    let next = span.pos + r + 1;
                    if next < prompt_len && seq.prompt_logprobs.len() == next - 1 {
                        let t = token_logprobs(row(first + r), seq.prompt_ids[next], top);
                        seq.prompt_logprobs.push(t);
                    }
                }
            }
            if seq.pending_len() > 0 {
                continue; // prompt not fully prefilled yet
            }
            if seq.params().max_tokens == Some(0) {
                // Prompt scoring only (`echo` with `max_tokens: 0`): nothing to generate.
                seq.finish = Some(FinishReason::Length);
                continue;
            }
            let last = if seq.params().prompt_logprobs.is_some() { first + span.len - 1 } else { first };
            let t = seq.sampler.sample(row(last), &seq.output_ids);
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
        // Stop strings are looked for only once `min_tokens` are out (text before is never cut).
        let stop: &[String] = if seq.output_ids.len() >= params.min_tokens { &params.stop } else { &[] };
        if seq.detokenizer.push(self.input.tokenizer(), &seq.output_ids, stop)? {
            seq.finish = Some(FinishReason::Stop);
        }
        let max_tokens = params.max_tokens.unwrap_or(usize::MAX);
        if seq.finish.is_none() && (seq.output_ids.len() >= max_tokens || seq.len() >= seq.max_len) {
            seq.finish = Some(FinishReason::Length);
        }
        Ok(())
    }

    /// Folds a resident or known adapter into the float base weights, restorably: its
    /// sequences then run on the merged weights with no update on top, everything else
    /// must wait for [`Engine::unmerge_adapter`]. Returns the seconds it took.
    pub fn merge_adapter(&mut self, name: &str) -> Result<f64> {
        let t = Instant::now();
        let slot = self.loras.acquire(name)?;
        let adapter = self.loras.get_by_name(name).expect("just acquired");
        self.loras.release(slot);
        self.model.merge_lora(&adapter, true)?;
        Ok(t.elapsed().as_secs_f64())
    }

    /// Folds the adapter in `path` (a PEFT folder or a GGUF adapter file) into the float base
    /// weights for good and returns the name requests use for it (folder name or file stem). Its rank is not bounded by the
    /// maximum LoRA rank: merged, an adapter costs nothing per token whatever its rank.
    pub fn merge_adapter_dir(&mut self, path: &Path) -> Result<String> {
        if self.model.is_quantized() {
            return Err(EngineError::model(
                path,
                "merging an adapter needs a float base model, but the model's weights are quantized: load the GGUF \
                 dequantized (--dequantize) or serve a safetensors directory",
            ));
        }
        // A folder's name, or a GGUF adapter file's stem.
        let stem = if path.is_dir() { path.file_name() } else { path.file_stem() };
        let name = stem.and_then(|n| n.to_str()).filter(|n| !n.is_empty()).unwrap_or("merged").to_string();
        let t = Instant::now();
        let adapter = LoraModel::load(&name, path, self.loras.shapes(), usize::MAX)?;
        self.model.merge_lora(&adapter, false)?;
        self.permanent_merge = Some(name.clone());
        tracing::info!(
            adapter = %name,
            path = %path.display(),
            rank = adapter.max_rank,
            ms = format!("{:.1}", t.elapsed().as_secs_f64() * 1e3),
            "adapter merged into the base weights"
        );
        Ok(name)
    }

    /// Restores the base weights after [`Engine::merge_adapter`]; returns the seconds it took.
    pub fn unmerge_adapter(&mut self) -> f64 {
        let t = Instant::now();
        self.model.unmerge_lora();
        t.elapsed().as_secs_f64()
    }

    /// The adapter folded into the weights restorably ([`Engine::merge_adapter`]), if any.
    pub fn merged_adapter(&self) -> Option<&str> {
        self.model.merged_adapter().filter(|m| self.permanent_merge.as_deref() != Some(*m))
    }
}

/// Head counts to undo llama.cpp's q/k row permutation with, for architectures whose GGUF
/// files carry it.
fn qk_permuted_heads(cfg: &ModelConfig) -> Option<(usize, usize)> {
    cfg.architecture.spec().llama_cpp_permutes_qk.then_some((cfg.num_attention_heads, cfg.num_key_value_heads))
}
