//! Qwen2 and Qwen2.5: the Llama decoder with biases on the q, k and v projections.

use super::ArchSpec;

/// Qwen2's facts.
pub const SPEC: ArchSpec = ArchSpec {
    hf_names: &["Qwen2ForCausalLM", "qwen2"],
    gguf_names: &["qwen2"],
    attention_bias: true,
    qk_norm: false,
    llama_cpp_permutes_qk: false,
};
