//! One LoRA adapter loaded from PEFT files (or a GGUF adapter file, read by `super::gguf`)
//! and checked against the base model's shapes: every tensor must belong to a targeted
//! projection and fit it, or nothing is loaded.
//! Weights stay in their file's element type (float32, float16 or bfloat16; never widened)
//! and are copied once out of the file's bytes, read into memory (not mapped: a file
//! truncated under a map raises SIGBUS).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use half::{bf16, f16};
use safetensors::Dtype;

use super::config::{scaling, PeftConfig};
use super::{LoraModule, ModuleShapes};
use crate::error::{EngineError, Result};
use crate::kernels::Widen;

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
        fn widen<E: Widen>(v: &[E]) -> Vec<f32> {
            v.iter().map(|x| x.widen()).collect()
        }
        match self {
            Self::F32(v) => v.clone(),
            Self::F16(v) => widen(v),
            Self::BF16(v) => widen(v),
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

/// How to convert a pickle adapter, shown when only `adapter_model.bin` exists.
const BIN_HINT: &str = "only a pickle adapter_model.bin was found; loramux reads safetensors. Convert it with: \
python -c \"import torch; from safetensors.torch import save_file; \
save_file(torch.load('adapter_model.bin', map_location='cpu'), 'adapter_model.safetensors')\"";

impl LoraModel {
    /// Reads and validates an adapter: a directory is a PEFT adapter, a file (or a path
    /// ending in `.gguf`) a llama.cpp GGUF adapter. `max_rank` bounds every projection's rank.
    pub fn load(name: &str, path: &Path, shapes: &ModuleShapes, max_rank: usize) -> Result<Self> {
        if path.is_dir() {
            Self::load_peft(name, path, shapes, max_rank)
        } else if path.is_file() || path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
            super::gguf::load(name, path, shapes, max_rank)
        } else {
            Err(EngineError::adapter(
                name,
                "path",
                format!("{} is neither a PEFT adapter directory nor a GGUF adapter file", path.display()),
            ))
        }
    }

    /// Reads and validates a PEFT adapter directory.
    fn load_peft(name: &str, dir: &Path, shapes: &ModuleShapes, max_rank: usize) -> Result<Self> {
        let err = |field: &str, msg: String| EngineError::adapter(name, field, msg);
        let config_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&config_path)
            .map_err(|e| err("adapter_config.json", format!("cannot read: {e}")))?;
        let config: PeftConfig = serde_json::from_str(&text)
            .map_err(|e| err("adapter_config.json", format!("invalid: {e}")))?;
        config
            .check_supported()
            .map_err(|u| err(u.field, u.message))?;
        let matcher = config.matcher().map_err(|u| err(u.field, u.message))?;
        if config.fan_in_fan_out {
            tracing::warn!(adapter = name, "fan_in_fan_out=true on Linear projections: ignored, as PEFT does");
        }

        let weights_path = dir.join("adapter_model.safetensors");
        if !weights_path.exists() {
            let msg = if dir.join("adapter_model.bin").exists() {
                BIN_HINT.to_string()
            } else {
                "adapter_model.safetensors not found".to_string()
            };
            return Err(err("adapter_model.safetensors", msg));
        }
        // Read, not memory-mapped: a file truncated while mapped raises SIGBUS on the next
        // touch of a lost page, which kills the server. A read of a file changing underneath
        // gives at worst inconsistent bytes, which the checks below refuse.
        let bytes = std::fs::read(&weights_path)
            .map_err(|e| err("adapter_model.safetensors", format!("cannot read: {e}")))?;
        let tensors = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| err("adapter_model.safetensors", format!("corrupt: {e}")))?;

        // Every tensor must be a lora_A/lora_B of a projection we know.
        let mut seen = HashSet::new();
        for key in tensors.names() {
            let parsed = parse_key(key, shapes.layers);
            match parsed {
                Some(k) => {
                    seen.insert(k);
                }
                None => {
                    let field = if key.contains("lora_embedding") || key.contains("embed_tokens") {
                        "embed_tokens"
                    } else if key.contains("lm_head") {
                        "lm_head"
                    } else if key.contains("lora_magnitude_vector") {
                        "use_dora"
                    } else {
                        "adapter_model.safetensors"
                    };
                    return Err(err(
                        field,
                        format!("tensor '{key}' does not belong to a supported projection of this base model (an adapter for another model, or LoRA on embeddings/lm_head, which is not supported)"),
                    ));
                }
            }
        }

        let mut layers: Vec<[Option<LoraLayerWeights>; 7]> =
            (0..shapes.layers).map(|_| Default::default()).collect();
        let mut max = 0usize;
        let mut total_bytes = 0usize;
        for (layer, slots) in layers.iter_mut().enumerate() {
            for module in LoraModule::ALL {
                let has_a = seen.contains(&(layer, module, 'A'));
                let has_b = seen.contains(&(layer, module, 'B'));
                let targeted = matcher.targets(module, layer);
                if !has_a && !has_b {
                    if targeted {
                        return Err(err(
                            "target_modules",
                            format!("config targets {} but the weights file has no lora_A/lora_B for it", module.module_name(layer)),
                        ));
                    }
                    continue;
                }
                if !targeted {
                    return Err(err(
                        "target_modules",
                        format!("weights for {} are present but the config does not target it", module.module_name(layer)),
                    ));
                }
                if !(has_a && has_b) {
                    return Err(err(
                        "adapter_model.safetensors",
                        format!("{} has only one of lora_A / lora_B", module.module_name(layer)),
                    ));
                }
                let (r, alpha) = matcher.rank_alpha(&config, module, layer);
                let (out_dim, in_dim) = shapes.shapes[module.index()];
                let prefix = format!("base_model.model.{}", module.module_name(layer));
                let a = tensor(&tensors, &prefix, 'A').map_err(|m| err("adapter_model.safetensors", m))?;
                let b = tensor(&tensors, &prefix, 'B').map_err(|m| err("adapter_model.safetensors", m))?;
                if a.shape() != [r, in_dim] || b.shape() != [out_dim, r] {
                    return Err(err(
                        "shape",
                        format!(
                            "{}: lora_A is {:?} and lora_B is {:?}, but this base needs [{r}, {in_dim}] and [{out_dim}, {r}] (rank {r} from the config): an adapter made for another model?",
                            module.module_name(layer), a.shape(), b.shape()
                        ),
                    ));
                }
                if r > max_rank {
                    return Err(err(
                        "r",
                        format!("rank {r} of {} is above the configured maximum {max_rank} (raise --max-lora-rank)", module.module_name(layer)),
                    ));
                }
                // Finite as a double (checked with the config) is not enough: the kernels scale
                // in f32, where e.g. alpha 1e300 is infinite and the outputs would not be finite.
                let scale = scaling(alpha, r, config.use_rslora) as f32;
                if !scale.is_finite() {
                    return Err(err(
                        "lora_alpha",
                        format!(
                            "{}: the scaling alpha/r = {alpha}/{r} is not a finite 32-bit float",
                            module.module_name(layer)
                        ),
                    ));
                }
                let decode = |view: &safetensors::tensor::TensorView<'_>, which: char, transpose: bool| {
                    let (rows, cols) = (view.shape()[0], view.shape()[1]);
                    LoraMatrix::decode(view.dtype(), view.data(), rows, cols, transpose).map_err(|m| {
                        err("adapter_model.safetensors", format!("{}.lora_{which}: {m}", module.module_name(layer)))
                    })
                };
                // B is [out][r] in the file; kept as [r][out] so the expand step adds rows.
                let weights = LoraLayerWeights {
                    rank: r,
                    scale,
                    a: decode(&a, 'A', false)?,
                    b_t: decode(&b, 'B', true)?,
                };
                total_bytes += weights.size_in_bytes();
                max = max.max(r);
                slots[module.index()] = Some(weights);
            }
        }
        if max == 0 {
            return Err(err("target_modules", "the adapter targets no projection of this model".into()));
        }
        Ok(Self {
            name: name.to_string(),
            path: dir.to_path_buf(),
            layers,
            max_rank: max,
            bytes: total_bytes,
            config: Some(config),
        })
    }

    /// The weights of one projection, if the adapter targets it.
    pub fn weights(&self, layer: usize, module: LoraModule) -> Option<&LoraLayerWeights> {
        self.layers.get(layer)?[module.index()].as_ref()
    }
}

/// `base_model.model.model.layers.{l}.{module}.lora_{A|B}[.default].weight` → parts.
fn parse_key(key: &str, layers: usize) -> Option<(usize, LoraModule, char)> {
    let rest = key.strip_prefix("base_model.model.model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    if layer >= layers {
        return None;
    }
    let rest = rest.strip_suffix(".weight")?;
    let rest = rest.strip_suffix(".default").unwrap_or(rest);
    let (module_path, which) = rest.rsplit_once('.')?;
    let which = match which {
        "lora_A" => 'A',
        "lora_B" => 'B',
        _ => return None,
    };
    let module = LoraModule::ALL.into_iter().find(|m| m.path() == module_path)?;
    Some((layer, module, which))
}

/// The view of `{prefix}.lora_{A|B}.weight` (or with `.default`), which must be a matrix.
fn tensor<'d>(
    tensors: &safetensors::SafeTensors<'d>,
    prefix: &str,
    which: char,
) -> std::result::Result<safetensors::tensor::TensorView<'d>, String> {
    let plain = format!("{prefix}.lora_{which}.weight");
    let named = format!("{prefix}.lora_{which}.default.weight");
    let view = tensors
        .tensor(&plain)
        .or_else(|_| tensors.tensor(&named))
        .map_err(|e| format!("{plain}: {e}"))?;
    if view.shape().len() != 2 {
        return Err(format!("{plain}: expected a matrix, got shape {:?}", view.shape()));
    }
    Ok(view)
}
