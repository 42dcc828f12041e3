//! Where a model's tensors come from: Hugging Face safetensors (single or sharded) or one
//! GGUF file. Tensors are always asked for by their Hugging Face name so the model code
//! reads the same whatever the file format; GGUF names and Llama's GGUF q/k row
//! permutation are undone here.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::{ggml_file::qtensor_from_ggml, gguf_file, GgmlDType, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::{panic_message, EngineError, Result};
use crate::permute::unpermute_row_bytes;

/// A projection weight as stored: dense float32, or quantized blocks kept as they are.
#[derive(Clone, Debug)]
pub enum Weight {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
}

impl Weight {
    /// `[out, in]` of the weight.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        Ok(match self {
            Weight::Dense(t) => t.dims2()?,
            Weight::Quantized(q) => q.shape().dims2()?,
        })
    }
}

enum Backing {
    Safetensors(MmapedSafetensors),
    Gguf {
        content: gguf_file::Content,
        reader: Mutex<BufReader<File>>,
    },
}

/// An opened model file set, answering tensor requests by Hugging Face name.
pub struct WeightSource {
    path: PathBuf,
    backing: Backing,
    device: Device,
    /// Dequantize GGUF projections to float32 instead of keeping them quantized.
    dequantize: bool,
    /// GGUF files of some architectures store q/k rows permuted for llama.cpp's rotary:
    /// the query and key/value head counts to undo it with.
    unpermute_qk: Option<(usize, usize)>,
}

impl WeightSource {
    /// Opens `model.safetensors` or the shards named by `model.safetensors.index.json`.
    pub fn open_safetensors_dir(dir: &Path, device: &Device) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| EngineError::io(&index, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| EngineError::model(&index, format!("invalid JSON: {e}")))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| EngineError::model(&index, "no weight_map"))?;
            let mut names: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        for f in &files {
            if !f.exists() {
                return Err(EngineError::model(
                    dir,
                    format!("missing weights file {}", f.display()),
                ));
            }
        }
        // SAFETY: the files are memory-mapped read-only; loramux never writes model files
        // while serving, and users are told not to modify them underneath a running server.
        let st = unsafe { MmapedSafetensors::multi(&files) }
            .map_err(|e| EngineError::model(dir, format!("cannot read safetensors: {e}")))?;
        Ok(Self {
            path: dir.to_path_buf(),
            backing: Backing::Safetensors(st),
            device: device.clone(),
            dequantize: false,
            unpermute_qk: None,
        })
    }

    /// Opens a GGUF file; its metadata is returned alongside for the config and tokenizer.
    pub fn open_gguf(path: &Path, device: &Device, dequantize: bool) -> Result<Self> {
        let file = File::open(path).map_err(|e| EngineError::io(path, e))?;
        let mut reader = BufReader::new(file);
        let content = read_gguf_header(&mut reader).map_err(|m| EngineError::model(path, m))?;
        Ok(Self {
            path: path.to_path_buf(),
            backing: Backing::Gguf {
                content,
                reader: Mutex::new(reader),
            },
            device: device.clone(),
            dequantize,
            unpermute_qk: None,
        })
    }

    /// GGUF metadata, when the source is a GGUF file.
    pub fn gguf_metadata(&self) -> Option<&HashMap<String, gguf_file::Value>> {
        match &self.backing {
            Backing::Gguf { content, .. } => Some(&content.metadata),
            Backing::Safetensors(_) => None,
        }
    }

    /// The file or directory the weights come from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The device tensors are loaded onto.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Tells a GGUF source that its q/k rows are permuted (the architecture's fact), with
    /// the query and key/value head counts to put them back with.
    pub(crate) fn unpermute_qk(&mut self, heads: Option<(usize, usize)>) {
        if matches!(self.backing, Backing::Gguf { .. }) {
            self.unpermute_qk = heads;
        }
    }

    /// Whether a tensor exists under this Hugging Face name.
    pub fn contains(&self, hf_name: &str) -> bool {
        match &self.backing {
            Backing::Safetensors(st) => st.get(hf_name).is_ok(),
            Backing::Gguf { content, .. } => gguf_name(hf_name)
                .map(|n| content.tensor_infos.contains_key(&n))
                .unwrap_or(false),
        }
    }

    /// A tensor as dense float32 (norms, biases, embeddings of float models).
    pub fn dense(&self, hf_name: &str) -> Result<Tensor> {
        match self.weight(hf_name, true)? {
            Weight::Dense(t) => Ok(t),
            Weight::Quantized(q) => Ok(q.dequantize(&self.device)?),
        }
    }

    /// A projection weight, quantized if the file stores it quantized (unless the source
    /// was opened with `dequantize`), else dense float32.
    pub fn weight(&self, hf_name: &str, force_dense: bool) -> Result<Weight> {
        match &self.backing {
            Backing::Safetensors(st) => {
                let t = st.load(hf_name, &self.device).map_err(|e| {
                    EngineError::model(&self.path, format!("tensor {hf_name}: {e}"))
                })?;
                Ok(Weight::Dense(t.to_dtype(DType::F32)?))
            }
            Backing::Gguf { content, reader } => {
                let name = gguf_name(hf_name).ok_or_else(|| {
                    EngineError::model(&self.path, format!("no GGUF name for tensor {hf_name}"))
                })?;
                let q = read_gguf_tensor(content, reader, &name, &self.path, &self.device)?;
                let permuted = self.unpermute_qk.zip(permuted_is_k(hf_name)).map(|((heads, kv_heads), is_k)| if is_k { kv_heads } else { heads });
                let q = match permuted {
                    Some(heads) => unpermute_rows(&q, heads, &self.device)?,
                    None => q,
                };
                let float = matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
                if force_dense || self.dequantize || float {
                    Ok(Weight::Dense(q.dequantize(&self.device)?))
                } else {
                    Ok(Weight::Quantized(Arc::new(q)))
                }
            }
        }
    }

    /// GGUF's optional per-frequency rotary divisors (Llama 3.1 files).
    pub(crate) fn rope_freq_factors(&self) -> Result<Option<Vec<f32>>> {
        match &self.backing {
            Backing::Gguf { content, reader } if content.tensor_infos.contains_key("rope_freqs.weight") => {
                let q = read_gguf_tensor(content, reader, "rope_freqs.weight", &self.path, &self.device)?;
                let v = q.dequantize(&self.device)?.to_vec1::<f32>()?;
                Ok(Some(v))
            }
            _ => Ok(None),
        }
    }
}

/// A tensor-name prefix over a [`WeightSource`], as candle's `VarBuilder::pp`: model code
/// names tensors segment by segment (`vb.pp("self_attn").pp("q_proj")`), mirroring the
/// Hugging Face module tree, and never formats names itself.
#[derive(Clone)]
pub struct WeightPath<'a> {
    src: &'a WeightSource,
    prefix: String,
}

impl<'a> WeightPath<'a> {
    /// The root of the source's names.
    pub fn root(src: &'a WeightSource) -> Self {
        Self { src, prefix: String::new() }
    }

    /// The path one module further down.
    pub fn pp(&self, segment: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() { segment.to_string() } else { format!("{}.{segment}", self.prefix) };
        Self { src: self.src, prefix }
    }

    /// The full name of tensor `leaf` under this path.
    pub fn name(&self, leaf: &str) -> String {
        self.pp(leaf).prefix
    }

    /// The module path itself (for messages).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The source the names are read from.
    pub fn source(&self) -> &'a WeightSource {
        self.src
    }

    /// Whether tensor `leaf` exists.
    pub fn contains(&self, leaf: &str) -> bool {
        self.src.contains(&self.name(leaf))
    }

    /// Tensor `leaf` as dense float32.
    pub fn dense(&self, leaf: &str) -> Result<Tensor> {
        self.src.dense(&self.name(leaf))
    }

    /// Weight `leaf` as stored (quantized or dense).
    pub fn weight(&self, leaf: &str) -> Result<Weight> {
        self.src.weight(&self.name(leaf), false)
    }
}

/// Parses a GGUF header (metadata and tensor table). candle's parser panics on some
/// malformed files (a `general.alignment` of 0 divides by zero): a file that cannot be read
/// is an error message, never a crash. Shared by model files and LoRA adapter files.
pub(crate) fn read_gguf_header<R: std::io::Read + std::io::Seek>(reader: &mut R) -> std::result::Result<gguf_file::Content, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| gguf_file::Content::read(reader)))
        .map_err(|p| format!("not a readable GGUF file: the GGUF parser failed: {}", panic_message(&*p)))?
        .map_err(|e| format!("not a readable GGUF file: {e}"))
}

/// Reads one GGUF tensor after checking its declared shape: candle multiplies the
/// dimensions and the byte size unchecked (an overflow panics, or wraps to a size that
/// matches a short data block under a huge shape), and an empty dimension would divide by
/// zero in the row un-permutation.
fn read_gguf_tensor(
    content: &gguf_file::Content,
    reader: &Mutex<BufReader<File>>,
    name: &str,
    path: &Path,
    device: &Device,
) -> Result<QTensor> {
    if let Some(info) = content.tensor_infos.get(name) {
        let dims = info.shape.dims();
        let dtype = info.ggml_dtype;
        let bytes = dims
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .and_then(|n| (n / dtype.block_size()).checked_mul(dtype.type_size()));
        if dims.contains(&0) || bytes.is_none() {
            return Err(EngineError::model(path, format!("tensor {name}: invalid shape {dims:?}")));
        }
    }
    let mut reader = reader.lock().expect("gguf reader lock poisoned");
    content
        .tensor(&mut *reader, name, device)
        .map_err(|e| EngineError::model(path, format!("tensor {name}: {e}")))
}

/// `Some(is_k)` for the weights whose rows llama.cpp permutes (q and k).
fn permuted_is_k(hf_name: &str) -> Option<bool> {
    if hf_name.ends_with("self_attn.q_proj.weight") {
        Some(false)
    } else if hf_name.ends_with("self_attn.k_proj.weight") {
        Some(true)
    } else {
        None
    }
}

/// Undoes llama.cpp's `permute` on a quantized q/k weight (see [`unpermute_row_bytes`]).
fn unpermute_rows(q: &QTensor, heads: usize, device: &Device) -> Result<QTensor> {
    let (rows, cols) = q.shape().dims2()?;
    let out = unpermute_row_bytes(&q.data()?, rows, heads).map_err(|m| EngineError::InvalidRequest(format!("q/k weight: {m}")))?;
    Ok(qtensor_from_ggml(q.dtype(), &out, vec![rows, cols], device)?)
}

/// Maps a Hugging Face tensor name to its GGUF name.
fn gguf_name(hf: &str) -> Option<String> {
    let direct = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(d) = direct {
        return Some(d.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let gguf_module = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{gguf_module}.{kind}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_names_to_gguf() {
        assert_eq!(
            gguf_name("model.layers.3.self_attn.k_proj.bias").as_deref(),
            Some("blk.3.attn_k.bias")
        );
        assert_eq!(gguf_name("model.norm.weight").as_deref(), Some("output_norm.weight"));
        assert_eq!(gguf_name("model.layers.0.mlp.experts.weight"), None);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // 2 heads of dim 4, 32 columns (one F32 "block" per row is fine).
        let (heads, hd, cols) = (2usize, 4usize, 32usize);
        let rows = heads * hd;
        let hf: Vec<f32> = (0..rows * cols).map(|i| (i / cols) as f32).collect();
        // llama.cpp permute: reshape(heads, 2, hd/2, cols).swapaxes(1, 2)
        let mut gguf = vec![0f32; rows * cols];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..hd / 2 {
                    let src = h * hd + j * hd / 2 + i;
                    let dst = h * hd + 2 * i + j;
                    gguf[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        let dev = Device::Cpu;
        let t = Tensor::from_vec(gguf, (rows, cols), &dev).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::F32).unwrap();
        let back = unpermute_rows(&q, heads, &dev).unwrap().dequantize(&dev).unwrap();
        assert_eq!(back.flatten_all().unwrap().to_vec1::<f32>().unwrap(), hf);
    }
}
