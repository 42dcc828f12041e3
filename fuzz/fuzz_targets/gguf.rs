//! The GGUF reader (candle's header parser behind `WeightSource::open_gguf`), our config
//! and tokenizer reconstruction from its metadata, and, for small models, the whole load:
//! tensor repacking (q/k unpermute, quantized layouts), embeddings, chat template.
//! Any `Err` is fine; a panic, an abort or a sanitizer report is a bug.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use loramux_engine::read_model_config;
use loramux_engine::{Engine, EngineOptions, ModelConfig, ModelLocation};

/// One scratch file per fuzzing process, rewritten for every input.
fn scratch() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| std::env::temp_dir().join(format!("loramux-fuzz-gguf-{}.bin", std::process::id())))
}

/// Elements the configuration implies (embeddings plus every layer's projections), or
/// `None` on overflow: only models far below the cap are loaded whole, so executions stay
/// fast and the loader's own size checks, not the allocator, decide.
fn implied_elements(c: &ModelConfig) -> Option<usize> {
    let q = c.num_attention_heads.checked_mul(c.head_dim)?;
    let kv = c.num_key_value_heads.checked_mul(c.head_dim)?;
    let h = c.hidden_size;
    let i = c.intermediate_size;
    let per_layer = h
        .checked_mul(q.checked_mul(2)?.checked_add(kv.checked_mul(2)?)?)?
        .checked_add(h.checked_mul(i)?.checked_mul(3)?)?;
    c.vocab_size.checked_mul(h)?.checked_add(per_layer.checked_mul(c.num_hidden_layers)?)
}

const MAX_ELEMENTS: usize = 1 << 20; // 4 MiB of float32

/// The loader turns panics of candle's GGUF parser into errors (`catch_unwind`, as in
/// production). libfuzzer-sys installs a hook that aborts on every panic, caught or not;
/// put the default (printing) hook back so only panics that escape the loader count.
/// Those still abort: libfuzzer-sys catches whatever unwinds out of this closure.
fn count_only_uncaught_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| drop(std::panic::take_hook()));
}

fuzz_target!(|data: &[u8]| {
    count_only_uncaught_panics();
    let path = scratch();
    if std::fs::write(path, data).is_err() {
        return;
    }
    let location = ModelLocation::Gguf(path.clone());
    let Ok(cfg) = read_model_config(&location) else { return };
    let small = implied_elements(&cfg).is_some_and(|n| n <= MAX_ELEMENTS) && cfg.head_dim <= 4096;
    if !small {
        return;
    }
    // Quantized blocks kept as they are, then dequantized to float32: both repacking paths.
    for dequantize in [false, true] {
        let options = EngineOptions { dequantize, max_model_len: Some(64), ..EngineOptions::default() };
        if let Ok(engine) = Engine::load(&location, &options) {
            // The chat template and tokenizer came from the file too.
            if let Some(t) = engine.chat_template() {
                let _ = t.render(&[loramux_engine::ChatMessage::user("hi")], true);
            }
            let _ = engine.tokenizer().encode("Hello, world", true);
        }
    }
});
