//! The chat-template renderer (minijinja with transformers' settings and Python string
//! methods) on a hostile template and hostile messages: templates come from model
//! metadata, messages from clients. Input, split on NUL bytes: template, bos token, eos
//! token, then (role, content) pairs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use loramux_engine::{ChatMessage, ChatTemplate};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0');
    let template = parts.next().unwrap_or_default();
    let bos = parts.next();
    let eos = parts.next();
    let rest: Vec<&str> = parts.collect();
    let messages: Vec<ChatMessage> = rest
        .chunks(2)
        .map(|p| ChatMessage { role: p[0].to_string(), content: p.get(1).copied().unwrap_or_default().to_string() })
        .collect();
    let Ok(t) = ChatTemplate::new(template, bos, eos) else { return };
    let _ = t.render(&messages, true);
    let _ = t.render(&messages, false);
});
