//! Qwen3: the Llama decoder with a per-head RMS norm on q and k before the rotary
//! embedding (`self_attn.q_norm`, `self_attn.k_norm`), and no q/k/v biases.

use super::ArchSpec;

/// Qwen3's facts.
pub const SPEC: ArchSpec = ArchSpec {
    hf_names: &["Qwen3ForCausalLM", "qwen3"],
    gguf_names: &["qwen3"],
    attention_bias: false,
    qk_norm: true,
    llama_cpp_permutes_qk: false,
};
