//! How the fuzz targets split one input into the parts they feed. Shared, through
//! `#[path]`, with the engine's regression tests (crates/engine/tests/fuzz_regressions.rs),
//! so a finding dropped under fixtures/fuzz/ replays exactly as the target ran it.
// Each target uses only its own decoder.
#![allow(dead_code)]

use loramux_engine::ChatMessage;

/// A `chat_template` input: template, bos token, eos token, then (role, content) pairs, all
/// split on NUL bytes.
pub struct ChatTemplateInput {
    pub template: String,
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub messages: Vec<ChatMessage>,
}

/// Decodes a `chat_template` input (any bytes; invalid UTF-8 is replaced).
pub fn chat_template_input(data: &[u8]) -> ChatTemplateInput {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0');
    let template = parts.next().unwrap_or_default().to_string();
    let bos = parts.next().map(str::to_string);
    let eos = parts.next().map(str::to_string);
    let rest: Vec<&str> = parts.collect();
    let messages = rest
        .chunks(2)
        .map(|p| ChatMessage::new(p[0], p.get(1).copied().unwrap_or_default()))
        .collect();
    ChatTemplateInput { template, bos, eos, messages }
}

/// Decodes an `adapter` input: 2 bytes little-endian config length, `adapter_config.json`,
/// then `adapter_model.safetensors`. `None` below 2 bytes.
pub fn adapter_input(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let header = data.get(..2)?;
    let n = (u16::from_le_bytes([header[0], header[1]]) as usize).min(data.len() - 2);
    Some(data[2..].split_at(n))
}
