//! The CPU kernels: quantized matmul on weights repacked for AVX-512 ([`quant`]), dense
//! matmul through candle, the batched LoRA shrink/expand ([`punica`]) and attention over
//! each sequence's cache ([`attention`]), all on rayon's pool.

pub(crate) mod attention;
pub(crate) mod kernels;
pub(crate) mod punica;
pub mod quant;

use candle_core::quantized::QMatMul;
use candle_core::{CpuStorage, Module, Storage, Tensor};

use super::{AttentionLayer, Backend, Projection};
use crate::error::{EngineError, Result};
use crate::kv::LayerKv;
use crate::lora::{LoraBatch, LoraModule};
use crate::weights::Weight;
use quant::PackedMatrix;

/// The CPU backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

/// A projection weight in the form the CPU multiplies fastest.
enum CpuProjection {
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

impl Projection for CpuProjection {
    fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        let y = match self {
            CpuProjection::Dense(w) => x.matmul(&w.t()?)?,
            CpuProjection::Packed(p) => {
                let x = x.contiguous()?;
                let rows = x.dim(0)?;
                let y = with_f32_slice(&x, |xs| p.matmul(xs, rows))?;
                Tensor::from_vec(y, (rows, p.out_dim()), x.device())?
            }
            CpuProjection::Quantized(q) => q.forward(x)?,
        };
        Ok(y)
    }

    fn size_in_bytes(&self) -> usize {
        match self {
            CpuProjection::Dense(t) => t.elem_count() * 4,
            CpuProjection::Packed(p) => p.size_in_bytes(),
            CpuProjection::Quantized(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            CpuProjection::Quantized(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => t.elem_count() * t.dtype().size_in_bytes(),
        }
    }

    fn is_quantized(&self) -> bool {
        !matches!(self, CpuProjection::Dense(_))
    }

    fn dense(&self) -> Option<&Tensor> {
        match self {
            CpuProjection::Dense(t) => Some(t),
            _ => None,
        }
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn projection(&self, weight: Weight) -> Result<Box<dyn Projection>> {
        Ok(Box::new(match weight {
            Weight::Dense(t) => CpuProjection::Dense(t.contiguous()?),
            Weight::Quantized(q) => match PackedMatrix::from_qtensor(&q) {
                Some(p) => CpuProjection::Packed(p),
                None => CpuProjection::Quantized(QMatMul::from_arc(q)?),
            },
        }))
    }

    fn add_lora_linear(&self, lora: &LoraBatch<'_>, layer: usize, module: LoraModule, x: &Tensor, y: &Tensor) -> Result<()> {
        punica::add_lora_linear(lora, layer, module, x, y)
    }

    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, caches: &mut [&mut LayerKv], layer: &AttentionLayer<'_>) -> Result<Tensor> {
        let rows = q.dim(0)?;
        let out = attention::attend(
            q.flatten_all()?.to_vec1::<f32>()?,
            k.flatten_all()?.to_vec1::<f32>()?,
            &v.flatten_all()?.to_vec1::<f32>()?,
            layer.spans,
            caches,
            layer.rope,
            layer.qk_norm.as_ref(),
            layer.shape,
        );
        Ok(Tensor::from_vec(out, (rows, layer.shape.heads * layer.shape.head_dim), q.device())?)
    }
}
