//! The one decoder-only transformer of every architecture in [`super`], built on candle ops
//! and parameterised by [`ModelConfig`] (which carries the architecture's facts). Unlike
//! candle-transformers' stock models it runs a flat batch of rows from many sequences at
//! once (prefill chunks and decode tokens mixed, each with its own KV cache and position),
//! and every projection an adapter may target is a [`LoraLinear`] that applies each row's
//! adapter itself. Structure and tensor names follow Hugging Face's `modeling_llama.py`;
//! the kernels are the [`Backend`]'s.
//!
//! The file is a little longer than our ~500-line guide on purpose: the layers, the batched
//! forward pass, the base-only pass (routing) and merging all work on [`Transformer`]'s
//! private weights, and like candle-transformers' `llama.rs` the model reads top to bottom
//! in one place.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::linear::{Linear, LoraContext, LoraLinear};
use crate::attention::{HeadShape, QkNorm, Rope, SeqSpan};
use crate::backend::{self, AttentionLayer, Backend};
use super::config::{rope_inv_freq, ModelConfig, RopeScaling};
use crate::error::{EngineError, Result};
use crate::kv::{KvCache, LayerKv};
use crate::lora::{LoraBatch, LoraModel, LoraModule, ModuleShapes};
use crate::weights::{Weight, WeightPath, WeightSource};

/// RMS norm with a learned weight.
#[derive(Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn new(vb: &WeightPath<'_>, dim: usize, eps: f64) -> Result<Self> {
        let weight = vb.dense("weight")?;
        if weight.dims() != [dim] {
            let name = vb.name("weight");
            return Err(EngineError::model(vb.source().path(), format!("{name}: shape {:?}, expected [{dim}]", weight.dims())));
        }
        Ok(Self { weight, eps: eps as f32 })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps)?)
    }
}

/// Self-attention of one layer.
pub struct Attention {
    q_proj: LoraLinear,
    k_proj: LoraLinear,
    v_proj: LoraLinear,
    o_proj: LoraLinear,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    shape: HeadShape,
    norm_eps: f32,
}

impl Attention {
    fn new(cfg: &ModelConfig, vb: WeightPath<'_>, layer: usize, backend: &dyn Backend) -> Result<Self> {
        let shapes = ModuleShapes::from_config(cfg);
        let proj = |name: &str, module: LoraModule, bias: bool| {
            LoraLinear::load(&vb.pp(name), (layer, module), shapes.shapes[module.index()], bias, backend)
        };
        let norm = |name: &str| -> Result<Option<Vec<f32>>> {
            if !cfg.qk_norm {
                return Ok(None);
            }
            let n = RmsNorm::new(&vb.pp(name), cfg.head_dim, cfg.rms_norm_eps)?;
            Ok(Some(n.weight.to_vec1::<f32>()?))
        };
        Ok(Self {
            q_proj: proj("q_proj", LoraModule::QProj, cfg.attention_bias)?,
            k_proj: proj("k_proj", LoraModule::KProj, cfg.attention_bias)?,
            v_proj: proj("v_proj", LoraModule::VProj, cfg.attention_bias)?,
            o_proj: proj("o_proj", LoraModule::OProj, false)?,
            q_norm: norm("q_norm")?,
            k_norm: norm("k_norm")?,
            shape: HeadShape {
                heads: cfg.num_attention_heads,
                kv_heads: cfg.num_key_value_heads,
                head_dim: cfg.head_dim,
            },
            norm_eps: cfg.rms_norm_eps as f32,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &mut LayerContext<'_, '_>) -> Result<Tensor> {
        let q = self.q_proj.forward(x, ctx.lora)?;
        let k = self.k_proj.forward(x, ctx.lora)?;
        let v = self.v_proj.forward(x, ctx.lora)?;
        let qk_norm = match (&self.q_norm, &self.k_norm) {
            (Some(q), Some(k)) => Some(QkNorm { q, k, eps: self.norm_eps }),
            _ => None,
        };
        let layer = AttentionLayer { spans: ctx.spans, rope: ctx.rope, qk_norm, shape: self.shape };
        let mut caches: Vec<&mut LayerKv> = ctx.caches.iter_mut().map(|c| &mut c.layers[ctx.layer]).collect();
        let attn = ctx.lora.backend.attention(&q, &k, &v, &mut caches, &layer)?;
        self.o_proj.forward(&attn, ctx.lora)
    }

    fn base_view(&self) -> Self {
        Self {
            q_proj: self.q_proj.base_view(),
            k_proj: self.k_proj.base_view(),
            v_proj: self.v_proj.base_view(),
            o_proj: self.o_proj.base_view(),
            q_norm: self.q_norm.clone(),
            k_norm: self.k_norm.clone(),
            shape: self.shape,
            norm_eps: self.norm_eps,
        }
    }

    fn projections(&self) -> [&LoraLinear; 4] {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj]
    }

    fn projections_mut(&mut self) -> [&mut LoraLinear; 4] {
        [&mut self.q_proj, &mut self.k_proj, &mut self.v_proj, &mut self.o_proj]
    }
}

/// The gated MLP of one layer.
pub struct Mlp {
    gate_proj: LoraLinear,
    up_proj: LoraLinear,
    down_proj: LoraLinear,
}

impl Mlp {
    fn new(cfg: &ModelConfig, vb: WeightPath<'_>, layer: usize, backend: &dyn Backend) -> Result<Self> {
        let shapes = ModuleShapes::from_config(cfg);
        let proj = |name: &str, module: LoraModule| {
            LoraLinear::load(&vb.pp(name), (layer, module), shapes.shapes[module.index()], false, backend)
        };
        Ok(Self {
            gate_proj: proj("gate_proj", LoraModule::GateProj)?,
            up_proj: proj("up_proj", LoraModule::UpProj)?,
            down_proj: proj("down_proj", LoraModule::DownProj)?,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &mut LayerContext<'_, '_>) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x, ctx.lora)?;
        let up = self.up_proj.forward(x, ctx.lora)?;
        let act = (gate.silu()? * up)?.contiguous()?;
        self.down_proj.forward(&act, ctx.lora)
    }

    fn base_view(&self) -> Self {
        Self { gate_proj: self.gate_proj.base_view(), up_proj: self.up_proj.base_view(), down_proj: self.down_proj.base_view() }
    }

    fn projections(&self) -> [&LoraLinear; 3] {
        [&self.gate_proj, &self.up_proj, &self.down_proj]
    }

    fn projections_mut(&mut self) -> [&mut LoraLinear; 3] {
        [&mut self.gate_proj, &mut self.up_proj, &mut self.down_proj]
    }
}

/// One pre-norm decoder layer.
pub struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn new(cfg: &ModelConfig, vb: WeightPath<'_>, layer: usize, backend: &dyn Backend) -> Result<Self> {
        Ok(Self {
            input_layernorm: RmsNorm::new(&vb.pp("input_layernorm"), cfg.hidden_size, cfg.rms_norm_eps)?,
            self_attn: Attention::new(cfg, vb.pp("self_attn"), layer, backend)?,
            post_attention_layernorm: RmsNorm::new(&vb.pp("post_attention_layernorm"), cfg.hidden_size, cfg.rms_norm_eps)?,
            mlp: Mlp::new(cfg, vb.pp("mlp"), layer, backend)?,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &mut LayerContext<'_, '_>) -> Result<Tensor> {
        let h = self.input_layernorm.forward(x)?;
        let x = (x + self.self_attn.forward(&h, ctx)?)?;
        let h = self.post_attention_layernorm.forward(&x)?;
        Ok((&x + self.mlp.forward(&h, ctx)?)?)
    }

    fn base_view(&self) -> Self {
        Self {
            input_layernorm: self.input_layernorm.clone(),
            self_attn: self.self_attn.base_view(),
            post_attention_layernorm: self.post_attention_layernorm.clone(),
            mlp: self.mlp.base_view(),
        }
    }

    /// The seven projections an adapter may target, in [`LoraModule::ALL`] order.
    fn projections(&self) -> impl Iterator<Item = &LoraLinear> {
        self.self_attn.projections().into_iter().chain(self.mlp.projections())
    }

    fn projections_mut(&mut self) -> impl Iterator<Item = &mut LoraLinear> {
        self.self_attn.projections_mut().into_iter().chain(self.mlp.projections_mut())
    }
}

/// What every layer of one forward pass shares.
struct LayerContext<'a, 'c> {
    layer: usize,
    spans: &'a [SeqSpan],
    caches: &'a mut [&'c mut KvCache],
    rope: &'a Rope,
    lora: LoraContext<'a>,
}

#[derive(Clone)]
enum Embedding {
    Dense(Tensor),
    Quantized(std::sync::Arc<candle_core::quantized::QTensor>),
}

/// Which logits a forward pass returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsFor<'a> {
    /// The last row of each span (what generation samples from).
    LastOfEachSpan,
    /// Every row (for tests against reference logits).
    AllRows,
    /// These rows, in this order (the last of most spans, every row of a sequence whose
    /// prompt log-probabilities were asked for).
    Rows(&'a [u32]),
}

/// The whole model: embeddings, layers, final norm and LM head.
pub struct Transformer {
    cfg: ModelConfig,
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    device: Device,
    backend: Arc<dyn Backend>,
    merged: Option<String>,
}

impl Transformer {
    /// Builds the model from a weight source, with the kernels of its device;
    /// `max_positions` bounds the rotary tables.
    pub fn new(cfg: &ModelConfig, src: &WeightSource, max_positions: usize) -> Result<Self> {
        let backend = backend::for_device(src.device())?;
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let vb = WeightPath::root(src);
        let embed_vb = vb.pp("model").pp("embed_tokens");
        let embed_weight = embed_vb.weight("weight")?;
        if embed_weight.dims2()? != (v, h) {
            return Err(EngineError::model(src.path(), format!("model.embed_tokens.weight: shape {:?}, expected ({v}, {h})", embed_weight.dims2()?)));
        }
        let embed_tokens = match &embed_weight {
            Weight::Dense(t) => Embedding::Dense(t.clone()),
            Weight::Quantized(q) => Embedding::Quantized(q.clone()),
        };
        let lm_head_vb = vb.pp("lm_head");
        let lm_head = if !cfg.tie_word_embeddings && lm_head_vb.contains("weight") {
            Linear::load(&lm_head_vb, v, h, false, &*backend)?
        } else {
            Linear::from_weight(embed_weight, None, v, h, &lm_head_vb, &*backend)?
        };
        let layers_vb = vb.pp("model").pp("layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, layers_vb.pp(i), i, &*backend))
            .collect::<Result<Vec<_>>>()?;
        let mut cfg = cfg.clone();
        if let Some(factors) = src.rope_freq_factors()? {
            cfg.rope_scaling = Some(RopeScaling::FreqFactors(factors));
        }
        let rope = Rope::new(&rope_inv_freq(&cfg), max_positions);
        Ok(Self {
            embed_tokens,
            layers,
            norm: RmsNorm::new(&vb.pp("model").pp("norm"), h, cfg.rms_norm_eps)?,
            lm_head,
            rope,
            device: src.device().clone(),
            backend,
            cfg,
            merged: None,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Where the weights live (a second model, the router's, goes on the same device).
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes of all weights.
    pub fn size_in_bytes(&self) -> usize {
        let emb = match &self.embed_tokens {
            Embedding::Dense(t) => t.elem_count() * 4,
            Embedding::Quantized(q) => q.storage_size_in_bytes(),
        };
        let projections: usize = self.layers.iter().flat_map(|l| l.projections()).map(|p| p.base().size_in_bytes()).sum();
        emb + self.lm_head.size_in_bytes() + projections
    }

    /// Weight bytes one decode step reads: everything but the embedding table (of which a
    /// step reads one row per sequence).
    pub fn bytes_read_per_token(&self) -> usize {
        let emb = match &self.embed_tokens {
            Embedding::Dense(t) => t.elem_count() * 4,
            Embedding::Quantized(q) => q.storage_size_in_bytes(),
        };
        self.size_in_bytes() - emb
    }

    /// Whether projections are kept quantized.
    pub fn is_quantized(&self) -> bool {
        self.layers.first().is_some_and(|l| l.self_attn.q_proj.base().is_quantized())
    }

    /// A fresh KV cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.num_hidden_layers, self.cfg.num_key_value_heads * self.cfg.head_dim)
    }

    /// Runs one step over a flat batch. `tokens` holds every row; `spans[i]` says which rows
    /// belong to sequence `i`, whose cache is `caches[i]` (its `pos` must equal the cache
    /// length). Rows get adapters from `lora`. Caches are extended by each span's rows.
    pub fn forward(
        &self,
        tokens: &[u32],
        spans: &[SeqSpan],
        caches: &mut [&mut KvCache],
        lora: &LoraBatch<'_>,
        logits_for: LogitsFor<'_>,
    ) -> Result<Tensor> {
        Ok(self.forward_with_hidden(tokens, spans, caches, lora, logits_for, &[])?.0)
    }

    /// [`Transformer::forward`], and also the last decoder layer's output (the residual
    /// stream before the final norm) at `hidden_rows`, `[hidden_rows.len(), hidden]` (`None`
    /// when no row is asked for): what an embedding request pools. With no logits row asked
    /// for, the final norm and LM head are skipped (logits `[0, vocab]`).
    pub fn forward_with_hidden(
        &self,
        tokens: &[u32],
        spans: &[SeqSpan],
        caches: &mut [&mut KvCache],
        lora: &LoraBatch<'_>,
        logits_for: LogitsFor<'_>,
        hidden_rows: &[u32],
    ) -> Result<(Tensor, Option<Tensor>)> {
        // A parallel kernel started from outside rayon's pool blocks its caller on a latch
        // until a worker has run it: a sleep and a wake-up per operation, hundreds a step.
        // Run the whole pass on a pool thread instead, where kernels fork and join by work
        // stealing.
        if rayon::current_thread_index().is_none() {
            return rayon::scope(|_| self.forward_with_hidden(tokens, spans, caches, lora, logits_for, hidden_rows));
        }
        if spans.len() != caches.len() {
            return Err(EngineError::InvalidRequest("one cache per span".into()));
        }
        for (s, c) in spans.iter().zip(caches.iter()) {
            if s.pos != c.len() {
                return Err(EngineError::InvalidRequest(format!("span at position {} but cache holds {}", s.pos, c.len())));
            }
            if s.pos + s.len > self.rope.max_positions() {
                return Err(EngineError::InvalidRequest(format!(
                    "sequence of {} tokens exceeds the maximum model length {}",
                    s.pos + s.len,
                    self.rope.max_positions()
                )));
            }
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(EngineError::InvalidRequest(format!("token id {bad} is outside the vocabulary ({})", self.cfg.vocab_size)));
        }
        let ids = Tensor::from_slice(tokens, tokens.len(), &self.device)?;
        let mut x = match &self.embed_tokens {
            Embedding::Dense(t) => t.index_select(&ids, 0)?,
            Embedding::Quantized(q) => q.embedding(&ids)?,
        };
        let before: Vec<usize> = caches.iter().map(|c| c.len()).collect();
        let lora = LoraContext { backend: &*self.backend, lora };
        let mut ctx = LayerContext { layer: 0, spans, caches, rope: &self.rope, lora };
        for (i, layer) in self.layers.iter().enumerate() {
            ctx.layer = i;
            match layer.forward(&x, &mut ctx) {
                Ok(y) => x = y,
                Err(e) => {
                    // Leave every cache as it was before this step.
                    for (c, &len) in ctx.caches.iter_mut().zip(&before) {
                        c.truncate(len);
                    }
                    return Err(e);
                }
            }
        }
        for (c, s) in ctx.caches.iter_mut().zip(spans) {
            c.commit(s.len);
        }
        let hidden = match hidden_rows {
            [] => None,
            rows => Some(x.index_select(&Tensor::from_slice(rows, rows.len(), &self.device)?, 0)?.to_dtype(DType::F32)?),
        };
        let x = match logits_for {
            LogitsFor::AllRows => x,
            LogitsFor::Rows([]) => return Ok((Tensor::zeros((0, self.cfg.vocab_size), DType::F32, &self.device)?, hidden)),
            LogitsFor::Rows(rows) => x.index_select(&Tensor::from_slice(rows, rows.len(), &self.device)?, 0)?,
            LogitsFor::LastOfEachSpan => {
                let last: Vec<u32> = spans.iter().map(|s| (s.start + s.len - 1) as u32).collect();
                x.index_select(&Tensor::from_slice(&last, last.len(), &self.device)?, 0)?
            }
        };
        let x = self.norm.forward(&x.contiguous()?)?;
        let logits = self.lm_head.forward(&x)?;
        Ok((logits.to_dtype(DType::F32)?, hidden))
    }

    /// A second handle on the same weights (shared, not copied: every weight is reference
    /// counted) without any adapter merged in restorably, for base-only passes off the batch
    /// loop ([`Transformer::hidden_states`]). A later merge into `self` replaces `self`'s
    /// weights and leaves the view's alone; an adapter merged for good before the view was
    /// taken (`--merge-lora`) is part of its weights.
    pub fn base_view(&self) -> Self {
        Self {
            cfg: self.cfg.clone(),
            embed_tokens: self.embed_tokens.clone(),
            layers: self.layers.iter().map(DecoderLayer::base_view).collect(),
            norm: self.norm.clone(),
            lm_head: self.lm_head.base_view(),
            rope: self.rope.clone(),
            device: self.device.clone(),
            backend: self.backend.clone(),
            merged: None,
        }
    }

    /// The residual stream after the first `layer` decoder layers (`0` = the token
    /// embeddings, `num_hidden_layers` = the last layer's output, before the final norm),
    /// one `[tokens, hidden]` tensor per entry of `layers`, for one sequence run with the base
    /// weights only (no adapter) in a scratch KV cache: nothing of the batch loop is touched.
    pub fn hidden_states(&self, tokens: &[u32], layers: &[usize]) -> Result<Vec<Tensor>> {
        if rayon::current_thread_index().is_none() {
            return rayon::scope(|_| self.hidden_states(tokens, layers));
        }
        let n = self.cfg.num_hidden_layers;
        if let Some(&bad) = layers.iter().find(|&&l| l > n) {
            return Err(EngineError::InvalidRequest(format!("layer {bad} is past the model's {n} layers")));
        }
        if tokens.is_empty() {
            return Err(EngineError::InvalidRequest("no tokens".into()));
        }
        if tokens.len() > self.rope.max_positions() {
            return Err(EngineError::InvalidRequest(format!(
                "sequence of {} tokens exceeds the maximum model length {}",
                tokens.len(),
                self.rope.max_positions()
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(EngineError::InvalidRequest(format!("token id {bad} is outside the vocabulary ({})", self.cfg.vocab_size)));
        }
        let deepest = layers.iter().copied().max().unwrap_or(0);
        let ids = Tensor::from_slice(tokens, tokens.len(), &self.device)?;
        let mut x = match &self.embed_tokens {
            Embedding::Dense(t) => t.index_select(&ids, 0)?,
            Embedding::Quantized(q) => q.embedding(&ids)?,
        };
        let mut cache = self.new_cache();
        cache.reserve(tokens.len());
        let spans = [SeqSpan { start: 0, len: tokens.len(), pos: 0 }];
        let mut caches = [&mut cache];
        let empty = LoraBatch::default();
        let lora = LoraContext { backend: &*self.backend, lora: &empty };
        let mut ctx = LayerContext { layer: 0, spans: &spans, caches: &mut caches, rope: &self.rope, lora };
        let mut out: Vec<Option<Tensor>> = vec![None; layers.len()];
        let mut keep = |depth: usize, x: &Tensor| {
            for (o, &l) in out.iter_mut().zip(layers) {
                if l == depth {
                    *o = Some(x.clone());
                }
            }
        };
        keep(0, &x);
        for (i, layer) in self.layers.iter().enumerate().take(deepest) {
            ctx.layer = i;
            x = layer.forward(&x, &mut ctx)?;
            keep(i + 1, &x);
        }
        Ok(out.into_iter().map(|o| o.expect("every layer kept")).collect())
    }

    /// Folds one adapter into the float base weights (`W + scale·B·A`); requests then run
    /// without LoRA. Any previously merged adapter is unmerged first. `restorable` keeps the
    /// original weights so [`Transformer::unmerge_lora`] restores them exactly; a deployment
    /// that only ever serves the merged model passes `false` and pays no extra memory.
    pub fn merge_lora(&mut self, adapter: &LoraModel, restorable: bool) -> Result<()> {
        if self.is_quantized() {
            return Err(EngineError::InvalidRequest(
                "merging an adapter needs a float base model; load the GGUF with dequantization (--dequantize)".into(),
            ));
        }
        self.unmerge_lora();
        for layer in &mut self.layers {
            for projection in layer.projections_mut() {
                let (l, module) = projection.target();
                if let Some(w) = adapter.weights(l, module) {
                    let (out_dim, in_dim) = projection.base().dims();
                    let delta = w.delta(out_dim, in_dim, &self.device)?;
                    projection.base_mut().merge(&delta, restorable, &*self.backend)?;
                }
            }
        }
        self.merged = Some(adapter.name.clone());
        Ok(())
    }

    /// Restores the exact base weights after [`Transformer::merge_lora`].
    pub fn unmerge_lora(&mut self) {
        for layer in &mut self.layers {
            for projection in layer.projections_mut() {
                projection.base_mut().unmerge();
            }
        }
        self.merged = None;
    }

    /// Name of the adapter merged into the weights, if any.
    pub fn merged_adapter(&self) -> Option<&str> {
        self.merged.as_deref()
    }
}
