//! PEFT adapter directories (`adapter_config.json` + `adapter_model.safetensors`), checked
//! against the base model's shapes: every tensor must belong to a targeted projection and
//! fit it, or nothing is loaded. The file is read into memory, not mapped: a file
//! truncated under a map raises SIGBUS.

use std::collections::HashSet;
use std::path::Path;

use super::config::{scaling, PeftConfig, TargetMatcher};
use super::model::{LoraLayerWeights, LoraMatrix, LoraModel};
use super::{LoraModule, ModuleShapes};
use crate::error::{EngineError, Result};

/// How to convert a pickle adapter, shown when only `adapter_model.bin` exists.
const BIN_HINT: &str = "only a pickle adapter_model.bin was found; loramux reads safetensors. Convert it with: \
python -c \"import torch; from safetensors.torch import save_file; \
save_file(torch.load('adapter_model.bin', map_location='cpu'), 'adapter_model.safetensors')\"";

/// Reads and validates a PEFT adapter directory.
pub(super) fn load(name: &str, dir: &Path, shapes: &ModuleShapes, max_rank: usize) -> Result<LoraModel> {
    let err = |field: &str, msg: String| EngineError::adapter(name, field, msg);
    let (config, matcher) = read_config(name, dir)?;
    let bytes = read_weights_file(name, dir)?;
    let tensors = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| err("adapter_model.safetensors", format!("corrupt: {e}")))?;
    let seen = tensor_names(name, &tensors, shapes.layers)?;
    let reader = ProjectionReader { name, tensors: &tensors, seen: &seen, config: &config, matcher: &matcher, shapes, max_rank };
    let mut layers: Vec<[Option<LoraLayerWeights>; 7]> = (0..shapes.layers).map(|_| Default::default()).collect();
    let (mut max, mut total_bytes) = (0usize, 0usize);
    for (layer, slots) in layers.iter_mut().enumerate() {
        for module in LoraModule::ALL {
            if let Some(weights) = reader.read(layer, module)? {
                total_bytes += weights.size_in_bytes();
                max = max.max(weights.rank);
                slots[module.index()] = Some(weights);
            }
        }
    }
    if max == 0 {
        return Err(err("target_modules", "the adapter targets no projection of this model".into()));
    }
    Ok(LoraModel { name: name.to_string(), path: dir.to_path_buf(), layers, max_rank: max, bytes: total_bytes, config: Some(config) })
}

/// `adapter_config.json`, checked for what loramux supports, and its target matcher.
fn read_config(name: &str, dir: &Path) -> Result<(PeftConfig, TargetMatcher)> {
    let err = |field: &str, msg: String| EngineError::adapter(name, field, msg);
    let text = std::fs::read_to_string(dir.join("adapter_config.json"))
        .map_err(|e| err("adapter_config.json", format!("cannot read: {e}")))?;
    let config: PeftConfig = serde_json::from_str(&text).map_err(|e| err("adapter_config.json", format!("invalid: {e}")))?;
    config.check_supported().map_err(|u| err(u.field, u.message))?;
    let matcher = config.matcher().map_err(|u| err(u.field, u.message))?;
    if config.fan_in_fan_out {
        tracing::warn!(adapter = name, "fan_in_fan_out=true on Linear projections: ignored, as PEFT does");
    }
    Ok((config, matcher))
}

/// The bytes of `adapter_model.safetensors`, read, not memory-mapped: a file truncated while
/// mapped raises SIGBUS on the next touch of a lost page, which kills the server. A read of
/// a file changing underneath gives at worst inconsistent bytes, which the checks refuse.
fn read_weights_file(name: &str, dir: &Path) -> Result<Vec<u8>> {
    let err = |msg: String| EngineError::adapter(name, "adapter_model.safetensors", msg);
    let weights_path = dir.join("adapter_model.safetensors");
    if !weights_path.exists() {
        let pickle = dir.join("adapter_model.bin").exists();
        return Err(err(if pickle { BIN_HINT.to_string() } else { "adapter_model.safetensors not found".to_string() }));
    }
    std::fs::read(&weights_path).map_err(|e| err(format!("cannot read: {e}")))
}

/// Every tensor's `(layer, module, A|B)`: each must be a lora_A/lora_B of a projection we know.
fn tensor_names(name: &str, tensors: &safetensors::SafeTensors<'_>, layers: usize) -> Result<HashSet<(usize, LoraModule, char)>> {
    let mut seen = HashSet::new();
    for key in tensors.names() {
        match parse_key(key, layers) {
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
                return Err(EngineError::adapter(
                    name,
                    field,
                    format!("tensor '{key}' does not belong to a supported projection of this base model (an adapter for another model, or LoRA on embeddings/lm_head, which is not supported)"),
                ));
            }
        }
    }
    Ok(seen)
}

/// What reading one projection's pair needs.
struct ProjectionReader<'a, 'd> {
    name: &'a str,
    tensors: &'a safetensors::SafeTensors<'d>,
    seen: &'a HashSet<(usize, LoraModule, char)>,
    config: &'a PeftConfig,
    matcher: &'a TargetMatcher,
    shapes: &'a ModuleShapes,
    max_rank: usize,
}

impl ProjectionReader<'_, '_> {
    /// The pair of `(layer, module)`, checked against the config and the base; `None` when
    /// the adapter does not target it.
    fn read(&self, layer: usize, module: LoraModule) -> Result<Option<LoraLayerWeights>> {
        let err = |field: &str, msg: String| EngineError::adapter(self.name, field, msg);
        let module_name = module.module_name(layer);
        let has_a = self.seen.contains(&(layer, module, 'A'));
        let has_b = self.seen.contains(&(layer, module, 'B'));
        let targeted = self.matcher.targets(module, layer);
        match (has_a || has_b, targeted) {
            (false, false) => return Ok(None),
            (false, true) => {
                return Err(err("target_modules", format!("config targets {module_name} but the weights file has no lora_A/lora_B for it")))
            }
            (true, false) => {
                return Err(err("target_modules", format!("weights for {module_name} are present but the config does not target it")))
            }
            (true, true) if !(has_a && has_b) => {
                return Err(err("adapter_model.safetensors", format!("{module_name} has only one of lora_A / lora_B")))
            }
            (true, true) => {}
        }
        let (r, alpha) = self.matcher.rank_alpha(self.config, module, layer);
        let (out_dim, in_dim) = self.shapes.shapes[module.index()];
        let prefix = format!("base_model.model.{module_name}");
        let a = tensor(self.tensors, &prefix, 'A').map_err(|m| err("adapter_model.safetensors", m))?;
        let b = tensor(self.tensors, &prefix, 'B').map_err(|m| err("adapter_model.safetensors", m))?;
        if a.shape() != [r, in_dim] || b.shape() != [out_dim, r] {
            return Err(err(
                "shape",
                format!(
                    "{module_name}: lora_A is {:?} and lora_B is {:?}, but this base needs [{r}, {in_dim}] and [{out_dim}, {r}] (rank {r} from the config): an adapter made for another model?",
                    a.shape(),
                    b.shape()
                ),
            ));
        }
        if r > self.max_rank {
            let max_rank = self.max_rank;
            return Err(err("r", format!("rank {r} of {module_name} is above the configured maximum {max_rank} (raise --max-lora-rank)")));
        }
        // Finite as a double (checked with the config) is not enough: the kernels scale
        // in f32, where e.g. alpha 1e300 is infinite and the outputs would not be finite.
        let scale = scaling(alpha, r, self.config.use_rslora) as f32;
        if !scale.is_finite() {
            return Err(err("lora_alpha", format!("{module_name}: the scaling alpha/r = {alpha}/{r} is not a finite 32-bit float")));
        }
        let decode = |view: &safetensors::tensor::TensorView<'_>, which: char, transpose: bool| {
            let (rows, cols) = (view.shape()[0], view.shape()[1]);
            LoraMatrix::decode(view.dtype(), view.data(), rows, cols, transpose)
                .map_err(|m| err("adapter_model.safetensors", format!("{module_name}.lora_{which}: {m}")))
        };
        // B is [out][r] in the file; kept as [r][out] so the expand step adds rows.
        Ok(Some(LoraLayerWeights { rank: r, scale, a: decode(&a, 'A', false)?, b_t: decode(&b, 'B', true)? }))
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
