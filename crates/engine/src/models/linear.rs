//! Projections. [`Linear`] is `y = x · Wᵀ (+ b)` over a weight the backend prepared;
//! [`LoraLinear`] is a projection that knows which (layer, module) it is and adds each
//! row's adapter to its own output (vLLM's `lora/layers/base_linear.py`: the base kernel,
//! then the Punica step inside the layer), so model code never mentions LoRA.

use std::sync::Arc;

use candle_core::Tensor;

use crate::backend::{Backend, Projection};
use crate::error::{EngineError, Result};
use crate::lora::{LoraBatch, LoraModule};
use crate::weights::{Weight, WeightPath};

/// A projection `y = x · Wᵀ (+ b)` over dense or quantized weights.
pub struct Linear {
    /// Shared (`Arc`) so a base-only view of the model ([`Linear::base_view`]) costs no
    /// copy; a merge replaces it, never writes into it.
    kernel: Arc<dyn Projection>,
    bias: Option<Tensor>,
    /// The unmerged weight, kept while an adapter is merged in restorably.
    original: Option<Arc<dyn Projection>>,
    out_dim: usize,
    in_dim: usize,
}

impl Linear {
    /// Reads `weight` (and `bias` when asked) under `vb`, checking the shape.
    pub fn load(vb: &WeightPath<'_>, out_dim: usize, in_dim: usize, bias: bool, backend: &dyn Backend) -> Result<Self> {
        let b = if bias { Some(vb.dense("bias")?) } else { None };
        Self::from_weight(vb.weight("weight")?, b, out_dim, in_dim, vb, backend)
    }

    /// A projection over a weight already read (the tied LM head reuses the embeddings).
    pub fn from_weight(
        weight: Weight,
        bias: Option<Tensor>,
        out_dim: usize,
        in_dim: usize,
        vb: &WeightPath<'_>,
        backend: &dyn Backend,
    ) -> Result<Self> {
        let dims = weight.dims2()?;
        if dims != (out_dim, in_dim) {
            return Err(EngineError::model(
                vb.source().path(),
                format!("{}: shape {dims:?}, expected ({out_dim}, {in_dim})", vb.prefix()),
            ));
        }
        Ok(Self { kernel: backend.projection(weight)?.into(), bias, original: None, out_dim, in_dim })
    }

    /// `x` is `[rows, in]`; returns a fresh contiguous `[rows, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.kernel.matmul(x)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        Ok(y.contiguous()?)
    }

    /// Bytes of the weight.
    pub fn size_in_bytes(&self) -> usize {
        self.kernel.size_in_bytes()
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out_dim, self.in_dim)
    }

    /// Whether the weight is kept quantized.
    pub fn is_quantized(&self) -> bool {
        self.kernel.is_quantized()
    }

    /// Folds `delta` into a dense weight; with `restorable` the original is kept to restore
    /// exactly (which doubles the weight's memory), without it the merge is final.
    pub(crate) fn merge(&mut self, delta: &Tensor, restorable: bool, backend: &dyn Backend) -> Result<()> {
        let base = self.original.as_deref().unwrap_or(&*self.kernel);
        let Some(w) = base.dense() else {
            return Err(EngineError::InvalidRequest(
                "merging an adapter needs a float base model; load the GGUF with dequantization (--dequantize)".into(),
            ));
        };
        let merged: Arc<dyn Projection> = backend.projection(Weight::Dense((w + delta)?))?.into();
        let previous = std::mem::replace(&mut self.kernel, merged);
        if self.original.is_none() {
            self.original = Some(previous);
        }
        if !restorable {
            self.original = None;
        }
        Ok(())
    }

    /// The same projection over the same (shared, uncopied) weights, without any adapter
    /// merged in restorably: the base weights.
    pub(crate) fn base_view(&self) -> Self {
        let kernel = self.original.clone().unwrap_or_else(|| self.kernel.clone());
        Self { kernel, bias: self.bias.clone(), original: None, out_dim: self.out_dim, in_dim: self.in_dim }
    }

    /// Puts the weight kept by a restorable merge back.
    pub(crate) fn unmerge(&mut self) {
        if let Some(base) = self.original.take() {
            self.kernel = base;
        }
    }
}

/// What a LoRA-aware projection needs from the pass it runs in: the kernels and the
/// adapter of every row.
#[derive(Clone, Copy)]
pub struct LoraContext<'a> {
    pub backend: &'a dyn Backend,
    pub lora: &'a LoraBatch<'a>,
}

/// A projection an adapter may target: the base matmul for every row, then each row's
/// adapter on its own rows (rows of the adapter merged into the weights have none).
pub struct LoraLinear {
    base: Linear,
    layer: usize,
    module: LoraModule,
}

impl LoraLinear {
    /// Reads projection `module` of decoder layer `layer` under `vb`.
    pub fn load(
        vb: &WeightPath<'_>,
        (layer, module): (usize, LoraModule),
        (out_dim, in_dim): (usize, usize),
        bias: bool,
        backend: &dyn Backend,
    ) -> Result<Self> {
        Ok(Self { base: Linear::load(vb, out_dim, in_dim, bias, backend)?, layer, module })
    }

    /// `x · Wᵀ (+ b)`, plus `scale · x · Aᵀ · Bᵀ` on each row with an adapter targeting
    /// this projection.
    pub fn forward(&self, x: &Tensor, ctx: LoraContext<'_>) -> Result<Tensor> {
        let y = self.base.forward(x)?;
        ctx.backend.add_lora_linear(ctx.lora, self.layer, self.module, x, &y)?;
        Ok(y)
    }

    /// The base projection (sizes, merging).
    pub fn base(&self) -> &Linear {
        &self.base
    }

    /// The base projection, mutably (merging an adapter in).
    pub(crate) fn base_mut(&mut self) -> &mut Linear {
        &mut self.base
    }

    /// A base-only view sharing the weights ([`Linear::base_view`]).
    pub(crate) fn base_view(&self) -> Self {
        Self { base: self.base.base_view(), layer: self.layer, module: self.module }
    }

    /// Which projection of which layer this is.
    pub fn target(&self) -> (usize, LoraModule) {
        (self.layer, self.module)
    }
}
