//! Time-to-first-token sections: prefix-cache hits against misses, and pinned against
//! evicted adapters.

use std::time::Instant;

use loramux_engine::prefix_cache::DEFAULT_PREFIX_CACHE_BYTES;
use loramux_engine::{Engine, EngineOptions, LoraRequest, Prompt, Request, RequestEvent, SamplingParams, Scheduler, SchedulerConfig};

use super::{load, median, prompt_ids, row, EngineBenchConfig, Row};
use crate::synth::write_random_adapter;

/// Trials of each prefix-cache case (medians reported).
const PREFIX_TRIALS: usize = 5;

/// Time to first token of one request alone under the server's scheduler defaults
/// (chunked prefill), in milliseconds.
fn ttft_ms(engine: &mut Engine, adapter: Option<&str>, prompt: Vec<u32>) -> f64 {
    let mut sched = Scheduler::new(SchedulerConfig::default(), engine).expect("default scheduler");
    let request = Request { lora: adapter.map(LoraRequest::new), prompt: Prompt::Tokens(prompt), params: SamplingParams::greedy(2) };
    let processed = engine.input().process(request).expect("benchmark request");
    let t = Instant::now();
    let ticket = sched.admission_gate().try_enter(loramux_engine::scheduler::Demand::of(&processed)).expect("an empty queue");
    sched.add_request(engine, ticket, 0, processed, None).expect("benchmark request");
    loop {
        let report = sched.step(engine);
        if report.outputs.iter().any(|o| matches!(o.event, RequestEvent::Output { new_tokens, .. } if new_tokens > 0)) {
            let ms = t.elapsed().as_secs_f64() * 1e3;
            sched.abort_all(engine);
            return ms;
        }
        assert!(sched.has_unfinished(), "the request ended without a token");
    }
}

/// Time to first token with a long shared system prompt, prefix-cache hit against miss, on
/// the base and on an adapter: a miss is a system prompt never seen, a hit the same system
/// prompt as the request before it on the same weights, with another question.
pub fn prefix_ttft(cfg: &EngineBenchConfig, rows: &mut Vec<Row>, progress: &dyn Fn(&str)) {
    let options = EngineOptions { prefix_cache_bytes: DEFAULT_PREFIX_CACHE_BYTES, ..EngineOptions::default() };
    let mut engine = Engine::load(&cfg.model, &options).expect("load model");
    let dir = cfg.work_dir.join("prefix-adapter");
    write_random_adapter(&dir, engine.loras().shapes(), 16, 77).expect("write adapter");
    engine.loras_mut().register("p", &dir);
    let question = |seed: usize| prompt_ids(24, 50_000 + seed);
    for adapter in [None, Some("p")] {
        let label = adapter.map_or("base".to_string(), |_| "rank-16 adapter".to_string());
        progress(&format!("prefix cache TTFT ({label})"));
        ttft_ms(&mut engine, adapter, prompt_ids(64, 1)); // warm-up: adapter read, buffers
        let (mut miss, mut hit) = (Vec::new(), Vec::new());
        for trial in 0..PREFIX_TRIALS {
            let system = prompt_ids(cfg.prefix_tokens, 10_000 + trial + adapter.map_or(0, |_| 100));
            miss.push(ttft_ms(&mut engine, adapter, [system.clone(), question(2 * trial)].concat()));
            hit.push(ttft_ms(&mut engine, adapter, [system, question(2 * trial + 1)].concat()));
        }
        let (miss, hit) = (median(miss), median(hit));
        let n = cfg.prefix_tokens;
        rows.push(row("prefix", format!("TTFT, {n}-token system prompt, miss ({label})"), 1, miss, "ms"));
        rows.push(row("prefix", format!("TTFT, {n}-token system prompt, hit ({label})"), 1, hit, "ms"));
        rows.push(row("prefix", format!("TTFT miss / hit ({label})"), 1, miss / hit, "x"));
    }
    let s = engine.prefix_cache_stats();
    rows.push(row("prefix", "prompt tokens served from the cache", 1, 100.0 * s.hit_tokens as f64 / s.queried_tokens.max(1) as f64, "%"));
}

/// `--pin-lora`: time to first token on a pinned adapter and on an unpinned one, each right
/// after requests on four other adapters have cycled through the three resident slots (so
/// the unpinned one was evicted and is read from disk again; the pinned one never is).
pub fn pinning(cfg: &EngineBenchConfig, rows: &mut Vec<Row>, progress: &dyn Fn(&str)) {
    let mut engine = load(cfg, false, 3);
    let shapes = engine.loras().shapes().clone();
    let names = ["pinned", "unpinned", "r0", "r1", "r2", "r3"];
    for (i, name) in names.iter().enumerate() {
        let dir = cfg.work_dir.join(format!("pin-{name}"));
        write_random_adapter(&dir, &shapes, 16, 900 + i as u64).expect("write adapter");
        engine.loras_mut().register(name, &dir);
    }
    engine.loras_mut().pin("pinned").expect("pin");
    progress("pinned vs evicted adapter TTFT");
    let (mut pinned, mut unpinned) = (Vec::new(), Vec::new());
    let churn = |engine: &mut Engine| {
        for name in &names[2..] {
            ttft_ms(engine, Some(name), prompt_ids(16, 3));
        }
    };
    for trial in 0..PREFIX_TRIALS {
        churn(&mut engine);
        pinned.push(ttft_ms(&mut engine, Some("pinned"), prompt_ids(cfg.prompt_len, 700 + trial)));
        churn(&mut engine);
        unpinned.push(ttft_ms(&mut engine, Some("unpinned"), prompt_ids(cfg.prompt_len, 800 + trial)));
    }
    let (pinned, unpinned) = (median(pinned), median(unpinned));
    let n = cfg.prompt_len;
    rows.push(row("pin", format!("TTFT after churn, {n}-token prompt: pinned rank-16 adapter"), 1, pinned, "ms"));
    rows.push(row("pin", format!("TTFT after churn, {n}-token prompt: unpinned (evicted, read again)"), 1, unpinned, "ms"));
    rows.push(row("pin", "unpinned / pinned TTFT", 1, unpinned / pinned, "x"));
}

