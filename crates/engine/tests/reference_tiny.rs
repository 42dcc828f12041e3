//! The engine against transformers + peft on tiny random Llama, Qwen2 and Qwen3 models
//! (fixtures written by scripts/reference/make_tiny_fixtures.py): logits for base, every
//! adapter unmerged and merged, and peft's own mixed-adapter batch; greedy tokens; chat
//! template rendering and tokenization.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use loramux_engine::lora::LoraBatch;
use loramux_engine::models::LogitsFor;
use loramux_engine::{
    attention::SeqSpan, ChatMessage, Engine, EngineOptions, LoraLimits, LoraRequest, ModelLocation, Prompt, Request,
    SamplingParams,
};
use serde::Deserialize;

/// Largest allowed |ours - reference| for a logit (observed: ~2e-5). The tiny models' logits
/// float32 matmuls in a different order differ by ~1e-6 relative.
const LOGIT_TOLERANCE: f32 = 1e-4;
const ADAPTERS: [&str; 4] = ["a", "b", "c", "d"];

#[derive(Deserialize)]
struct Case {
    name: String,
    adapter: Option<String>,
    merged: bool,
    greedy: Vec<Vec<u32>>,
}

#[derive(Deserialize)]
struct Mixed {
    prompts: Vec<Vec<u32>>,
    adapters: Vec<Option<String>>,
    greedy: Vec<Vec<u32>>,
}

#[derive(Deserialize)]
struct Expected {
    prompts: Vec<Vec<u32>>,
    max_new_tokens: usize,
    cases: Vec<Case>,
    mixed: Mixed,
}

fn fixture_dir(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny").join(arch)
}

fn load(arch: &str) -> (Engine, Expected, HashMap<String, Tensor>) {
    let dir = fixture_dir(arch);
    let options = EngineOptions {
        lora: LoraLimits { max_loras: 8, max_rank: 16, ..LoraLimits::default() },
        ..EngineOptions::default()
    };
    let mut engine = Engine::load(&ModelLocation::HfDir(dir.clone()), &options).unwrap();
    for a in ADAPTERS {
        engine.loras_mut().load(a, &dir.join("adapters").join(a)).unwrap();
    }
    let expected: Expected =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let logits = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    (engine, expected, logits)
}

/// Full-prompt logits of several prompts in one batch, each row with its adapter.
fn batch_logits(engine: &Engine, prompts: &[Vec<u32>], adapters: &[Option<&str>]) -> Vec<Vec<Vec<f32>>> {
    let mut tokens = Vec::new();
    let mut spans = Vec::new();
    for p in prompts {
        spans.push(SeqSpan { start: tokens.len(), len: p.len(), pos: 0 });
        tokens.extend_from_slice(p);
    }
    let models: Vec<_> = adapters
        .iter()
        .map(|a| a.map(|n| engine.loras().get_by_name(n).expect("resident")))
        .collect();
    let lora = LoraBatch::from_runs(
        spans.iter().zip(&models).map(|(s, m)| (s.start..s.start + s.len, m.as_deref())),
    );
    let mut caches: Vec<_> = prompts.iter().map(|_| engine.model().new_cache()).collect();
    let mut refs: Vec<_> = caches.iter_mut().collect();
    let logits = engine
        .model()
        .forward(&tokens, &spans, &mut refs, &lora, LogitsFor::AllRows)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    spans.iter().map(|s| logits[s.start..s.start + s.len].to_vec()).collect()
}

fn assert_close(ours: &[Vec<f32>], reference: &Tensor, what: &str) {
    let reference = reference.to_vec2::<f32>().unwrap();
    assert_eq!(ours.len(), reference.len(), "{what}: rows");
    let mut worst = 0f32;
    for (a, b) in ours.iter().zip(&reference) {
        assert_eq!(a.len(), b.len(), "{what}: vocab");
        for (x, y) in a.iter().zip(b) {
            worst = worst.max((x - y).abs());
        }
    }
    assert!(worst <= LOGIT_TOLERANCE, "{what}: max |logit diff| {worst} > {LOGIT_TOLERANCE}");
}

fn greedy(engine: &mut Engine, prompts: &[Vec<u32>], adapters: &[Option<String>], n: usize) -> Vec<Vec<u32>> {
    let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(n) };
    let requests: Vec<Request> = prompts
        .iter()
        .zip(adapters)
        .map(|(p, a)| Request { lora: a.clone().map(LoraRequest::new), prompt: Prompt::Tokens(p.clone()), params: params.clone() })
        .collect();
    engine.generate(&requests).unwrap().into_iter().map(|c| c.token_ids).collect()
}

fn check_arch(arch: &str) {
    let (mut engine, expected, logits) = load(arch);
    let n = expected.max_new_tokens;
    let base_before = batch_logits(&engine, &expected.prompts[..1], &[None]);
    for case in &expected.cases {
        if case.merged {
            engine.merge_adapter(case.adapter.as_deref().unwrap()).unwrap();
        }
        // Merged: the base weights carry the adapter, so rows run without LoRA.
        let row_adapter = if case.merged { None } else { case.adapter.as_deref() };
        for (i, prompt) in expected.prompts.iter().enumerate() {
            let ours = batch_logits(&engine, std::slice::from_ref(prompt), &[row_adapter]);
            assert_close(&ours[0], &logits[&format!("{}.{i}", case.name)], &format!("{arch} {} prompt {i}", case.name));
            let out = greedy(&mut engine, std::slice::from_ref(prompt), std::slice::from_ref(&case.adapter), n);
            assert_eq!(out[0], case.greedy[i], "{arch} {} prompt {i}: greedy tokens", case.name);
        }
        if case.merged {
            engine.unmerge_adapter();
        }
    }
    // Unmerging restores the base exactly.
    let base_after = batch_logits(&engine, &expected.prompts[..1], &[None]);
    assert_eq!(base_before, base_after, "{arch}: unmerge must restore the base bit for bit");

    // peft's mixed batch (equal-length rows, adapters a, b, c and base in one forward).
    let m = &expected.mixed;
    let names: Vec<Option<&str>> = m.adapters.iter().map(|a| a.as_deref()).collect();
    let ours = batch_logits(&engine, &m.prompts, &names);
    for (i, rows) in ours.iter().enumerate() {
        assert_close(rows, &logits[&format!("mixed.{i}")], &format!("{arch} mixed row {i}"));
    }
    assert_eq!(greedy(&mut engine, &m.prompts, &m.adapters, n), m.greedy, "{arch}: mixed-batch greedy");

    // A mixed batch of different lengths and every adapter gives each row's solo tokens.
    let mut prompts = Vec::new();
    let mut adapters = Vec::new();
    let mut want = Vec::new();
    for case in expected.cases.iter().filter(|c| !c.merged) {
        for (i, p) in expected.prompts.iter().enumerate() {
            prompts.push(p.clone());
            adapters.push(case.adapter.clone());
            want.push(case.greedy[i].clone());
        }
    }
    assert_eq!(greedy(&mut engine, &prompts, &adapters, n), want, "{arch}: ragged mixed batch");
}

#[test]
fn llama_matches_transformers_and_peft() {
    check_arch("llama");
}

#[test]
fn qwen2_matches_transformers_and_peft() {
    check_arch("qwen2");
}

#[test]
fn qwen3_matches_transformers_and_peft() {
    check_arch("qwen3");
}

#[derive(Deserialize)]
struct ChatCase {
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct TokenizeCase {
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct ChatFixture {
    chat: Vec<ChatCase>,
    tokenize: Vec<TokenizeCase>,
}

#[test]
fn chat_template_and_tokenizer_match_transformers() {
    for arch in ["llama", "qwen2", "qwen3"] {
        let dir = fixture_dir(arch);
        let engine = Engine::load(&ModelLocation::HfDir(dir.clone()), &EngineOptions::default()).unwrap();
        let fx: ChatFixture = serde_json::from_str(&std::fs::read_to_string(dir.join("chat.json")).unwrap()).unwrap();
        let template = engine.chat_template().expect("fixture has a chat template");
        for c in &fx.chat {
            let text = template.render(&c.messages, c.add_generation_prompt).unwrap();
            assert_eq!(text, c.text, "{arch}: rendered chat");
            assert_eq!(engine.tokenizer().encode(&text, false).unwrap(), c.ids, "{arch}: chat ids");
            if c.add_generation_prompt {
                assert_eq!(engine.input().tokenize(&Prompt::Chat(c.messages.clone())).unwrap(), c.ids);
            }
        }
        for t in &fx.tokenize {
            assert_eq!(engine.tokenizer().encode(&t.text, false).unwrap(), t.ids, "{arch}: tokenize {:?}", t.text);
        }
    }
}

/// Log-softmax of one row of reference logits.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let log_sum = row.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln() + max;
    row.iter().map(|&l| l as f64 - log_sum).collect()
}

/// Prompt log-probabilities (`echo` with `logprobs` and `max_tokens: 0`, vLLM's
/// `prompt_logprobs`) against log-softmax of transformers' logits at every position, with
/// prompts split into chunks across passes (a budget of 4 tokens) and mixed with a
/// generating request in the same passes.
#[test]
fn prompt_logprobs_match_transformers() {
    use loramux_engine::{Scheduler, SchedulerConfig};
    for arch in ["llama", "qwen2", "qwen3"] {
        let (mut engine, expected, logits) = load(arch);
        for (case, adapter) in [("base", None), ("b_unmerged", Some("b"))] {
            let scoring = SamplingParams { prompt_logprobs: Some(3), ..SamplingParams::greedy(0) };
            let mut requests: Vec<Request> = expected
                .prompts
                .iter()
                .map(|p| Request { lora: adapter.map(LoraRequest::new), prompt: Prompt::Tokens(p.clone()), params: scoring.clone() })
                .collect();
            requests.push(Request { lora: None, prompt: Prompt::Tokens(expected.prompts[0].clone()), params: SamplingParams::greedy(3) });
            let processed = requests.iter().map(|r| engine.input().process(r.clone()).unwrap()).collect();
            let cfg = SchedulerConfig { max_num_batched_tokens: 4, ..SchedulerConfig::for_batch(requests.len()) };
            let done = Scheduler::new(cfg, &engine).unwrap().run_to_completion(&mut engine, processed).unwrap();
            for (i, prompt) in expected.prompts.iter().enumerate() {
                let c = &done[i];
                assert!(c.token_ids.is_empty(), "{arch} {case}: max_tokens 0 generates nothing");
                let lps = c.prompt_logprobs.as_ref().expect("asked for");
                assert_eq!(lps.len(), prompt.len() - 1, "{arch} {case} prompt {i}: one entry per token after the first");
                let reference = logits[&format!("{case}.{i}")].to_vec2::<f32>().unwrap();
                for (p, t) in lps.iter().enumerate() {
                    let want = log_softmax(&reference[p]);
                    assert_eq!(t.id, prompt[p + 1]);
                    let diff = (t.logprob as f64 - want[t.id as usize]).abs();
                    assert!(diff < 1e-4, "{arch} {case} prompt {i} position {}: {} vs {}", p + 1, t.logprob, want[t.id as usize]);
                    let rank = 1 + want.iter().filter(|&&w| w > want[t.id as usize]).count() as u32;
                    assert_eq!(t.rank, Some(rank), "{arch} {case}: rank at {}", p + 1);
                    let mut order: Vec<usize> = (0..want.len()).collect();
                    order.sort_by(|&a, &b| want[b].total_cmp(&want[a]));
                    let top: Vec<u32> = t.top.iter().map(|&(id, _)| id).collect();
                    assert_eq!(top, order[..3].iter().map(|&x| x as u32).collect::<Vec<_>>(), "{arch} {case}: top-3 at {}", p + 1);
                }
            }
            assert_eq!(done.last().unwrap().token_ids.len(), 3, "{arch}: the generating request in the same passes");
        }
    }
}

#[derive(Deserialize)]
struct EmbeddingCase {
    adapter: Option<String>,
    prompt_ids: Vec<u32>,
    embedding: Vec<f32>,
}

#[derive(Deserialize)]
struct EmbeddingFixture {
    cases: Vec<EmbeddingCase>,
}

/// Embedding requests (prefill only, pooled last-layer states: `/v1/embeddings`) against
/// transformers + peft (fixtures/tiny/llama/embeddings.json, by
/// scripts/reference/make_embedding_fixture.py): the base and every adapter, all in one
/// scheduler run, prefilled in chunks of 4 tokens, beside a generating request on another
/// adapter; and a prompt cached by a generation is pooled whole (no prefix reuse).
#[test]
fn embedding_requests_match_peft() {
    use loramux_engine::pooling::Pooling;
    use loramux_engine::{Scheduler, SchedulerConfig};
    let dir = fixture_dir("llama");
    let options = EngineOptions {
        lora: LoraLimits { max_loras: 8, max_rank: 16, ..LoraLimits::default() },
        prefix_cache_bytes: 1 << 20,
        ..EngineOptions::default()
    };
    let mut engine = Engine::load(&ModelLocation::HfDir(dir.clone()), &options).unwrap();
    for a in ADAPTERS {
        engine.loras_mut().load(a, &dir.join("adapters").join(a)).unwrap();
    }
    let fixture: EmbeddingFixture =
        serde_json::from_str(&std::fs::read_to_string(fixture_dir("llama").join("embeddings.json")).unwrap()).unwrap();
    let mut processed: Vec<_> = fixture
        .cases
        .iter()
        .map(|c| engine.input().process_embedding(c.adapter.as_deref().map(LoraRequest::new), c.prompt_ids.clone(), Pooling::MeanSkipFirst).unwrap())
        .collect();
    let generating = Request { lora: Some(LoraRequest::new("c")), prompt: Prompt::Tokens(fixture.cases[2].prompt_ids.clone()), params: SamplingParams::greedy(5) };
    processed.push(engine.input().process(generating).unwrap());
    let cfg = SchedulerConfig { max_num_batched_tokens: 4, ..SchedulerConfig::for_batch(processed.len()) };
    let done = Scheduler::new(cfg, &engine).unwrap().run_to_completion(&mut engine, processed).unwrap();
    for (c, got) in fixture.cases.iter().zip(&done) {
        let what = format!("adapter {:?}, {} tokens", c.adapter, c.prompt_ids.len());
        assert!(got.token_ids.is_empty(), "{what}: an embedding request generates nothing");
        let v = got.embedding.as_ref().expect("an embedding request finishes with its vector");
        assert_eq!(v.len(), c.embedding.len(), "{what}");
        let worst = v.iter().zip(&c.embedding).map(|(a, b)| (a - b).abs() / b.abs().max(1.0)).fold(0f32, f32::max);
        assert!(worst < 1e-4, "{what}: off by {worst}");
    }
    assert_eq!(done.last().unwrap().token_ids.len(), 5, "the generating request ran in the same passes");
    assert!(done.last().unwrap().embedding.is_none());

    // A prompt whose KV a generation left in the prefix cache: an embedding request of it
    // still computes (and pools) every position, so its vector is the one from before.
    let long: Vec<u32> = fixture.cases.iter().flat_map(|c| c.prompt_ids.clone()).cycle().take(80).collect();
    let embed = |engine: &mut Engine| {
        let r = engine.input().process_embedding(None, long.clone(), Pooling::MeanSkipFirst).unwrap();
        let done = Scheduler::new(SchedulerConfig::for_batch(1), engine).unwrap().run_to_completion(engine, vec![r]).unwrap();
        done[0].embedding.clone().unwrap()
    };
    let before = embed(&mut engine);
    let generation = engine.input().process(Request { lora: None, prompt: Prompt::Tokens(long.clone()), params: SamplingParams::greedy(1) }).unwrap();
    Scheduler::new(SchedulerConfig::for_batch(1), &engine).unwrap().run_to_completion(&mut engine, vec![generation]).unwrap();
    assert!(engine.prefix_cache_stats().blocks > 0, "the prompt's KV is cached");
    let after = embed(&mut engine);
    assert!(before.iter().zip(&after).all(|(x, y)| (x - y).abs() <= 1e-5 * y.abs().max(1.0)), "no prefix reuse for pooling");
}
