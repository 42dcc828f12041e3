//! Synthetic PEFT adapters of any rank, targets and dtype for benchmarks: random weights
//! in PEFT's file format, so loading goes through exactly the path real adapters take; and
//! the same adapter in llama.cpp's GGUF adapter format, to compare the two.

use std::path::Path;

use loramux_engine::lora::{LoraModule, ModuleShapes};
use loramux_engine::permute::permute_row_bytes;
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

/// One projection's random pair: `lora_A` `[r][in]` and `lora_B` `[out][r]`, encoded in
/// the spec's dtype.
struct RandomPair {
    layer: usize,
    module: LoraModule,
    a: Vec<u8>,
    b: Vec<u8>,
}

/// The random weights of `spec`, the same for every format they are written in.
fn random_pairs(shapes: &ModuleShapes, spec: &AdapterSpec) -> std::io::Result<Vec<RandomPair>> {
    if !matches!(spec.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
        return Err(std::io::Error::other(format!("adapter dtype {:?} is not one PEFT writes", spec.dtype)));
    }
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let mut random = |n: usize| {
        let mut bytes = Vec::with_capacity(n * (spec.dtype.bitsize() / 8));
        for _ in 0..n {
            encode(rng.random::<f32>() * 0.02 - 0.01, spec.dtype, &mut bytes);
        }
        bytes
    };
    let mut pairs = Vec::new();
    for layer in 0..shapes.layers {
        for &module in &spec.targets {
            let (out_dim, in_dim) = shapes.shapes[module.index()];
            let a = random(spec.rank * in_dim);
            let b = random(out_dim * spec.rank);
            pairs.push(RandomPair { layer, module, a, b });
        }
    }
    Ok(pairs)
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` for `spec` into `dir`.
pub fn write_adapter(dir: &Path, shapes: &ModuleShapes, spec: &AdapterSpec) -> std::io::Result<()> {
    let pairs = random_pairs(shapes, spec)?;
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
    let mut views: Vec<(String, TensorView<'_>)> = Vec::new();
    for p in &pairs {
        let (out_dim, in_dim) = shapes.shapes[p.module.index()];
        let name = format!("base_model.model.{}", p.module.module_name(p.layer));
        for (suffix, shape, bytes) in [("lora_A", vec![spec.rank, in_dim], &p.a), ("lora_B", vec![out_dim, spec.rank], &p.b)] {
            views.push((format!("{name}.{suffix}.weight"), TensorView::new(spec.dtype, shape, bytes).expect("consistent view")));
        }
    }
    // One write, as the GGUF twin is written: how a file was written (one large write or
    // many small ones) changes how fast the page cache serves it back, by up to 2x here.
    let bytes = safetensors::serialize(views, None).map_err(std::io::Error::other)?;
    std::fs::write(dir.join("adapter_model.safetensors"), bytes)
}

/// Writes the adapter [`write_adapter`] writes for `spec` as one GGUF file at `path`, laid
/// out as llama.cpp's `convert_lora_to_gguf.py` lays it out (one alpha; tensors
/// `blk.N.<module>.weight.lora_a/lora_b`; for Llama the q/k `lora_b` rows permuted per head
/// as llama.cpp permutes the base q/k weights), so the two files hold the same adapter.
pub fn write_gguf_adapter(path: &Path, shapes: &ModuleShapes, spec: &AdapterSpec) -> std::io::Result<()> {
    const GGUF_MODULES: [&str; 7] = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"];
    const ALIGNMENT: usize = 32;
    let pairs = random_pairs(shapes, spec)?;
    let ggml_type: u32 = match spec.dtype {
        Dtype::F32 => 0,
        Dtype::F16 => 1,
        _ => 30, // BF16
    };
    let architecture = shapes.gguf_architectures[0];
    let mut tensors: Vec<(String, [usize; 2], Vec<u8>)> = Vec::new();
    for p in pairs {
        let (out_dim, in_dim) = shapes.shapes[p.module.index()];
        let b = match shapes.permuted_heads[p.module.index()] {
            Some(heads) => permute_row_bytes(&p.b, out_dim, heads).map_err(std::io::Error::other)?,
            None => p.b,
        };
        let name = format!("blk.{}.{}.weight", p.layer, GGUF_MODULES[p.module.index()]);
        tensors.push((format!("{name}.lora_a"), [spec.rank, in_dim], p.a));
        tensors.push((format!("{name}.lora_b"), [out_dim, spec.rank], b));
    }
    let string = |out: &mut Vec<u8>, s: &str| {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    };
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend(4u64.to_le_bytes());
    for (key, value) in [("general.architecture", architecture), ("general.type", "adapter"), ("adapter.type", "lora")] {
        string(&mut out, key);
        out.extend(8u32.to_le_bytes());
        string(&mut out, value);
    }
    string(&mut out, "adapter.lora.alpha");
    out.extend(6u32.to_le_bytes());
    out.extend((2.0 * spec.rank as f32).to_le_bytes());
    let mut offset = 0usize;
    for (name, [rows, cols], data) in &tensors {
        string(&mut out, name);
        out.extend(2u32.to_le_bytes());
        // GGUF lists dimensions innermost first.
        out.extend((*cols as u64).to_le_bytes());
        out.extend((*rows as u64).to_le_bytes());
        out.extend(ggml_type.to_le_bytes());
        out.extend((offset as u64).to_le_bytes());
        offset += data.len().div_ceil(ALIGNMENT) * ALIGNMENT;
    }
    out.resize(out.len().div_ceil(ALIGNMENT) * ALIGNMENT, 0);
    for (.., data) in &tensors {
        out.extend(data);
        out.resize(out.len().div_ceil(ALIGNMENT) * ALIGNMENT, 0);
    }
    std::fs::write(path, out)
}

/// Writes a random all-linear bfloat16 adapter of rank `r` (the engine benchmark's adapters),
/// the dtype PEFT saves adapters trained in bfloat16 in.
pub fn write_random_adapter(dir: &Path, shapes: &ModuleShapes, r: usize, seed: u64) -> std::io::Result<()> {
    write_adapter(dir, shapes, &AdapterSpec::all_linear(r, Dtype::BF16, seed))
}
