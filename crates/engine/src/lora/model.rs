//! One LoRA adapter loaded from PEFT files and checked against the base model's shapes:
//! every tensor must belong to a targeted projection and fit it, or nothing is loaded.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::config::{scaling, PeftConfig};
use super::{LoraModule, ModuleShapes};
use crate::error::{EngineError, Result};

/// The low-rank pair of one projection, laid out for the shrink/expand kernels: `a` is
/// `[r][in]` as PEFT stores it (each row is dotted with the input: shrink) and `b_t` is
/// `[r][out]` (row j is added to the output scaled by shrunk value j: expand).
#[derive(Clone, Debug)]
pub struct LoraLayerWeights {
    pub rank: usize,
    pub scale: f32,
    pub a: Vec<f32>,
    pub b_t: Vec<f32>,
}

impl LoraLayerWeights {
    /// `scale · B · A` as a dense `[out, in]` tensor, for merging into a float base.
    pub fn delta(&self, out_dim: usize, in_dim: usize, device: &Device) -> Result<Tensor> {
        let a = Tensor::from_slice(&self.a, (self.rank, in_dim), device)?;
        let b_t = Tensor::from_slice(&self.b_t, (self.rank, out_dim), device)?;
        Ok((b_t.t()?.matmul(&a)? * self.scale as f64)?)
    }
}

/// An adapter ready to be applied: per layer, per projection, its weights if targeted.
#[derive(Debug)]
pub struct LoraModel {
    pub name: String,
    pub path: PathBuf,
    /// `layers[l][module.index()]`.
    pub layers: Vec<[Option<LoraLayerWeights>; 7]>,
    /// Largest rank over all projections.
    pub max_rank: usize,
    /// Bytes the adapter's weights occupy in memory.
    pub bytes: usize,
    pub config: PeftConfig,
}

/// How to convert a pickle adapter, shown when only `adapter_model.bin` exists.
const BIN_HINT: &str = "only a pickle adapter_model.bin was found; loramux reads safetensors. Convert it with: \
python -c \"import torch; from safetensors.torch import save_file; \
save_file(torch.load('adapter_model.bin', map_location='cpu'), 'adapter_model.safetensors')\"";

impl LoraModel {
    /// Reads and validates an adapter directory. `max_rank` bounds every projection's rank.
    pub fn load(name: &str, dir: &Path, shapes: &ModuleShapes, max_rank: usize) -> Result<Self> {
        let err = |field: &str, msg: String| EngineError::adapter(name, field, msg);
        if !dir.is_dir() {
            return Err(err("path", format!("{} is not a directory", dir.display())));
        }
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
                let a = read_matrix(&tensors, &prefix, 'A')
                    .map_err(|m| err("adapter_model.safetensors", m))?;
                let b = read_matrix(&tensors, &prefix, 'B')
                    .map_err(|m| err("adapter_model.safetensors", m))?;
                if a.1 != (r, in_dim) || b.1 != (out_dim, r) {
                    return Err(err(
                        "shape",
                        format!(
                            "{}: lora_A is {:?} and lora_B is {:?}, but this base needs [{r}, {in_dim}] and [{out_dim}, {r}] (rank {r} from the config): an adapter made for another model?",
                            module.module_name(layer), a.1, b.1
                        ),
                    ));
                }
                if r > max_rank {
                    return Err(err(
                        "r",
                        format!("rank {r} of {} is above the configured maximum {max_rank} (raise --max-lora-rank)", module.module_name(layer)),
                    ));
                }
                // b is [out][r]; keep it as [r][out] so the expand step is vector adds.
                let mut b_t = vec![0f32; r * out_dim];
                for (o, row) in b.0.chunks_exact(r).enumerate() {
                    for (j, &v) in row.iter().enumerate() {
                        b_t[j * out_dim + o] = v;
                    }
                }
                total_bytes += (a.0.len() + b_t.len()) * std::mem::size_of::<f32>();
                max = max.max(r);
                slots[module.index()] = Some(LoraLayerWeights {
                    rank: r,
                    scale: scaling(alpha, r, config.use_rslora) as f32,
                    a: a.0,
                    b_t,
                });
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
            config,
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

/// Reads `{prefix}.lora_{A|B}.weight` (or with `.default`) as float32 with its 2-d shape.
fn read_matrix(
    tensors: &safetensors::SafeTensors<'_>,
    prefix: &str,
    which: char,
) -> std::result::Result<(Vec<f32>, (usize, usize)), String> {
    let plain = format!("{prefix}.lora_{which}.weight");
    let named = format!("{prefix}.lora_{which}.default.weight");
    let view = tensors
        .tensor(&plain)
        .or_else(|_| tensors.tensor(&named))
        .map_err(|e| format!("{plain}: {e}"))?;
    let shape = view.shape();
    if shape.len() != 2 {
        return Err(format!("{plain}: expected a matrix, got shape {shape:?}"));
    }
    let data = view.data();
    // Decode straight from the file bytes: no intermediate tensor copies.
    let values: Vec<f32> = match view.dtype() {
        safetensors::Dtype::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        safetensors::Dtype::F16 => data.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        safetensors::Dtype::BF16 => data.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        other => return Err(format!("{plain}: unsupported dtype {other:?}")),
    };
    if values.len() != shape[0] * shape[1] {
        return Err(format!("{plain}: {} values for shape {shape:?}", values.len()));
    }
    if values.iter().any(|v| !v.is_finite()) {
        return Err(format!("{plain}: contains NaN or infinite values"));
    }
    Ok((values, (shape[0], shape[1])))
}
