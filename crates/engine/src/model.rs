//! One decoder-only transformer for Llama, Qwen2 and Qwen3, built on candle ops and
//! parameterised by [`ModelConfig`]. Unlike candle-transformers' stock models it runs a
//! flat batch of rows from many sequences at once (prefill chunks and decode tokens mixed,
//! each with its own KV cache and position) and takes a per-row LoRA adapter.
//! Structure and tensor names follow Hugging Face's `modeling_llama.py`.

use candle_core::quantized::QMatMul;
use candle_core::{CpuStorage, DType, Device, Module, Storage, Tensor};

use crate::attention::{attend, HeadShape, QkNorm, Rope, SeqSpan};
use crate::config::{rope_inv_freq, ModelConfig};
use crate::error::{EngineError, Result};
use crate::kv::{KvCache, LayerKv};
use crate::lora::{LoraBatch, LoraModel, LoraModule};
use crate::quant::PackedMatrix;
use crate::weights::{Weight, WeightSource};

/// A projection `y = x · Wᵀ (+ b)` over dense or quantized weights.
pub struct Linear {
    kernel: LinearKernel,
    bias: Option<Tensor>,
    /// The unmerged dense weight, kept while an adapter is merged in.
    original: Option<Tensor>,
    out_dim: usize,
    in_dim: usize,
}

enum LinearKernel {
    Dense(Tensor),
    /// Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 repacked for our SIMD kernel.
    Packed(PackedMatrix),
    /// Other GGUF types, through candle's kernels.
    Quantized(QMatMul),
}

/// Calls `f` with the contiguous f32 data of a CPU tensor, without copying.
fn with_f32_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Ok(f(&v[a..b])),
        _ => Err(EngineError::InvalidRequest("expected a contiguous f32 CPU tensor".into())),
    }
}

impl Linear {
    fn new(weight: Weight, bias: Option<Tensor>, out_dim: usize, in_dim: usize, name: &str, path: &std::path::Path) -> Result<Self> {
        let dims = weight.dims2()?;
        if dims != (out_dim, in_dim) {
            return Err(EngineError::model(
                path,
                format!("{name}: shape {dims:?}, expected ({out_dim}, {in_dim})"),
            ));
        }
        let kernel = match weight {
            Weight::Dense(t) => LinearKernel::Dense(t.contiguous()?),
            Weight::Quantized(q) => match PackedMatrix::from_qtensor(&q) {
                Some(p) => LinearKernel::Packed(p),
                None => LinearKernel::Quantized(QMatMul::from_arc(q)?),
            },
        };
        Ok(Self {
            kernel,
            bias,
            original: None,
            out_dim,
            in_dim,
        })
    }

    /// `x` is `[rows, in]`; returns a fresh contiguous `[rows, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.kernel {
            LinearKernel::Dense(w) => x.matmul(&w.t()?)?,
            LinearKernel::Packed(p) => {
                let x = x.contiguous()?;
                let rows = x.dim(0)?;
                let y = with_f32_slice(&x, |xs| p.matmul(xs, rows))?;
                Tensor::from_vec(y, (rows, p.out_dim()), x.device())?
            }
            LinearKernel::Quantized(q) => q.forward(x)?,
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        Ok(y.contiguous()?)
    }

    /// Bytes of the weight.
    pub fn size_in_bytes(&self) -> usize {
        match &self.kernel {
            LinearKernel::Dense(t) => t.elem_count() * 4,
            LinearKernel::Packed(p) => p.size_in_bytes(),
            LinearKernel::Quantized(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            LinearKernel::Quantized(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                t.elem_count() * t.dtype().size_in_bytes()
            }
        }
    }

    /// Folds `delta` into a dense weight; with `restorable` the original is kept to restore
    /// exactly (which doubles the weight's memory), without it the merge is final.
    fn merge(&mut self, delta: &Tensor, restorable: bool) -> Result<()> {
        let LinearKernel::Dense(w) = &self.kernel else {
            return Err(EngineError::InvalidRequest(
                "merging an adapter needs a float base model; load the GGUF with dequantization (--dequantize)".into(),
            ));
        };
        let original = self.original.take().unwrap_or_else(|| w.clone());
        self.kernel = LinearKernel::Dense((&original + delta)?.contiguous()?);
        self.original = restorable.then_some(original);
        Ok(())
    }

    fn unmerge(&mut self) {
        if let Some(w) = self.original.take() {
            self.kernel = LinearKernel::Dense(w);
        }
    }

    fn is_quantized(&self) -> bool {
        matches!(self.kernel, LinearKernel::Quantized(_) | LinearKernel::Packed(_))
    }
}

/// RMS norm with a learned weight.
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn new(src: &WeightSource, name: &str, dim: usize, eps: f64) -> Result<Self> {
        let weight = src.dense(name)?;
        if weight.dims() != [dim] {
            return Err(EngineError::model(src.path(), format!("{name}: shape {:?}, expected [{dim}]", weight.dims())));
        }
        Ok(Self { weight, eps: eps as f32 })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps)?)
    }
}

fn linear(src: &WeightSource, prefix: &str, out_dim: usize, in_dim: usize, bias: bool) -> Result<Linear> {
    let w = src.weight(&format!("{prefix}.weight"), false)?;
    let b = if bias { Some(src.dense(&format!("{prefix}.bias"))?) } else { None };
    Linear::new(w, b, out_dim, in_dim, prefix, src.path())
}

/// Self-attention of one layer.
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    shape: HeadShape,
    norm_eps: f32,
}

impl Attention {
    fn new(cfg: &ModelConfig, src: &WeightSource, prefix: &str) -> Result<Self> {
        let h = cfg.hidden_size;
        let q_dim = cfg.num_attention_heads * cfg.head_dim;
        let kv_dim = cfg.num_key_value_heads * cfg.head_dim;
        let norm = |name: &str| -> Result<Option<Vec<f32>>> {
            if !cfg.qk_norm {
                return Ok(None);
            }
            let n = RmsNorm::new(src, &format!("{prefix}.{name}.weight"), cfg.head_dim, cfg.rms_norm_eps)?;
            Ok(Some(n.weight.to_vec1::<f32>()?))
        };
        Ok(Self {
            q_proj: linear(src, &format!("{prefix}.q_proj"), q_dim, h, cfg.attention_bias)?,
            k_proj: linear(src, &format!("{prefix}.k_proj"), kv_dim, h, cfg.attention_bias)?,
            v_proj: linear(src, &format!("{prefix}.v_proj"), kv_dim, h, cfg.attention_bias)?,
            o_proj: linear(src, &format!("{prefix}.o_proj"), h, q_dim, false)?,
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
        let layer = ctx.layer;
        let q = self.q_proj.forward(x)?;
        ctx.lora.add_lora_linear(layer, LoraModule::QProj, x, &q)?;
        let k = self.k_proj.forward(x)?;
        ctx.lora.add_lora_linear(layer, LoraModule::KProj, x, &k)?;
        let v = self.v_proj.forward(x)?;
        ctx.lora.add_lora_linear(layer, LoraModule::VProj, x, &v)?;
        let rows = x.dim(0)?;
        let qk_norm = match (&self.q_norm, &self.k_norm) {
            (Some(q), Some(k)) => Some(QkNorm { q, k, eps: self.norm_eps }),
            _ => None,
        };
        let mut caches: Vec<&mut LayerKv> =
            ctx.caches.iter_mut().map(|c| &mut c.layers[layer]).collect();
        let out = attend(
            q.flatten_all()?.to_vec1::<f32>()?,
            k.flatten_all()?.to_vec1::<f32>()?,
            &v.flatten_all()?.to_vec1::<f32>()?,
            ctx.spans,
            &mut caches,
            ctx.rope,
            qk_norm.as_ref(),
            self.shape,
        );
        let attn = Tensor::from_vec(out, (rows, self.shape.heads * self.shape.head_dim), x.device())?;
        let o = self.o_proj.forward(&attn)?;
        ctx.lora.add_lora_linear(layer, LoraModule::OProj, &attn, &o)?;
        Ok(o)
    }
}

/// The gated MLP of one layer.
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(cfg: &ModelConfig, src: &WeightSource, prefix: &str) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: linear(src, &format!("{prefix}.gate_proj"), i, h, false)?,
            up_proj: linear(src, &format!("{prefix}.up_proj"), i, h, false)?,
            down_proj: linear(src, &format!("{prefix}.down_proj"), h, i, false)?,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &mut LayerContext<'_, '_>) -> Result<Tensor> {
        let layer = ctx.layer;
        let gate = self.gate_proj.forward(x)?;
        ctx.lora.add_lora_linear(layer, LoraModule::GateProj, x, &gate)?;
        let up = self.up_proj.forward(x)?;
        ctx.lora.add_lora_linear(layer, LoraModule::UpProj, x, &up)?;
        let act = (gate.silu()? * up)?.contiguous()?;
        let down = self.down_proj.forward(&act)?;
        ctx.lora.add_lora_linear(layer, LoraModule::DownProj, &act, &down)?;
        Ok(down)
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
    fn new(cfg: &ModelConfig, src: &WeightSource, prefix: &str) -> Result<Self> {
        Ok(Self {
            input_layernorm: RmsNorm::new(src, &format!("{prefix}.input_layernorm.weight"), cfg.hidden_size, cfg.rms_norm_eps)?,
            self_attn: Attention::new(cfg, src, &format!("{prefix}.self_attn"))?,
            post_attention_layernorm: RmsNorm::new(src, &format!("{prefix}.post_attention_layernorm.weight"), cfg.hidden_size, cfg.rms_norm_eps)?,
            mlp: Mlp::new(cfg, src, &format!("{prefix}.mlp"))?,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &mut LayerContext<'_, '_>) -> Result<Tensor> {
        let h = self.input_layernorm.forward(x)?;
        let x = (x + self.self_attn.forward(&h, ctx)?)?;
        let h = self.post_attention_layernorm.forward(&x)?;
        Ok((&x + self.mlp.forward(&h, ctx)?)?)
    }

    fn linears_mut(&mut self) -> [&mut Linear; 7] {
        [
            &mut self.self_attn.q_proj,
            &mut self.self_attn.k_proj,
            &mut self.self_attn.v_proj,
            &mut self.self_attn.o_proj,
            &mut self.mlp.gate_proj,
            &mut self.mlp.up_proj,
            &mut self.mlp.down_proj,
        ]
    }
}

/// What every layer of one forward pass shares.
struct LayerContext<'a, 'c> {
    layer: usize,
    spans: &'a [SeqSpan],
    caches: &'a mut [&'c mut KvCache],
    rope: &'a Rope,
    lora: &'a LoraBatch<'a>,
}

enum Embedding {
    Dense(Tensor),
    Quantized(std::sync::Arc<candle_core::quantized::QTensor>),
}

/// Which logits a forward pass returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsFor {
    /// The last row of each span (what generation samples from).
    LastOfEachSpan,
    /// Every row (for tests against reference logits).
    AllRows,
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
    merged: Option<String>,
}

impl Transformer {
    /// Builds the model from a weight source; `max_positions` bounds the rotary tables.
    pub fn new(cfg: &ModelConfig, src: &WeightSource, max_positions: usize) -> Result<Self> {
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed_weight = src.weight("model.embed_tokens.weight", false)?;
        if embed_weight.dims2()? != (v, h) {
            return Err(EngineError::model(src.path(), format!("model.embed_tokens.weight: shape {:?}, expected ({v}, {h})", embed_weight.dims2()?)));
        }
        let embed_tokens = match &embed_weight {
            Weight::Dense(t) => Embedding::Dense(t.clone()),
            Weight::Quantized(q) => Embedding::Quantized(q.clone()),
        };
        let lm_head = if !cfg.tie_word_embeddings && src.contains("lm_head.weight") {
            linear(src, "lm_head", v, h, false)?
        } else {
            Linear::new(embed_weight, None, v, h, "lm_head", src.path())?
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, src, &format!("model.layers.{i}")))
            .collect::<Result<Vec<_>>>()?;
        let mut cfg = cfg.clone();
        if let Some(factors) = src.rope_freq_factors()? {
            cfg.rope_scaling = Some(factors);
        }
        let rope = Rope::new(&rope_inv_freq(&cfg), max_positions);
        Ok(Self {
            embed_tokens,
            layers,
            norm: RmsNorm::new(src, "model.norm.weight", h, cfg.rms_norm_eps)?,
            lm_head,
            rope,
            device: src.device().clone(),
            cfg,
            merged: None,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Bytes of all weights.
    pub fn size_in_bytes(&self) -> usize {
        let emb = match &self.embed_tokens {
            Embedding::Dense(t) => t.elem_count() * 4,
            Embedding::Quantized(q) => q.storage_size_in_bytes(),
        };
        let mut total = emb + self.lm_head.size_in_bytes();
        for l in &self.layers {
            total += [&l.self_attn.q_proj, &l.self_attn.k_proj, &l.self_attn.v_proj, &l.self_attn.o_proj, &l.mlp.gate_proj, &l.mlp.up_proj, &l.mlp.down_proj]
                .iter()
                .map(|l| l.size_in_bytes())
                .sum::<usize>();
        }
        total
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
        self.layers.first().is_some_and(|l| l.self_attn.q_proj.is_quantized())
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
        logits_for: LogitsFor,
    ) -> Result<Tensor> {
        // A parallel kernel started from outside rayon's pool blocks its caller on a latch
        // until a worker has run it: a sleep and a wake-up per operation, hundreds a step.
        // Run the whole pass on a pool thread instead, where kernels fork and join by work
        // stealing.
        if rayon::current_thread_index().is_none() {
            return rayon::scope(|_| self.forward(tokens, spans, caches, lora, logits_for));
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
        let x = match logits_for {
            LogitsFor::AllRows => x,
            LogitsFor::LastOfEachSpan => {
                let last: Vec<u32> = spans.iter().map(|s| (s.start + s.len - 1) as u32).collect();
                x.index_select(&Tensor::from_slice(&last, last.len(), &self.device)?, 0)?
            }
        };
        let x = self.norm.forward(&x.contiguous()?)?;
        let logits = self.lm_head.forward(&x)?;
        Ok(logits.to_dtype(DType::F32)?)
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
        let device = self.device.clone();
        for (l, layer) in self.layers.iter_mut().enumerate() {
            for (module, linear) in LoraModule::ALL.into_iter().zip(layer.linears_mut()) {
                if let Some(w) = adapter.weights(l, module) {
                    let delta = w.delta(linear.out_dim, linear.in_dim, &device)?;
                    linear.merge(&delta, restorable)?;
                }
            }
        }
        self.merged = Some(adapter.name.clone());
        Ok(())
    }

    /// Restores the exact base weights after [`Transformer::merge_lora`].
    pub fn unmerge_lora(&mut self) {
        for layer in &mut self.layers {
            for linear in layer.linears_mut() {
                linear.unmerge();
            }
        }
        self.merged = None;
    }

    /// Name of the adapter merged into the weights, if any.
    pub fn merged_adapter(&self) -> Option<&str> {
        self.merged.as_deref()
    }
}
