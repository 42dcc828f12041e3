//! The PEFT adapter loader: `adapter_config.json` (ranks, alphas, rank/alpha patterns,
//! target/exclude modules, layer selection) and `adapter_model.safetensors` (header,
//! names, shapes, dtypes, NaN), checked against the tiny Llama fixture's shapes.
//! Input: 2 bytes little-endian config length, the config, then the safetensors file.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use loramux_engine::lora::{LoraModel, LoraModule, ModuleShapes};
use loramux_engine::ModelConfig;

#[path = "../inputs.rs"]
mod inputs;

fn shapes() -> &'static ModuleShapes {
    static S: OnceLock<ModuleShapes> = OnceLock::new();
    S.get_or_init(|| {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/tiny/llama/config.json");
        ModuleShapes::from_config(&ModelConfig::from_hf_file(&p).expect("tiny llama fixture config"))
    })
}

/// One scratch adapter directory per fuzzing process.
fn scratch() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("loramux-fuzz-adapter-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("scratch dir");
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((config, weights)) = inputs::adapter_input(data) else { return };
    let dir = scratch();
    if std::fs::write(dir.join("adapter_config.json"), config).is_err()
        || std::fs::write(dir.join("adapter_model.safetensors"), weights).is_err()
    {
        return;
    }
    if let Ok(m) = LoraModel::load("fuzz", dir, shapes(), 64) {
        // What the batch kernels rely on: `a` is [r][in], `b_t` is [r][out], every value
        // and the scale finite.
        for layer in &m.layers {
            for module in LoraModule::ALL {
                let Some(w) = &layer[module.index()] else { continue };
                let (out_dim, in_dim) = shapes().shapes[module.index()];
                let a = w.a.to_f32_vec();
                let b = w.b_t.to_f32_vec();
                assert!(w.rank > 0 && w.rank <= m.max_rank && m.max_rank <= 64);
                assert_eq!(a.len(), w.rank * in_dim);
                assert_eq!(b.len(), w.rank * out_dim);
                assert!(a.iter().chain(&b).all(|x| x.is_finite()));
                assert!(w.scale.is_finite(), "non-finite LoRA scale {} (rank {})", w.scale, w.rank);
            }
        }
    }
});
