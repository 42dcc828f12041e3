//! Synthetic PEFT adapters of any rank, targets and dtype for benchmarks: random weights
//! in PEFT's file format, so loading goes through exactly the path real adapters take.

use std::path::Path;

use loramux_engine::lora::{LoraModule, ModuleShapes};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// What adapter to write.
#[derive(Clone, Debug)]
pub struct AdapterSpec {
    pub rank: usize,
    /// Projections to adapt; all seven is PEFT's `all-linear`.
    pub targets: Vec<LoraModule>,
    /// F32, F16 or BF16, as PEFT saves them.
    pub dtype: Dtype,
    pub seed: u64,
}

impl AdapterSpec {
    /// Every linear projection (`target_modules = "all-linear"`), the heaviest common case.
    pub fn all_linear(rank: usize, dtype: Dtype, seed: u64) -> Self {
        Self { rank, targets: LoraModule::ALL.to_vec(), dtype, seed }
    }

    /// PEFT's default for Llama-family models: `q_proj` and `v_proj`.
    pub fn peft_default(rank: usize, dtype: Dtype, seed: u64) -> Self {
        Self { rank, targets: vec![LoraModule::QProj, LoraModule::VProj], dtype, seed }
    }

    /// Bytes of the tensors this adapter holds for a base with `shapes`.
    pub fn weight_bytes(&self, shapes: &ModuleShapes) -> usize {
        let per_layer: usize = self
            .targets
            .iter()
            .map(|m| {
                let (out_dim, in_dim) = shapes.shapes[m.index()];
                self.rank * (in_dim + out_dim)
            })
            .sum();
        per_layer * shapes.layers * (self.dtype.bitsize() / 8)
    }
}

fn encode(value: f32, dtype: Dtype, out: &mut Vec<u8>) {
    match dtype {
        Dtype::F16 => out.extend(half::f16::from_f32(value).to_le_bytes()),
        Dtype::BF16 => out.extend(half::bf16::from_f32(value).to_le_bytes()),
        _ => out.extend(value.to_le_bytes()),
    }
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` for `spec` into `dir`.
pub fn write_adapter(dir: &Path, shapes: &ModuleShapes, spec: &AdapterSpec) -> std::io::Result<()> {
    if !matches!(spec.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
        return Err(std::io::Error::other(format!("adapter dtype {:?} is not one PEFT writes", spec.dtype)));
    }
    std::fs::create_dir_all(dir)?;
    let targets: serde_json::Value = if spec.targets.len() == LoraModule::ALL.len() {
        "all-linear".into()
    } else {
        spec.targets.iter().map(|m| m.path().rsplit('.').next().unwrap_or(m.path()).to_string()).collect()
    };
    let config = serde_json::json!({
        "peft_type": "LORA", "r": spec.rank, "lora_alpha": 2 * spec.rank, "target_modules": targets,
        "bias": "none", "use_rslora": false, "use_dora": false, "fan_in_fan_out": false,
        "task_type": "CAUSAL_LM",
    });
    std::fs::write(dir.join("adapter_config.json"), serde_json::to_vec_pretty(&config)?)?;
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for layer in 0..shapes.layers {
        for &module in &spec.targets {
            let (out_dim, in_dim) = shapes.shapes[module.index()];
            let name = format!("base_model.model.{}", module.module_name(layer));
            for (suffix, shape) in [("lora_A", vec![spec.rank, in_dim]), ("lora_B", vec![out_dim, spec.rank])] {
                let n: usize = shape.iter().product();
                let mut bytes = Vec::with_capacity(n * (spec.dtype.bitsize() / 8));
                for _ in 0..n {
                    encode(rng.random::<f32>() * 0.02 - 0.01, spec.dtype, &mut bytes);
                }
                buffers.push((format!("{name}.{suffix}.weight"), shape, bytes));
            }
        }
    }
    let views: Vec<(String, TensorView<'_>)> = buffers
        .iter()
        .map(|(n, s, b)| (n.clone(), TensorView::new(spec.dtype, s.clone(), b).expect("consistent view")))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("adapter_model.safetensors"))
        .map_err(std::io::Error::other)
}

/// Writes a random all-linear bfloat16 adapter of rank `r` (the engine benchmark's adapters),
/// the dtype PEFT saves adapters trained in bfloat16 in.
pub fn write_random_adapter(dir: &Path, shapes: &ModuleShapes, r: usize, seed: u64) -> std::io::Result<()> {
    write_adapter(dir, shapes, &AdapterSpec::all_linear(r, Dtype::BF16, seed))
}
