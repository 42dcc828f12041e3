//! The chat-template renderer (minijinja with transformers' settings and Python string
//! methods) on a hostile template and hostile messages: templates come from model
//! metadata, messages from clients. Input, split on NUL bytes: template, bos token, eos
//! token, then (role, content) pairs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use loramux_engine::ChatTemplate;

#[path = "../inputs.rs"]
mod inputs;

fuzz_target!(|data: &[u8]| {
    let input = inputs::chat_template_input(data);
    let Ok(t) = ChatTemplate::new(&input.template, input.bos.as_deref(), input.eos.as_deref()) else { return };
    let _ = t.render(&input.messages, true);
    let _ = t.render(&input.messages, false);
});
