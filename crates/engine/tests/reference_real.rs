//! The engine on the real models against transformers (fixtures from
//! scripts/reference/make_real_fixtures.py): tokenization and chat rendering from the GGUF
//! metadata, and greedy chat answers of SmolLM2-135M (dequantized to float32, as
//! transformers loads it) with and without the trained pirate adapter, plus Qwen2.5-Coder.
//! The models must be in the cache: `loramux models pull smollm2-135m` (scripts/test.sh
//! does it).

use std::path::{Path, PathBuf};

use candle_core::Device;
use loramux_engine::registry::{cached_model_path, known_model};
use loramux_engine::{ChatMessage, Engine, EngineOptions, LoraRequest, ModelLocation, Prompt, Request, SamplingParams};
use serde::Deserialize;

#[derive(Deserialize)]
struct TokenizeCase {
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct ChatCase {
    messages: Vec<ChatMessage>,
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct GreedyCase {
    adapter: Option<String>,
    messages: Vec<ChatMessage>,
    prompt_ids: Vec<u32>,
    output_ids: Vec<u32>,
    text: String,
}

#[derive(Deserialize)]
struct Fixture {
    tokenize: Vec<TokenizeCase>,
    chat: Vec<ChatCase>,
    greedy: Vec<GreedyCase>,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model_path(name: &str) -> ModelLocation {
    let p = cached_model_path(known_model(name).unwrap());
    assert!(p.exists(), "{} is not cached: run `loramux models pull {name}` (scripts/test.sh does)", p.display());
    ModelLocation::Gguf(p)
}

fn fixture(name: &str) -> Fixture {
    let p = repo().join("fixtures/real").join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn check_text(engine: &Engine, fx: &Fixture, name: &str) {
    for t in &fx.tokenize {
        assert_eq!(engine.tokenizer().encode(&t.text, false).unwrap(), t.ids, "{name}: tokenize {:?}", t.text);
    }
    let template = engine.chat_template().expect("model has a chat template");
    for c in &fx.chat {
        let text = template.render(&c.messages, true).unwrap();
        assert_eq!(text, c.text, "{name}: chat rendering");
        assert_eq!(engine.input().tokenize(&Prompt::Chat(c.messages.clone())).unwrap(), c.ids, "{name}: chat ids");
    }
}

fn check_greedy(engine: &mut Engine, fx: &Fixture, name: &str) {
    let requests: Vec<Request> = fx
        .greedy
        .iter()
        .map(|g| Request {
            lora: g.adapter.clone().map(LoraRequest::new),
            prompt: Prompt::Chat(g.messages.clone()),
            params: SamplingParams::greedy(g.output_ids.len().max(1)),
        })
        .collect();
    for (g, r) in fx.greedy.iter().zip(&requests) {
        assert_eq!(engine.input().tokenize(&r.prompt).unwrap(), g.prompt_ids, "{name}: prompt ids");
    }
    // All prompts, base and adapter, in one mixed batch.
    let out = engine.generate(&requests).unwrap();
    for (g, c) in fx.greedy.iter().zip(&out) {
        assert_eq!(c.token_ids, g.output_ids, "{name} {:?}: greedy tokens ({:?} vs {:?})", g.adapter, c.text, g.text);
    }
}

#[test]
fn smollm2_matches_transformers_with_and_without_the_pirate_adapter() {
    let fx = fixture("smollm2-135m");
    let options = EngineOptions { dequantize: true, ..EngineOptions::default() };
    let mut engine = Engine::load(&model_path("smollm2-135m"), &options).unwrap();
    engine.loras_mut().load("pirate", &repo().join("adapters/pirate")).unwrap();
    check_text(&engine, &fx, "smollm2");
    check_greedy(&mut engine, &fx, "smollm2");

    // The adapter's effect is visible in the text.
    for pirate in fx.greedy.iter().filter(|g| g.adapter.as_deref() == Some("pirate")) {
        let base = fx.greedy.iter().find(|g| g.adapter.is_none() && g.messages == pirate.messages).unwrap();
        assert_ne!(pirate.text, base.text);
        assert!(pirate.text.starts_with("Arr"), "{:?}", pirate.text);
    }

    // Last-position logits of the France prompt, base and pirate.
    let logits = candle_core::safetensors::load(repo().join("fixtures/real/smollm2-135m.logits.safetensors"), &Device::Cpu).unwrap();
    for (key, adapter) in [("base", None), ("pirate", Some("pirate"))] {
        let g = fx.greedy.iter().find(|g| g.adapter.as_deref() == adapter).unwrap();
        let ours = last_logits(&engine, &g.prompt_ids, adapter);
        let reference = logits[key].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let worst = ours.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 2e-3, "{key}: max |logit diff| {worst}");
    }
}

fn last_logits(engine: &Engine, ids: &[u32], adapter: Option<&str>) -> Vec<f32> {
    use loramux_engine::{attention::SeqSpan, lora::LoraBatch, models::LogitsFor};
    let model = adapter.map(|a| engine.loras().get_by_name(a).unwrap());
    let lora = LoraBatch::from_runs([(0..ids.len(), model.as_deref())]);
    let mut cache = engine.model().new_cache();
    let spans = [SeqSpan { start: 0, len: ids.len(), pos: 0 }];
    engine
        .model()
        .forward(ids, &spans, &mut [&mut cache], &lora, LogitsFor::LastOfEachSpan)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// The model as shipped (quantized weights, int8 activations) is not bit-exact against the
/// float reference, but its greedy answer to the short factual France prompt is the same.
fn quantized_as_shipped_answers_like_the_reference(name: &str) {
    let fx = fixture(name);
    let mut engine = Engine::load(&model_path(name), &EngineOptions::default()).unwrap();
    assert!(engine.model().is_quantized());
    let g = fx
        .greedy
        .iter()
        .find(|g| g.adapter.is_none() && g.messages.iter().any(|m| m.content.contains("capital of France")))
        .expect("the fixture has the France prompt");
    let params = SamplingParams::greedy(g.output_ids.len() + 8);
    let out = engine.generate(&[Request { lora: None, prompt: Prompt::Chat(g.messages.clone()), params }]).unwrap();
    assert_eq!(out[0].token_ids, g.output_ids, "{name}: {:?}", out[0].text);
}

#[test]
fn smollm2_quantized_as_shipped_answers_like_the_reference() {
    // Q4_1 projections through our packed kernel.
    quantized_as_shipped_answers_like_the_reference("smollm2-135m");
}

#[test]
fn qwen25_coder_matches_transformers() {
    let fx = fixture("qwen2.5-coder-0.5b");
    let mut engine = Engine::load(&model_path("qwen2.5-coder-0.5b"), &EngineOptions { dequantize: true, ..EngineOptions::default() }).unwrap();
    check_text(&engine, &fx, "qwen");
    check_greedy(&mut engine, &fx, "qwen");
}

#[test]
fn qwen25_coder_quantized_as_shipped_answers_like_the_reference() {
    // The Q4_K_M mix: Q5_0/Q8_0 through our packed kernel, Q4_K/Q6_K through candle's.
    quantized_as_shipped_answers_like_the_reference("qwen2.5-coder-0.5b");
}
