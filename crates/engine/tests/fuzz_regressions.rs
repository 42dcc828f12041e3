//! Inputs the fuzz targets (fuzz/, scripts/fuzz.sh) and the fault scripts found, replayed
//! through the same code paths as the `gguf`, `adapter` and `chat_template` targets
//! (decoded by the targets' own `fuzz/inputs.rs`). Every file under
//! fixtures/fuzz/<target>/ is replayed (a new finding only needs its file dropped there);
//! the known ones are also checked for the precise error they must now give.

use std::path::{Path, PathBuf};

use loramux_engine::read_model_config;
use loramux_engine::lora::{LoraModel, LoraModule, ModuleShapes};
use loramux_engine::{ChatMessage, ChatTemplate, Engine, EngineError, EngineOptions, ModelConfig, ModelLocation};

#[path = "../../../fuzz/inputs.rs"]
mod inputs;

fn findings(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/fuzz").join(target);
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

fn finding(target: &str, name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/fuzz").join(target).join(name);
    assert!(p.is_file(), "missing {}", p.display());
    p
}

/// The `gguf` target: header, config, tokenizer and (small models) the whole load.
fn replay_gguf(data: &[u8]) -> Result<(), EngineError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, data).unwrap();
    let location = ModelLocation::Gguf(path);
    read_model_config(&location)?;
    for dequantize in [false, true] {
        let options = EngineOptions { dequantize, max_model_len: Some(64), ..EngineOptions::default() };
        Engine::load(&location, &options)?;
    }
    Ok(())
}

fn tiny_llama_shapes() -> ModuleShapes {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny/llama/config.json");
    ModuleShapes::from_config(&ModelConfig::from_hf_file(&p).unwrap())
}

/// The `adapter` target: 2 bytes little-endian config length, the config, the safetensors.
fn replay_adapter(data: &[u8]) -> Result<LoraModel, EngineError> {
    let (config, weights) = inputs::adapter_input(data).expect("a finding has the 2-byte header");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("adapter_config.json"), config).unwrap();
    std::fs::write(dir.path().join("adapter_model.safetensors"), weights).unwrap();
    let shapes = tiny_llama_shapes();
    let m = LoraModel::load("fuzz", dir.path(), &shapes, 64)?;
    for layer in &m.layers {
        for module in LoraModule::ALL {
            if let Some(w) = &layer[module.index()] {
                let (out_dim, in_dim) = shapes.shapes[module.index()];
                assert_eq!(w.a.to_f32_vec().len(), w.rank * in_dim);
                assert_eq!(w.b_t.to_f32_vec().len(), w.rank * out_dim);
                assert!(w.scale.is_finite());
            }
        }
    }
    Ok(m)
}

/// The `chat_template` target: both renders, the one with the generation prompt last.
fn replay_chat_template(data: &[u8]) -> Result<String, EngineError> {
    let input = inputs::chat_template_input(data);
    let t = ChatTemplate::new(&input.template, input.bos.as_deref(), input.eos.as_deref())?;
    let _ = t.render(&input.messages, false);
    t.render(&input.messages, true)
}

#[test]
fn every_chat_template_finding_is_an_error_not_a_crash() {
    for f in findings("chat_template") {
        let _ = replay_chat_template(&std::fs::read(&f).unwrap());
    }
}

/// Found by the `chat_template` target: `strftime_now('%Q')` (an invalid specifier) made
/// chrono's formatter fail inside `to_string`, which panics; a template from model metadata
/// could panic every chat request. Now a chat-template error.
#[test]
fn chat_template_strftime_with_invalid_format_is_an_error() {
    let data = std::fs::read(finding("chat_template", "strftime-invalid-format")).unwrap();
    match replay_chat_template(&data) {
        Err(EngineError::ChatTemplate(m)) => assert!(m.contains("strftime_now"), "{m}"),
        other => panic!("expected a chat template error, got {other:?}"),
    }
    // Valid formats still render.
    let t = ChatTemplate::new("{{ strftime_now('%Y-%m-%d') }}", None, None).unwrap();
    assert_eq!(t.render(&[], false).unwrap().len(), 10);
}

/// Found by the `chat_template` target in 10-minute runs: recursive macros took 3.4 s per
/// render (12 s under ASan), so a template from model metadata could stall every chat
/// request. Renders now run on bounded fuel: an error within milliseconds. Real templates
/// with 2,000 messages stay well inside it.
#[test]
fn runaway_chat_template_runs_out_of_fuel_and_real_templates_do_not() {
    for name in ["recursive-macro-printing-itself", "recursive-macro-deep"] {
        let data = std::fs::read(finding("chat_template", name)).unwrap();
        let t = std::time::Instant::now();
        match replay_chat_template(&data) {
            Err(EngineError::ChatTemplate(m)) => assert!(m.contains("fuel"), "{name}: {m}"),
            other => panic!("{name}: expected a chat template error, got {other:?}"),
        }
        assert!(t.elapsed().as_secs_f64() < 1.0, "{name}: bounded renders took {:?}", t.elapsed());
    }
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/chat_template");
    for model in ["smollm2-135m", "qwen2.5-coder-0.5b"] {
        let real = inputs::chat_template_input(&std::fs::read(corpus.join(model)).unwrap());
        let template = ChatTemplate::new(&real.template, real.bos.as_deref(), real.eos.as_deref()).unwrap();
        let messages: Vec<ChatMessage> = (0..2000)
            .map(|i| ChatMessage::new(["system", "user", "assistant"][i % 3], format!("message {i}")))
            .collect();
        let text = template.render(&messages, true).unwrap_or_else(|e| panic!("{model}: {e}"));
        assert!(text.contains("message 1999"), "{model}");
    }
}

#[test]
fn every_gguf_finding_is_an_error_not_a_crash() {
    for f in findings("gguf") {
        let _ = replay_gguf(&std::fs::read(&f).unwrap());
    }
}

#[test]
fn every_adapter_finding_is_an_error_not_a_crash() {
    for f in findings("adapter") {
        let _ = replay_adapter(&std::fs::read(&f).unwrap());
    }
}

/// candle's GGUF parser divides by a `general.alignment` of 0: a panic that took down
/// `loramux serve` / `generate` at model load, now a "not a readable GGUF file" error.
#[test]
fn gguf_alignment_zero_is_refused() {
    let data = std::fs::read(finding("gguf", "alignment-zero")).unwrap();
    let e = replay_gguf(&data).expect_err("alignment 0 must be refused");
    assert!(e.to_string().contains("not a readable GGUF file"), "{e}");
}

/// `lora_alpha` 1e300 is a finite double but an infinite f32 scale (every output NaN): the
/// adapter loaded and served garbage; now refused naming `lora_alpha`.
#[test]
fn adapter_alpha_overflowing_f32_is_refused() {
    let data = std::fs::read(finding("adapter", "alpha-f32-overflow")).unwrap();
    match replay_adapter(&data) {
        Err(EngineError::Adapter { field, message, .. }) => {
            assert_eq!(field, "lora_alpha", "{message}");
            assert!(message.contains("finite"), "{message}");
        }
        Err(other) => panic!("expected an adapter error naming lora_alpha, got {other}"),
        Ok(_) => panic!("an adapter with an infinite f32 scale was loaded"),
    }
}

/// Found by the `gguf` target: a tensor whose dimensions multiply past `usize` made
/// candle's element count overflow (a panic with overflow checks, a wrapped size without);
/// now refused before candle reads it.
#[test]
fn gguf_tensor_dims_overflow_is_refused() {
    let data = std::fs::read(finding("gguf", "tensor-dims-overflow")).unwrap();
    let e = replay_gguf(&data).expect_err("overflowing dimensions must be refused");
    assert!(e.to_string().contains("invalid shape"), "{e}");
}

/// A q_proj with zero rows divided by zero in the Llama q/k row un-permutation (a panic at
/// load in release builds too); now refused as an invalid shape.
#[test]
fn gguf_tensor_with_zero_rows_is_refused() {
    let data = std::fs::read(finding("gguf", "tensor-zero-rows")).unwrap();
    let e = replay_gguf(&data).expect_err("an empty projection must be refused");
    assert!(e.to_string().contains("invalid shape"), "{e}");
}

/// Found by the `gguf` target: dimensions whose product fits but whose byte size
/// (blocks x block bytes) overflows `usize` inside candle; now refused as an invalid shape.
#[test]
fn gguf_tensor_bytes_overflow_is_refused() {
    let data = std::fs::read(finding("gguf", "tensor-bytes-overflow")).unwrap();
    let e = replay_gguf(&data).expect_err("an overflowing byte size must be refused");
    assert!(e.to_string().contains("invalid shape"), "{e}");
}
