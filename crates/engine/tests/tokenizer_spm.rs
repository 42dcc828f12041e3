//! The SentencePiece (`tokenizer.ggml.model = "llama"`) tokenizer rebuilt from GGUF metadata
//! against transformers' own GGUF tokenizer (fixtures/tiny/spm, from
//! scripts/reference/make_spm_fixture.py): ids with and without BOS, decoding with and without
//! special tokens, and a chat rendered by the file's template.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use loramux_engine::tokenizer::Tokenizer;
use loramux_engine::{ChatMessage, Engine, EngineOptions, ModelLocation, Prompt};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
    ids_no_special: Vec<u32>,
    decoded: String,
    decoded_skip_special: String,
    decoded_no_special: String,
}

#[derive(Deserialize)]
struct ChatCase {
    messages: Vec<ChatMessage>,
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Fixture {
    gguf: String,
    vocab_size: usize,
    bos_token: String,
    eos_token: String,
    cases: Vec<Case>,
    chat: Vec<ChatCase>,
}

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny/spm")
}

fn fixture() -> (Fixture, PathBuf) {
    let fx: Fixture = serde_json::from_str(&std::fs::read_to_string(dir().join("expected.json")).unwrap()).unwrap();
    let path = dir().join(&fx.gguf);
    (fx, path)
}

#[test]
fn spm_tokenizer_matches_transformers() {
    let (fx, path) = fixture();
    let content = Content::read(&mut std::fs::File::open(&path).unwrap()).unwrap();
    let tok = Tokenizer::from_gguf(&content.metadata, &path).unwrap();
    assert_eq!(tok.vocab_size(), fx.vocab_size);
    assert_eq!(tok.bos_token.as_deref(), Some(fx.bos_token.as_str()));
    assert_eq!(tok.eos_token.as_deref(), Some(fx.eos_token.as_str()));
    for c in &fx.cases {
        let t = &c.text;
        assert_eq!(tok.encode(t, true).unwrap(), c.ids, "ids of {t:?}");
        assert_eq!(tok.encode(t, false).unwrap(), c.ids_no_special, "ids without specials of {t:?}");
        assert_eq!(tok.decode(&c.ids, false).unwrap(), c.decoded, "decode of {t:?}");
        assert_eq!(tok.decode(&c.ids, true).unwrap(), c.decoded_skip_special, "decode skipping specials of {t:?}");
        assert_eq!(tok.decode(&c.ids_no_special, false).unwrap(), c.decoded_no_special, "decode of {t:?} (no BOS)");
    }
}

#[test]
fn spm_gguf_model_loads_and_renders_chat() {
    let (fx, path) = fixture();
    let engine = Engine::load(&ModelLocation::Gguf(path), &EngineOptions::default()).unwrap();
    let plain = &fx.cases[0];
    assert_eq!(engine.input().tokenize(&Prompt::Text(plain.text.clone())).unwrap(), plain.ids);
    let template = engine.chat_template().expect("fixture has a chat template");
    for c in &fx.chat {
        assert_eq!(template.render(&c.messages, true).unwrap(), c.text, "chat rendering");
        assert_eq!(engine.input().tokenize(&Prompt::Chat(c.messages.clone())).unwrap(), c.ids, "chat ids");
    }
}

#[test]
fn spm_bos_defaults_on_and_unknown_models_are_refused() {
    let (fx, path) = fixture();
    let mut md = Content::read(&mut std::fs::File::open(&path).unwrap()).unwrap().metadata;
    // Older files have no flag; transformers (like llama.cpp) then adds BOS, as with the flag set.
    md.remove("tokenizer.ggml.add_bos_token");
    let tok = Tokenizer::from_gguf(&md, &path).unwrap();
    for c in &fx.cases {
        assert_eq!(tok.encode(&c.text, true).unwrap(), c.ids, "ids of {:?} without add_bos_token", c.text);
    }
    md.insert("tokenizer.ggml.model".into(), Value::String("t5".into()));
    let err = Tokenizer::from_gguf(&md, &path).err().expect("t5 is not supported").to_string();
    assert!(err.contains("tokenizer.ggml.model") && err.contains("t5"), "{err}");
}
