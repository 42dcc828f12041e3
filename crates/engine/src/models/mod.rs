//! The decoder architectures loramux runs: one file per architecture holding what is its
//! own (the names its config and GGUF files use, biases and norms, llama.cpp's row
//! permutation), and one shared transformer ([`transformer`]) built from those facts. To
//! add an architecture of the same decoder shape (Mistral, Gemma-style), add a file with its
//! [`ArchSpec`], a variant to [`Architecture`] and a line to [`Architecture::ALL`]; the
//! transformer, weight loading, adapters and benchmarks read everything from the spec.

pub mod config;
pub mod linear;
pub mod llama;
pub mod qwen2;
pub mod qwen3;
pub mod transformer;

pub use linear::{Linear, LoraLinear};
pub use transformer::{LogitsFor, Transformer};

use crate::lora::{LoraModule, ModuleShapes};
use config::ModelConfig;

/// A decoder family. Its facts are in its [`ArchSpec`] ([`Architecture::spec`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2/3, SmolLM, Mistral.
    Llama,
    /// Qwen2 / Qwen2.5: biases on q/k/v.
    Qwen2,
    /// Qwen3: RMS norms on q and k per head.
    Qwen3,
}

/// What one architecture is, as data the shared code reads.
#[derive(Debug)]
pub struct ArchSpec {
    /// `config.json` `architectures[0]` or `model_type` values naming it.
    pub hf_names: &'static [&'static str],
    /// GGUF `general.architecture` values naming it; the first is what loramux writes.
    pub gguf_names: &'static [&'static str],
    /// q/k/v projections always carry biases (else only when `config.json` sets
    /// `attention_bias`).
    pub attention_bias: bool,
    /// A per-head RMS norm on q and k before the rotary embedding.
    pub qk_norm: bool,
    /// llama.cpp's converter permutes the q/k rows of each head (for its interleaved rotary),
    /// in base weights and in the `lora_b` of GGUF adapters; loading puts them back.
    pub llama_cpp_permutes_qk: bool,
}

impl Architecture {
    /// Every architecture, for lookups by name.
    pub const ALL: [Architecture; 3] = [Architecture::Llama, Architecture::Qwen2, Architecture::Qwen3];

    /// The architecture's facts.
    pub fn spec(self) -> &'static ArchSpec {
        match self {
            Architecture::Llama => &llama::SPEC,
            Architecture::Qwen2 => &qwen2::SPEC,
            Architecture::Qwen3 => &qwen3::SPEC,
        }
    }

    /// Maps a `config.json` `architectures[0]` or `model_type` value.
    pub fn from_hf_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.spec().hf_names.contains(&name))
    }

    /// Maps a GGUF `general.architecture` value.
    pub fn from_gguf_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.spec().gguf_names.contains(&name))
    }

    /// The GGUF `general.architecture` value loramux writes for it.
    pub fn gguf_name(self) -> &'static str {
        self.spec().gguf_names[0]
    }

    /// The GGUF names every architecture accepts, for error messages.
    pub fn supported_gguf_names() -> String {
        Self::ALL.iter().map(|a| a.gguf_name()).collect::<Vec<_>>().join(", ")
    }

    /// Heads whose rows llama.cpp permuted in the base weight of `module` (or, for a GGUF
    /// adapter, its `lora_b`): query heads for q, key/value heads for k, none otherwise.
    pub fn llama_cpp_permuted_heads(self, module: LoraModule, heads: usize, kv_heads: usize) -> Option<usize> {
        if !self.spec().llama_cpp_permutes_qk {
            return None;
        }
        match module {
            LoraModule::QProj => Some(heads),
            LoraModule::KProj => Some(kv_heads),
            _ => None,
        }
    }
}

impl ModuleShapes {
    /// Shapes of a model with this configuration, and its architecture's GGUF facts.
    pub fn from_config(cfg: &ModelConfig) -> Self {
        let h = cfg.hidden_size;
        let q = cfg.num_attention_heads * cfg.head_dim;
        let kv = cfg.num_key_value_heads * cfg.head_dim;
        let i = cfg.intermediate_size;
        let arch = cfg.architecture;
        Self {
            layers: cfg.num_hidden_layers,
            shapes: [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)],
            gguf_architectures: arch.spec().gguf_names,
            permuted_heads: LoraModule::ALL.map(|m| arch.llama_cpp_permuted_heads(m, cfg.num_attention_heads, cfg.num_key_value_heads)),
        }
    }
}
