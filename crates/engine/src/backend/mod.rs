//! The seam between the model and the device (vLLM's `punica_selector` + platform kernels):
//! the three kernels a forward pass spends its time in — a projection's matmul, the
//! batched LoRA shrink/expand, and attention over each sequence's KV cache — behind one
//! narrow interface, chosen once when the model loads. Model and scheduler code never name
//! a device's kernels, so a second backend (CUDA) is a second implementation of
//! [`Backend`], not an edit of the model. Today the CPU kernels ([`cpu`]) are the only one.

pub mod cpu;

use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::attention::{HeadShape, QkNorm, Rope, SeqSpan};
use crate::error::{EngineError, Result};
use crate::kv::LayerKv;
use crate::lora::{LoraBatch, LoraModule};
use crate::weights::Weight;

/// A projection weight prepared for one backend's matmul (repacked, uploaded, kept as is).
pub trait Projection: Send + Sync {
    /// `x · Wᵀ` for `x` of `[rows, in]`: a fresh contiguous `[rows, out]`.
    fn matmul(&self, x: &Tensor) -> Result<Tensor>;
    /// Bytes the weight occupies.
    fn size_in_bytes(&self) -> usize;
    /// Whether the weight is kept quantized (then no adapter can be merged into it).
    fn is_quantized(&self) -> bool;
    /// The weight as a dense `[out, in]` f32 tensor, when it is kept so: what merging an
    /// adapter adds to.
    fn dense(&self) -> Option<&Tensor>;
}

/// What one layer's attention needs besides q, k and v: where each sequence's rows sit,
/// the rotary tables, the head layout and Qwen3's optional q/k norms.
pub struct AttentionLayer<'a> {
    pub spans: &'a [SeqSpan],
    pub rope: &'a Rope,
    pub qk_norm: Option<QkNorm<'a>>,
    pub shape: HeadShape,
}

/// The kernels of one device.
pub trait Backend: Send + Sync {
    /// A short name for logs ("cpu").
    fn name(&self) -> &'static str;
    /// Prepares a projection weight for [`Projection::matmul`].
    fn projection(&self, weight: Weight) -> Result<Box<dyn Projection>>;
    /// `y[rows] += scale · x[rows] · Aᵀ · Bᵀ` for every row whose adapter in `lora`
    /// targets `(layer, module)`; `x` is `[rows, in]`, `y` is `[rows, out]`.
    fn add_lora_linear(&self, lora: &LoraBatch<'_>, layer: usize, module: LoraModule, x: &Tensor, y: &Tensor) -> Result<()>;
    /// Attention of one layer: `q` is `[rows, heads·hd]`, `k` and `v` are
    /// `[rows, kv_heads·hd]`; keys and values are appended to each span's cache
    /// (`caches[i]` for `layer.spans[i]`). Returns `[rows, heads·hd]`.
    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, caches: &mut [&mut LayerKv], layer: &AttentionLayer<'_>) -> Result<Tensor>;
}

/// The backend for `device`: the CPU kernels for the CPU; other devices have none yet.
pub fn for_device(device: &Device) -> Result<Arc<dyn Backend>> {
    match device {
        Device::Cpu => Ok(Arc::new(cpu::CpuBackend)),
        other => Err(EngineError::Config(format!(
            "no kernels for device {other:?} in this build: loramux runs on the CPU (a CUDA backend would implement backend::Backend)"
        ))),
    }
}
