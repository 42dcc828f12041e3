//! Prefix caching keyed by adapter: a prompt that starts with blocks prefilled before on the
//! same weights reuses them and gives the same tokens as a cold run; a request on another
//! adapter (or the base, or the same name loaded again) never reuses them.

use std::path::{Path, PathBuf};

use loramux_engine::prefix_cache::PrefixCacheStats;
use loramux_engine::{Engine, EngineOptions, LoraLimits, LoraRequest, ModelLocation, Prompt, Request, SamplingParams};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny/llama")
}

fn engine(prefix_cache_bytes: usize) -> Engine {
    let options = EngineOptions {
        lora: LoraLimits { max_loras: 4, max_rank: 16, ..LoraLimits::default() },
        prefix_cache_bytes,
        ..EngineOptions::default()
    };
    let mut e = Engine::load(&ModelLocation::HfDir(tiny()), &options).unwrap();
    for name in ["a", "b"] {
        e.loras_mut().register(name, &tiny().join("adapters").join(name));
    }
    e
}

/// A 200-token "system prompt" (three whole blocks of 64) followed by a question.
fn prompt(question: u32) -> Vec<u32> {
    (0..200u32).map(|i| 100 + (i * 7) % 150).chain([question, question + 1, question + 2]).collect()
}

fn run(e: &mut Engine, adapter: Option<&str>, tokens: Vec<u32>) -> Vec<u32> {
    let r = Request {
        lora: adapter.map(LoraRequest::new),
        prompt: Prompt::Tokens(tokens),
        params: SamplingParams { ignore_eos: true, ..SamplingParams::greedy(12) },
    };
    e.generate(&[r]).unwrap().remove(0).token_ids
}

fn hits(e: &Engine) -> u64 {
    e.prefix_cache_stats().hit_tokens
}

#[test]
fn same_adapter_prefix_hit_matches_a_cold_run_and_other_adapters_never_hit() {
    let mut cold = engine(0);
    let mut warm = engine(64 << 20);
    for adapter in [Some("a"), None, Some("b")] {
        for question in [300, 340] {
            let want = run(&mut cold, adapter, prompt(question));
            let before = hits(&warm);
            let got = run(&mut warm, adapter, prompt(question));
            assert_eq!(got, want, "adapter {adapter:?}, question {question}: cached prefix changed the output");
            let reused = hits(&warm) - before;
            // The first request on each adapter is cold, whatever ran on the others before.
            let expected = if question == 300 { 0 } else { 192 };
            assert_eq!(reused, expected, "adapter {adapter:?}, question {question}: prefix tokens reused");
        }
    }
    assert_eq!(cold.prefix_cache_stats(), PrefixCacheStats::default(), "disabled cache does nothing");
    let s = warm.prefix_cache_stats();
    assert_eq!(s.blocks, 9, "three blocks per weights: base, a and b");
    assert_eq!(s.queried_tokens, 6 * 203);

    // Loading other weights under a name already cached starts its chains afresh.
    warm.loras_mut().unload("a").unwrap();
    warm.loras_mut().load("a", &tiny().join("adapters/b")).unwrap();
    let before = hits(&warm);
    assert_eq!(run(&mut warm, Some("a"), prompt(360)), run(&mut cold, Some("b"), prompt(360)));
    assert_eq!(hits(&warm), before, "a reloaded adapter reused the old weights' prefix");
}

#[test]
fn concurrent_requests_sharing_a_prefix_match_cold_runs() {
    // A batch started together computes its prompts cold; the next batch reuses them, with
    // each sequence's suffix and adapter its own.
    let mut cold = engine(0);
    let mut warm = engine(64 << 20);
    let batch = |questions: [u32; 4]| -> Vec<Request> {
        let adapters = [Some("a"), Some("b"), None, Some("a")];
        adapters
            .iter()
            .zip(questions)
            .map(|(a, q)| Request {
                lora: a.map(LoraRequest::new),
                prompt: Prompt::Tokens(prompt(q)),
                params: SamplingParams { ignore_eos: true, ..SamplingParams::greedy(8) },
            })
            .collect()
    };
    for questions in [[250, 260, 270, 280], [290, 300, 310, 320]] {
        let want: Vec<Vec<u32>> = cold.generate(&batch(questions)).unwrap().into_iter().map(|c| c.token_ids).collect();
        let got: Vec<Vec<u32>> = warm.generate(&batch(questions)).unwrap().into_iter().map(|c| c.token_ids).collect();
        assert_eq!(got, want);
    }
    assert_eq!(hits(&warm), 4 * 192, "the second batch reused every prefix");
}
