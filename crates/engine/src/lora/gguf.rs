//! LoRA adapters in llama.cpp's GGUF format (what its `convert_lora_to_gguf.py` writes from
//! a PEFT adapter), read into the same [`LoraModel`] as a PEFT directory, so llama.cpp users
//! serve the files they already have. The format's meaning, as llama.cpp applies it:
//!
//! - metadata `general.type = "adapter"`, `adapter.type = "lora"`, `general.architecture`
//!   (must be the base's) and one `adapter.lora.alpha`: every projection is scaled by
//!   alpha over its own rank (a missing or zero alpha scales by 1). PEFT's `use_rslora` and
//!   `alpha_pattern` have no place in the format: the converter drops them.
//! - tensors `blk.N.<attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down>.weight.lora_a`
//!   (`[r, in]` in PyTorch's order, GGUF lists dimensions reversed) and `.lora_b`
//!   (`[out, r]`), in F32, F16, BF16 or Q8_0 (the converter falls back to F16 for rows
//!   Q8_0's 32-value blocks do not divide).
//! - for Llama the converter permutes the rows of q/k `lora_b` per head for interleaved
//!   rotary, as it does the base q/k weights; the rows are put back here.
//!
//! The file is read into memory, not mapped (a file truncated under a map raises SIGBUS),
//! and every offset and size is checked before it is used.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, TensorInfo};
use candle_core::quantized::GgmlDType;
use half::f16;
use safetensors::Dtype;

use super::model::{LoraLayerWeights, LoraMatrix, LoraModel};
use super::{LoraModule, ModuleShapes};
use crate::permute::unpermute_row_bytes;
use crate::error::{EngineError, Result};

/// llama.cpp's tensor name for each projection, in [`LoraModule::ALL`] order.
const GGUF_MODULES: [&str; 7] = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"];

/// Bytes in one Q8_0 block: an f16 scale, then 32 signed 8-bit values.
const Q8_0_BLOCK_BYTES: usize = 34;

/// How an adapter tensor's values are stored: a float type kept as it is, or Q8_0 blocks
/// (widened to f32 on load: adapters are small).
#[derive(Clone, Copy)]
enum Stored {
    Float(Dtype),
    Q8_0,
}

impl Stored {
    /// The storage of a GGUF tensor type, if adapters may come in it.
    fn of(dtype: GgmlDType) -> std::result::Result<Self, String> {
        Ok(match dtype {
            GgmlDType::F32 => Self::Float(Dtype::F32),
            GgmlDType::F16 => Self::Float(Dtype::F16),
            GgmlDType::BF16 => Self::Float(Dtype::BF16),
            GgmlDType::Q8_0 => Self::Q8_0,
            other => return Err(format!("tensor type {other:?} is not supported (F32, F16, BF16 or Q8_0)")),
        })
    }
}

/// Which half of a projection's low-rank pair a tensor holds.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Half {
    A,
    B,
}

/// Reads and validates the GGUF adapter file at `path` against the base's shapes;
/// `max_rank` bounds every projection's rank. The checks run in file order (header,
/// metadata, then each tensor) and read best as one sequence, which is why it is long.
pub(super) fn load(name: &str, path: &Path, shapes: &ModuleShapes, max_rank: usize) -> Result<LoraModel> {
    let err = |field: &str, msg: String| EngineError::adapter(name, field, msg);
    let bytes = std::fs::read(path).map_err(|e| err("path", format!("cannot read {}: {e}", path.display())))?;
    let content = crate::weights::read_gguf_header(&mut Cursor::new(&bytes[..])).map_err(|m| err("gguf", m))?;
    let alpha = check_metadata(&content.metadata, shapes.gguf_architectures).map_err(|(field, m)| err(field, m))?;

    // Every tensor must be a lora_a/lora_b of a projection this base has.
    let mut pairs: HashMap<(usize, LoraModule), [Option<&TensorInfo>; 2]> = HashMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for tensor_name in names {
        let Some((layer, module, half)) = parse_tensor_name(tensor_name, shapes.layers) else {
            let field = if tensor_name.starts_with("token_embd.") {
                "embed_tokens"
            } else if tensor_name.starts_with("output.") {
                "lm_head"
            } else {
                tensor_name.as_str()
            };
            return Err(err(
                field,
                format!("tensor '{tensor_name}' is not the lora_a/lora_b of a supported projection of this base model (an adapter for another model, or LoRA on embeddings, lm_head or norms, which is not supported)"),
            ));
        };
        pairs.entry((layer, module)).or_default()[half as usize] = content.tensor_infos.get(tensor_name);
    }

    let mut layers: Vec<[Option<LoraLayerWeights>; 7]> = (0..shapes.layers).map(|_| Default::default()).collect();
    let mut max = 0usize;
    let mut total_bytes = 0usize;
    for (layer, slots) in layers.iter_mut().enumerate() {
        for module in LoraModule::ALL {
            let Some(pair) = pairs.get(&(layer, module)) else { continue };
            let tensor_name = |half: Half| format!("blk.{layer}.{}.weight.lora_{}", GGUF_MODULES[module.index()], if half == Half::A { 'a' } else { 'b' });
            let [Some(a), Some(b)] = *pair else {
                let missing = if pair[0].is_none() { Half::A } else { Half::B };
                return Err(err(&tensor_name(missing), format!("missing: {} has only one of lora_a / lora_b", module.module_name(layer))));
            };
            let (out_dim, in_dim) = shapes.shapes[module.index()];
            let (a_dims, b_dims) = (a.shape.dims(), b.shape.dims());
            let rank = a_dims.first().copied().unwrap_or(0);
            if a_dims.len() != 2 || b_dims.len() != 2 || rank == 0 || a_dims != [rank, in_dim] || b_dims != [out_dim, rank] {
                return Err(err(
                    "shape",
                    format!(
                        "{}: lora_a is {a_dims:?} and lora_b is {b_dims:?} (PyTorch order), but this base needs [r, {in_dim}] and [{out_dim}, r] with one rank r > 0: an adapter made for another model?",
                        module.module_name(layer)
                    ),
                ));
            }
            if rank > max_rank {
                return Err(err(
                    "r",
                    format!("rank {rank} of {} is above the configured maximum {max_rank} (raise --max-lora-rank)", module.module_name(layer)),
                ));
            }
            // llama.cpp: scale = alpha / rank, or 1 when the file has no (or a zero) alpha.
            let scale = alpha.filter(|&a| a != 0.0).map_or(1.0, |a| (a / rank as f64) as f32);
            if !scale.is_finite() {
                return Err(err(
                    "adapter.lora.alpha",
                    format!("{}: the scaling alpha/r = {}/{rank} is not a finite 32-bit float", module.module_name(layer), alpha.unwrap_or(0.0)),
                ));
            }
            let read = |info: &TensorInfo, half: Half| -> Result<LoraMatrix> {
                let (rows, cols) = if half == Half::A { (rank, in_dim) } else { (out_dim, rank) };
                let name = tensor_name(half);
                let stored = Stored::of(info.ggml_dtype).map_err(|m| err(&name, m))?;
                let data = tensor_bytes(&bytes, content.tensor_data_offset, info, rows, cols).map_err(|m| err(&name, m))?;
                let data = match permuted_heads(shapes, module, half) {
                    Some(heads) => std::borrow::Cow::Owned(unpermute_row_bytes(data, rows, heads).map_err(|m| err(&name, m))?),
                    None => std::borrow::Cow::Borrowed(data),
                };
                let (dtype, data) = match stored {
                    Stored::Float(dtype) => (dtype, data),
                    Stored::Q8_0 => (Dtype::F32, std::borrow::Cow::Owned(q8_0_to_f32_bytes(&data))),
                };
                // B is [out][r] in the file; kept as [r][out] so the expand step adds rows.
                LoraMatrix::decode(dtype, &data, rows, cols, half == Half::B).map_err(|m| err(&name, m))
            };
            let weights = LoraLayerWeights { rank, scale, a: read(a, Half::A)?, b_t: read(b, Half::B)? };
            total_bytes += weights.size_in_bytes();
            max = max.max(rank);
            slots[module.index()] = Some(weights);
        }
    }
    if max == 0 {
        return Err(err("gguf", "the adapter has no lora_a/lora_b tensors".into()));
    }
    Ok(LoraModel { name: name.to_string(), path: path.to_path_buf(), layers, max_rank: max, bytes: total_bytes, config: None })
}

/// Checks that the metadata describes a plain LoRA adapter for this architecture and
/// returns its alpha (`None` when the file has none). Errors name the offending key.
fn check_metadata(
    metadata: &HashMap<String, gguf_file::Value>,
    base: &[&str],
) -> std::result::Result<Option<f64>, (&'static str, String)> {
    let string = |key: &'static str| match metadata.get(key) {
        None => Ok(None),
        Some(gguf_file::Value::String(s)) => Ok(Some(s.as_str())),
        Some(other) => Err((key, format!("expected a string, got {other:?}"))),
    };
    match string("general.type")? {
        Some("adapter") => {}
        Some(other) => return Err(("general.type", format!("'{other}': this GGUF file is not an adapter (a model goes in --model)"))),
        None => {
            return Err((
                "general.type",
                "missing: this GGUF file is not an adapter (llama.cpp's convert_lora_to_gguf.py writes general.type = adapter; a model goes in --model)".into(),
            ))
        }
    }
    match string("adapter.type")? {
        Some("lora") => {}
        Some(other) => return Err(("adapter.type", format!("'{other}' is not supported (only lora)"))),
        None => return Err(("adapter.type", "missing: not a llama.cpp LoRA adapter".into())),
    }
    if metadata.contains_key("adapter.alora_invocation_tokens") {
        return Err((
            "adapter.alora_invocation_tokens",
            "activated LoRA (aLoRA: the adapter applies only after invocation tokens) is not supported".into(),
        ));
    }
    let arch = string("general.architecture")?.ok_or(("general.architecture", "missing".to_string()))?;
    if !base.contains(&arch) {
        let base = base.first().copied().unwrap_or("unknown");
        return Err(("general.architecture", format!("the adapter was converted for '{arch}', but the base model is {base}")));
    }
    let alpha = match metadata.get("adapter.lora.alpha") {
        None => None,
        Some(gguf_file::Value::F32(a)) => Some(*a as f64),
        Some(gguf_file::Value::F64(a)) => Some(*a),
        Some(other) => return Err(("adapter.lora.alpha", format!("expected a float, got {other:?}"))),
    };
    if let Some(a) = alpha.filter(|a| !a.is_finite()) {
        return Err(("adapter.lora.alpha", format!("must be a finite number, got {a}")));
    }
    Ok(alpha)
}

/// `blk.{layer}.{module}.weight.lora_{a|b}` → parts, for layers this base has.
fn parse_tensor_name(name: &str, layers: usize) -> Option<(usize, LoraModule, Half)> {
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok().filter(|&l| l < layers)?;
    let (module, half) = match rest.rsplit_once(".weight.lora_")? {
        (module, "a") => (module, Half::A),
        (module, "b") => (module, Half::B),
        _ => return None,
    };
    let module = LoraModule::ALL[GGUF_MODULES.iter().position(|m| *m == module)?];
    Some((layer, module, half))
}

/// The bytes of a `[rows][cols]` tensor: its rows must be whole blocks of its type and its
/// data inside the file (sizes are computed checked, as the header is untrusted).
fn tensor_bytes<'f>(file: &'f [u8], data_offset: u64, info: &TensorInfo, rows: usize, cols: usize) -> std::result::Result<&'f [u8], String> {
    let dtype = info.ggml_dtype;
    if !cols.is_multiple_of(dtype.block_size()) {
        return Err(format!("rows of {cols} values are not whole {dtype:?} blocks of {}", dtype.block_size()));
    }
    let size = rows.checked_mul(cols / dtype.block_size()).and_then(|blocks| blocks.checked_mul(dtype.type_size()));
    let start = data_offset.checked_add(info.offset).and_then(|s| usize::try_from(s).ok());
    match (start, size) {
        (Some(start), Some(size)) if start.checked_add(size).is_some_and(|end| end <= file.len()) => {
            Ok(&file[start..start + size])
        }
        _ => Err(format!(
            "its data ({} bytes at offset {}) lies beyond the end of the {}-byte file: truncated or corrupt",
            size.map_or("too many".to_string(), |s| s.to_string()),
            data_offset.saturating_add(info.offset),
            file.len()
        )),
    }
}

/// Head count whose rows llama.cpp's converter permuted in this tensor: the `lora_b` of q
/// (query heads) and k (key/value heads) of Llama adapters.
fn permuted_heads(shapes: &ModuleShapes, module: LoraModule, half: Half) -> Option<usize> {
    match half {
        Half::B => shapes.permuted_heads[module.index()],
        Half::A => None,
    }
}

/// Q8_0 blocks widened to little-endian f32 bytes, as ggml dequantizes them (scale times
/// each value): adapters are small, so they are kept as f32 rather than quantized.
fn q8_0_to_f32_bytes(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() / Q8_0_BLOCK_BYTES * 32 * 4);
    for block in data.chunks_exact(Q8_0_BLOCK_BYTES) {
        let scale = f16::from_le_bytes([block[0], block[1]]).to_f32();
        for &q in &block[2..] {
            out.extend_from_slice(&(scale * q as i8 as f32).to_le_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_llama_cpp_tensor_names() {
        assert_eq!(parse_tensor_name("blk.2.attn_k.weight.lora_b", 3), Some((2, LoraModule::KProj, Half::B)));
        assert_eq!(parse_tensor_name("blk.0.ffn_down.weight.lora_a", 3), Some((0, LoraModule::DownProj, Half::A)));
        assert_eq!(parse_tensor_name("blk.3.attn_q.weight.lora_a", 3), None);
        assert_eq!(parse_tensor_name("blk.0.attn_norm.weight", 3), None);
        assert_eq!(parse_tensor_name("token_embd.weight.lora_a", 3), None);
        assert_eq!(parse_tensor_name("blk.0.attn_q.weight.lora_c", 3), None);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // 2 heads of dim 4, rows of 3 one-byte "values": llama.cpp's
        // reshape(heads, 2, hd/2, cols).swapaxes(1, 2) moves row h*hd + j*hd/2 + i to h*hd + 2i + j.
        let (heads, hd, cols) = (2usize, 4usize, 3usize);
        let torch: Vec<u8> = (0..heads * hd).flat_map(|r| [r as u8; 3]).collect();
        let mut file = vec![0u8; torch.len()];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..hd / 2 {
                    let (src, dst) = (h * hd + j * hd / 2 + i, h * hd + 2 * i + j);
                    file[dst * cols..(dst + 1) * cols].copy_from_slice(&torch[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_eq!(unpermute_row_bytes(&file, heads * hd, heads).unwrap(), torch);
        assert!(unpermute_row_bytes(&file, heads * hd, 3).is_err());
    }

    #[test]
    fn q8_0_dequantizes_as_ggml() {
        let mut block = f16::from_f32(0.5).to_le_bytes().to_vec();
        block.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let values: Vec<f32> = q8_0_to_f32_bytes(&block).chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        assert_eq!(values, (0..32).map(|i| 0.5 * (i as f32 - 16.0)).collect::<Vec<_>>());
    }
}
