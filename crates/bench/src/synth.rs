//! Synthetic PEFT adapters of any rank for benchmarks: random weights in PEFT's file
//! format, so loading goes through exactly the path real adapters take.

use std::path::Path;

use loramux_engine::lora::{LoraModule, ModuleShapes};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// Writes a random all-linear adapter of rank `r` for a base with these shapes.
pub fn write_random_adapter(dir: &Path, shapes: &ModuleShapes, r: usize, seed: u64) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let config = serde_json::json!({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": "all-linear",
        "bias": "none", "use_rslora": false, "use_dora": false, "fan_in_fan_out": false,
        "task_type": "CAUSAL_LM",
    });
    std::fs::write(dir.join("adapter_config.json"), serde_json::to_vec_pretty(&config)?)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for layer in 0..shapes.layers {
        for module in LoraModule::ALL {
            let (out_dim, in_dim) = shapes.shapes[module.index()];
            let name = format!("base_model.model.{}", module.module_name(layer));
            for (suffix, shape) in [("lora_A", vec![r, in_dim]), ("lora_B", vec![out_dim, r])] {
                let n: usize = shape.iter().product();
                let bytes: Vec<u8> = (0..n)
                    .flat_map(|_| (rng.random::<f32>() * 0.02 - 0.01).to_le_bytes())
                    .collect();
                buffers.push((format!("{name}.{suffix}.weight"), shape, bytes));
            }
        }
    }
    let views: Vec<(String, TensorView<'_>)> = buffers
        .iter()
        .map(|(n, s, b)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).expect("consistent view")))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("adapter_model.safetensors"))
        .map_err(std::io::Error::other)
}
