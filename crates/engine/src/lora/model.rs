//! One LoRA adapter in memory (vLLM's `LoRAModel`), whatever file it came from: per layer
//! and projection, its low-rank pair in the file's element type (float32, float16 or
//! bfloat16; never widened). The readers are `super::peft` and `super::gguf`; they copy
//! the values once out of the file's bytes with [`LoraMatrix::decode`].

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use half::{bf16, f16};
use safetensors::Dtype;

use super::config::PeftConfig;
use super::LoraModule;
use crate::error::Result;

/// One LoRA matrix in the element type of its file: float32 stays float32, float16 and
/// bfloat16 stay 16 bits (half the memory and half the reads per step); the kernels widen
/// to f32 as they read and accumulate in f32, so results are those of the f32 values.
/// Every value is finite (checked at load).
#[derive(Clone, Debug)]
pub enum LoraMatrix {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl LoraMatrix {
    /// Bytes the values occupy.
    pub fn size_in_bytes(&self) -> usize {
        match self {
            Self::F32(v) => v.len() * 4,
            Self::F16(v) => v.len() * 2,
            Self::BF16(v) => v.len() * 2,
        }
    }

    /// Every value as f32 (exact).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self {
            Self::F32(v) => v.clone(),
            Self::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Self::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// Decodes the little-endian `[rows][cols]` matrix `data` of `dtype`, as is or
    /// transposed to `[cols][rows]`, in one pass; refuses other dtypes and non-finite values.
    pub(super) fn decode(dtype: Dtype, data: &[u8], rows: usize, cols: usize, transpose: bool) -> std::result::Result<Self, String> {
        Ok(match dtype {
            Dtype::F32 => Self::F32(decode_as(data, rows, cols, transpose)?),
            Dtype::F16 => Self::F16(decode_as(data, rows, cols, transpose)?),
            Dtype::BF16 => Self::BF16(decode_as(data, rows, cols, transpose)?),
            other => return Err(format!("unsupported dtype {other:?} (float32, float16 or bfloat16)")),
        })
    }
}

/// An element type of adapter files.
///
/// # Safety
/// Every bit pattern of `SIZE` bytes must be a value of the type, stored as those bytes in
/// the target's byte order (so a little-endian target may copy file bytes straight in).
unsafe trait FileElem: Copy + Default {
    /// Bytes per value.
    const SIZE: usize;
    /// The value in `SIZE` little-endian bytes.
    fn from_le(bytes: &[u8]) -> Self;
    /// Neither infinite nor NaN (a test of the exponent bits, which vectorises).
    fn is_finite(self) -> bool;
}

// SAFETY: a plain 4-byte float; every bit pattern is a value.
unsafe impl FileElem for f32 {
    const SIZE: usize = 4;
    #[inline(always)]
    fn from_le(b: &[u8]) -> Self {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        self.to_bits() & 0x7f80_0000 != 0x7f80_0000
    }
}

// SAFETY: a plain 2-byte float; every bit pattern is a value.
unsafe impl FileElem for f16 {
    const SIZE: usize = 2;
    #[inline(always)]
    fn from_le(b: &[u8]) -> Self {
        f16::from_bits(u16::from_le_bytes([b[0], b[1]]))
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        self.to_bits() & 0x7c00 != 0x7c00
    }
}

// SAFETY: a plain 2-byte float; every bit pattern is a value.
unsafe impl FileElem for bf16 {
    const SIZE: usize = 2;
    #[inline(always)]
    fn from_le(b: &[u8]) -> Self {
        bf16::from_bits(u16::from_le_bytes([b[0], b[1]]))
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        self.to_bits() & 0x7f80 != 0x7f80
    }
}

/// [`LoraMatrix::decode`] for one element type.
fn decode_as<E: FileElem>(data: &[u8], rows: usize, cols: usize, transpose: bool) -> std::result::Result<Vec<E>, String> {
    let n = rows * cols;
    if data.len() != n * E::SIZE {
        return Err(format!("{} bytes for a [{rows}, {cols}] matrix of {}-byte values", data.len(), E::SIZE));
    }
    if n == 0 {
        return Ok(Vec::new());
    }
    let values: Vec<E> = if transpose {
        let mut out = vec![E::default(); n];
        // Source rows are read in order; each output row is written sequentially.
        for (row, src) in data.chunks_exact(cols * E::SIZE).enumerate() {
            for (col, b) in src.chunks_exact(E::SIZE).enumerate() {
                out[col * rows + row] = E::from_le(b);
            }
        }
        out
    } else if cfg!(target_endian = "little") {
        let mut out = Vec::<E>::with_capacity(n);
        // SAFETY: `data` holds exactly `n` values' bytes (checked above) in the target's byte
        // order, any bytes are valid values (`FileElem`), and all `n` are written before
        // the length is set.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), out.as_mut_ptr().cast::<u8>(), data.len());
            out.set_len(n);
        }
        out
    } else {
        data.chunks_exact(E::SIZE).map(E::from_le).collect()
    };
    if !values.iter().fold(true, |ok, v| ok & v.is_finite()) {
        return Err("contains NaN or infinite values".into());
    }
    Ok(values)
}

/// The low-rank pair of one projection, laid out for the shrink/expand kernels: `a` is
/// `[r][in]` as PEFT stores it (each row is dotted with the input: shrink) and `b_t` is
/// `[r][out]` (row j is added to the output scaled by shrunk value j: expand).
#[derive(Clone, Debug)]
pub struct LoraLayerWeights {
    pub rank: usize,
    pub scale: f32,
    pub a: LoraMatrix,
    pub b_t: LoraMatrix,
}

impl LoraLayerWeights {
    /// `scale · B · A` as a dense `[out, in]` f32 tensor, for merging into a float base.
    pub fn delta(&self, out_dim: usize, in_dim: usize, device: &Device) -> Result<Tensor> {
        let a = Tensor::from_vec(self.a.to_f32_vec(), (self.rank, in_dim), device)?;
        let b_t = Tensor::from_vec(self.b_t.to_f32_vec(), (self.rank, out_dim), device)?;
        Ok((b_t.t()?.matmul(&a)? * self.scale as f64)?)
    }

    /// Bytes both matrices occupy.
    pub fn size_in_bytes(&self) -> usize {
        self.a.size_in_bytes() + self.b_t.size_in_bytes()
    }
}

/// An adapter ready to be applied: per layer, per projection, its weights if targeted.
#[derive(Debug)]
pub struct LoraModel {
    pub name: String,
    /// The PEFT directory or the GGUF file it was read from.
    pub path: PathBuf,
    /// `layers[l][module.index()]`.
    pub layers: Vec<[Option<LoraLayerWeights>; 7]>,
    /// Largest rank over all projections.
    pub max_rank: usize,
    /// Bytes the adapter's weights occupy in memory.
    pub bytes: usize,
    /// The PEFT config it was read with; `None` for a GGUF adapter, whose only setting is
    /// one alpha (every projection is scaled by alpha over its own rank).
    pub config: Option<PeftConfig>,
}

impl LoraModel {
    /// The weights of one projection, if the adapter targets it.
    pub fn weights(&self, layer: usize, module: LoraModule) -> Option<&LoraLayerWeights> {
        self.layers.get(layer)?[module.index()].as_ref()
    }
}
