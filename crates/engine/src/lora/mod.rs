//! LoRA adapters served unmerged beside one base model, named after vLLM's `vllm/lora/`:
//! [`config`] reads PEFT's `adapter_config.json`, [`model`] holds one adapter's weights
//! (`LoRAModel`), read and checked against the base by `peft` (PEFT directories) or `gguf`
//! (llama.cpp's GGUF adapter files), the reader chosen by the loader, which also reads
//! off the batch loop; [`manager`] owns the resident set, its slots and LRU
//! (`LoRAModelManager`); [`punica`] plans one batch's per-row adapters (vLLM's Punica
//! wrapper), whose shrink/expand kernel is the backend's, called from inside each
//! projection ([`crate::models::LoraLinear`]). A request names its adapter with a
//! [`LoraRequest`].

pub mod config;
mod gguf;
mod loader;
pub mod manager;
pub mod model;
mod peft;
pub mod punica;

pub use config::PeftConfig;
pub use loader::AdapterReader;
pub use manager::{
    scan_lora_dir, AdapterInfo, InsertOutcome, LoadEvents, LoraManager, LoraManagerStats, LoraSlot, Readiness, UnloadOutcome,
};
pub use model::{LoraLayerWeights, LoraMatrix, LoraModel};
pub use punica::LoraBatch;

/// The adapter a request runs with (vLLM's `LoRARequest`); a request without one runs on
/// the base model.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct LoraRequest {
    /// The adapter's name: what clients put in `model`.
    pub lora_name: String,
}

impl LoraRequest {
    /// A request for the adapter called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self { lora_name: name.into() }
    }
}

/// The projections an adapter may target, in the order the model stores them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LoraModule {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

impl LoraModule {
    /// Every targetable projection (PEFT's `all-linear` on these models).
    pub const ALL: [LoraModule; 7] = [
        LoraModule::QProj,
        LoraModule::KProj,
        LoraModule::VProj,
        LoraModule::OProj,
        LoraModule::GateProj,
        LoraModule::UpProj,
        LoraModule::DownProj,
    ];

    /// Position in [`LoraModule::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The module's path inside a decoder layer, as in Hugging Face names.
    pub fn path(self) -> &'static str {
        match self {
            LoraModule::QProj => "self_attn.q_proj",
            LoraModule::KProj => "self_attn.k_proj",
            LoraModule::VProj => "self_attn.v_proj",
            LoraModule::OProj => "self_attn.o_proj",
            LoraModule::GateProj => "mlp.gate_proj",
            LoraModule::UpProj => "mlp.up_proj",
            LoraModule::DownProj => "mlp.down_proj",
        }
    }

    /// Full module name in the base model, the key PEFT matches `target_modules` against.
    pub fn module_name(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}", self.path())
    }
}

/// `(out, in)` of every targetable projection, the layer count, and what reading a GGUF
/// adapter for this base needs to know of its architecture: what an adapter is checked
/// against. Built by the model side (`ModuleShapes::from_config` in [`crate::models`]), so
/// adapters never name an architecture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleShapes {
    pub layers: usize,
    pub shapes: [(usize, usize); 7],
    /// GGUF `general.architecture` names of the base: a GGUF adapter names the one it was
    /// converted for. The first is what loramux writes.
    pub gguf_architectures: &'static [&'static str],
    /// Per projection, the heads whose `lora_b` rows llama.cpp's converter permuted (q and
    /// k of Llama adapters), to read them back.
    pub permuted_heads: [Option<usize>; 7],
}
