//! Llama 2/3, SmolLM and Mistral: pre-norm decoder, rotary embedding (with Llama 3.1's
//! scaling), grouped-query attention, a gated SiLU MLP, no biases unless `config.json`
//! sets `attention_bias`. llama.cpp stores the q/k rows of each head permuted (for its
//! interleaved rotary): [`SPEC`] says so, and [`crate::permute`] puts them back.

use super::ArchSpec;

/// Llama's facts.
pub const SPEC: ArchSpec = ArchSpec {
    hf_names: &["LlamaForCausalLM", "MistralForCausalLM", "llama", "mistral"],
    gguf_names: &["llama", "mistral"],
    attention_bias: false,
    qk_norm: false,
    llama_cpp_permutes_qk: true,
};
