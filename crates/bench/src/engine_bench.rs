//! `loramux bench engine`: the engine's own speed on one machine, measured in one run so
//! ratios compare like with like — memory-bandwidth roofline, decode and prefill
//! tokens/s by batch size, the cost of unmerged LoRA against merged and base by rank,
//! mixed batches over many distinct adapters, adapter load time and memory, and time to
//! first token with a cached prompt prefix.
//! Throughput is total time over steps; the LoRA comparisons are median step times over
//! interleaved rounds, so a slow spell of a shared machine does not fall on one side.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use loramux_engine::lora::LoraModule;
use loramux_engine::prefix_cache::DEFAULT_PREFIX_CACHE_BYTES;
use loramux_engine::{
    Engine, EngineOptions, LoraLimits, LoraRequest, ModelLocation, Prompt, Request, RequestEvent, RequestId, SamplingParams, Scheduler,
    SchedulerConfig,
};
use rayon::prelude::*;
use safetensors::Dtype;
use serde::Serialize;

use crate::synth::{write_gguf_adapter, write_random_adapter, AdapterSpec};

/// What to measure.
#[derive(Clone, Debug)]
pub struct EngineBenchConfig {
    pub model: ModelLocation,
    pub model_label: String,
    pub batches: Vec<usize>,
    pub prompt_len: usize,
    pub decode_steps: usize,
    /// Ranks for the LoRA cost table (needs a float base: runs dequantized).
    pub lora_ranks: Vec<usize>,
    pub lora_batches: Vec<usize>,
    /// Distinct adapters in a batch of `mixed_batch` sequences.
    pub adapter_counts: Vec<usize>,
    pub mixed_batch: usize,
    pub load_samples: usize,
    /// Requests in the serving-mix replay.
    pub mix_requests: usize,
    /// Length of the shared system prompt in the prefix-cache section.
    pub prefix_tokens: usize,
    pub work_dir: PathBuf,
}

/// One measured row.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub section: String,
    pub label: String,
    pub batch: usize,
    pub value: f64,
    pub unit: String,
}

/// Streaming-read bandwidth with all threads over `bytes` (GB/s, best of 3).
pub fn memory_bandwidth_gbs(bytes: usize) -> f64 {
    let data = vec![1.0f32; bytes / 4];
    let mut best = 0f64;
    for _ in 0..4 {
        let t = Instant::now();
        // 16 independent accumulators so the read, not the add chain, is the limit.
        let sum: f32 = data
            .par_chunks(1 << 16)
            .map(|c| {
                let mut acc = [0f32; 16];
                for v in c.chunks_exact(16) {
                    for i in 0..16 {
                        acc[i] += v[i];
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum();
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        best = best.max(bytes as f64 / secs / 1e9);
    }
    best
}

fn prompt_ids(len: usize, seed: usize) -> Vec<u32> {
    (0..len).map(|i| 100 + ((i * 7919 + seed * 104_729) % 5000) as u32).collect()
}

/// Decode step times of one measurement, in seconds.
#[derive(Clone, Copy, Debug)]
pub struct StepTimes {
    /// Total time over steps: what throughput is.
    pub mean: f64,
    /// The middle step: what ratios between configurations compare, since a step slowed by
    /// something else on the machine does not move it.
    pub median: f64,
}

/// A scheduler that runs `n` sequences of `prompt_len` tokens in one batch, every prompt
/// prefilled in one pass: the batching `serve` and `generate` use, without a memory limit.
fn batch_scheduler(engine: &Engine, n: usize, prompt_len: usize) -> Scheduler {
    batch_scheduler_with(engine, n, prompt_len, None)
}

/// [`batch_scheduler`] with `--auto-merge` after `auto_merge_after`.
fn batch_scheduler_with(engine: &Engine, n: usize, prompt_len: usize, auto_merge_after: Option<Duration>) -> Scheduler {
    let cfg = SchedulerConfig { max_num_batched_tokens: (n * prompt_len).max(8192), auto_merge_after, ..SchedulerConfig::for_batch(n) };
    Scheduler::new(cfg, engine).expect("benchmark scheduler")
}

/// Queues one benchmark request per adapter entry.
fn add_requests(sched: &mut Scheduler, engine: &mut Engine, adapters: &[Option<String>], prompt_len: usize, seed: usize, params: &SamplingParams) {
    for (i, a) in adapters.iter().enumerate() {
        let request = Request { lora: a.clone().map(LoraRequest::new), prompt: Prompt::Tokens(prompt_ids(prompt_len, i + seed)), params: params.clone() };
        let processed = engine.input().process(request).expect("benchmark request");
        let ticket = sched.admission_gate().try_enter().expect("room for the batch");
        sched.add_request(engine, ticket, i as RequestId, processed, None).expect("benchmark request");
    }
}

/// Times `steps` decode steps of `adapters.len()` sequences, each scheduler step alone.
pub fn decode_step_seconds(engine: &mut Engine, adapters: &[Option<String>], prompt_len: usize, steps: usize) -> StepTimes {
    decode_step_seconds_with(engine, adapters, prompt_len, steps, None)
}

/// [`decode_step_seconds`] under `--auto-merge` after `auto_merge_after` (a merge falls in
/// the untimed first step when the hysteresis is zero).
fn decode_step_seconds_with(
    engine: &mut Engine,
    adapters: &[Option<String>],
    prompt_len: usize,
    steps: usize,
    auto_merge_after: Option<Duration>,
) -> StepTimes {
    let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(steps + 2) };
    let mut sched = batch_scheduler_with(engine, adapters.len(), prompt_len, auto_merge_after);
    add_requests(&mut sched, engine, adapters, prompt_len, 0, &params);
    sched.step(engine); // admission, prefill and the first token
    sched.step(engine); // warm-up decode
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t = Instant::now();
        let report = sched.step(engine);
        times.push(t.elapsed().as_secs_f64());
        assert_eq!(report.batch.map(|b| b.rows), Some(adapters.len()), "one decode row per sequence");
    }
    sched.abort_all(engine);
    StepTimes { mean: times.iter().sum::<f64>() / steps as f64, median: median(times) }
}

/// Prefill tokens/s for `batch` prompts of `prompt_len` tokens in one step (best of 3).
pub fn prefill_tokens_per_second(engine: &mut Engine, batch: usize, prompt_len: usize) -> f64 {
    let mut best = 0f64;
    for rep in 0..3 {
        let mut sched = batch_scheduler(engine, batch, prompt_len);
        add_requests(&mut sched, engine, &vec![None; batch], prompt_len, rep * 97, &SamplingParams::greedy(1));
        let t = Instant::now();
        sched.step(engine);
        best = best.max((batch * prompt_len) as f64 / t.elapsed().as_secs_f64());
        sched.abort_all(engine);
    }
    best
}

/// Rounds of interleaved measurements behind each LoRA-cost figure.
const ROUNDS: usize = 3;

fn median(v: Vec<f64>) -> f64 {
    crate::stats::percentile(&v, 50.0).expect("finite step times")
}

fn row(section: &str, label: impl Into<String>, batch: usize, value: f64, unit: &str) -> Row {
    Row { section: section.into(), label: label.into(), batch, value, unit: unit.into() }
}

fn load(cfg: &EngineBenchConfig, dequantize: bool, max_loras: usize) -> Engine {
    let options = EngineOptions {
        dequantize,
        lora: LoraLimits { max_loras, max_rank: 64, ..LoraLimits::default() },
        ..EngineOptions::default()
    };
    Engine::load(&cfg.model, &options).expect("load model")
}

/// Throughput by batch size for the model as shipped and dequantized, plus the roofline.
pub fn throughput(cfg: &EngineBenchConfig, rows: &mut Vec<Row>, progress: &dyn Fn(&str)) {
    progress("memory bandwidth");
    let bw = memory_bandwidth_gbs(1 << 30);
    rows.push(row("roofline", "stream read, all threads, 1 GiB", 0, bw, "GB/s"));
    for dequantize in [false, true] {
        let mut engine = load(cfg, dequantize, 1);
        let weights = engine.model().bytes_read_per_token() as f64;
        let kind = if dequantize { "float32" } else { "as shipped" };
        rows.push(row("roofline", format!("{} {kind}: weight bytes per token", cfg.model_label), 1, weights / 1e6, "MB"));
        rows.push(row("roofline", format!("{} {kind}: bandwidth bound, batch 1", cfg.model_label), 1, bw * 1e9 / weights, "tok/s"));
        for &b in &cfg.batches {
            progress(&format!("{kind} decode batch {b}"));
            let step = decode_step_seconds(&mut engine, &vec![None; b], cfg.prompt_len, cfg.decode_steps).mean;
            rows.push(row("decode", format!("{} {kind}", cfg.model_label), b, b as f64 / step, "tok/s"));
            progress(&format!("{kind} prefill batch {b}"));
            let tps = prefill_tokens_per_second(&mut engine, b, cfg.prompt_len);
            rows.push(row("prefill", format!("{} {kind}, {} tokens each", cfg.model_label, cfg.prompt_len), b, tps, "tok/s"));
        }
    }
}

/// The engine's own throughput on `bench load`'s request mix (chat prompts of 8–64 words,
/// 16–64 output tokens, requests spread over two adapters shaped like the examples), every request queued at
/// once and run through the scheduler with the server's default limits: the ceiling a
/// server on this engine can approach, with no HTTP, no client and no arrival gaps.
pub fn serving_mix(cfg: &EngineBenchConfig, rows: &mut Vec<Row>, progress: &dyn Fn(&str)) {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    progress("serving mix");
    let mut engine = load(cfg, false, 2);
    let shapes = engine.loras().shapes().clone();
    for (i, name) in ["mix0", "mix1"].into_iter().enumerate() {
        let d = cfg.work_dir.join(name);
        // The example adapters' shape: rank 8 on the attention projections.
        let spec = crate::synth::AdapterSpec {
            rank: 8,
            targets: vec![LoraModule::QProj, LoraModule::KProj, LoraModule::VProj, LoraModule::OProj],
            dtype: safetensors::Dtype::F16,
            seed: 77 + i as u64,
        };
        crate::synth::write_adapter(&d, &shapes, &spec).expect("write adapter");
        engine.loras_mut().load(name, &d).expect("load adapter");
    }
    let server = SchedulerConfig { max_waiting: cfg.mix_requests, max_queue_delay: None, ..SchedulerConfig::default() };
    let seqs = server.max_num_seqs;
    let mut sched = Scheduler::new(server, &engine).expect("scheduler");
    let mut rng = StdRng::seed_from_u64(0);
    let mut prompt_tokens = 0;
    for i in 0..cfg.mix_requests {
        let words = rng.random_range(8..=64);
        let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(rng.random_range(16..=64)) };
        let lora = Some(LoraRequest::new(if i % 2 == 0 { "mix0" } else { "mix1" }));
        let chat = vec![loramux_engine::ChatMessage::user(crate::load::prompt(&mut rng, words))];
        let processed = engine.input().process(Request { lora, prompt: Prompt::Chat(chat), params }).expect("mix request");
        prompt_tokens += processed.prompt_ids().len();
        let ticket = sched.admission_gate().try_enter().expect("room");
        sched.add_request(&mut engine, ticket, i as RequestId, processed, None).expect("queued");
    }
    let t = Instant::now();
    let mut output_tokens = 0;
    while sched.has_unfinished() {
        for out in sched.step(&mut engine).outputs {
            if let loramux_engine::RequestEvent::Finished { completion } = out.event {
                output_tokens += completion.token_ids.len();
            }
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let n = cfg.mix_requests;
    rows.push(row("mix", format!("{n} requests, {prompt_tokens} prompt + {output_tokens} output tokens"), seqs, n as f64 / secs, "req/s"));
    rows.push(row("mix", "output tokens", seqs, output_tokens as f64 / secs, "tok/s"));
    rows.push(row("mix", "prompt + output tokens", seqs, (prompt_tokens + output_tokens) as f64 / secs, "tok/s"));
}

/// Unmerged vs merged vs base decode step time by rank (float base), and mixed batches
/// over many distinct adapters (model as shipped).
pub fn lora_cost(cfg: &EngineBenchConfig, rows: &mut Vec<Row>, progress: &dyn Fn(&str)) {
    let mut engine = load(cfg, true, 4);
    let shapes = engine.loras().shapes().clone();
    for &r in &cfg.lora_ranks {
        let dir = cfg.work_dir.join(format!("rank{r}"));
        write_random_adapter(&dir, &shapes, r, r as u64).expect("write adapter");
        engine.loras_mut().load("x", &dir).expect("load adapter");
        for &b in &cfg.lora_batches {
            progress(&format!("rank {r} batch {b}"));
            let (mut base, mut unmerged, mut merged) = (Vec::new(), Vec::new(), Vec::new());
            // Interleaved rounds, so a slow spell of the machine lands on all three alike.
            for _ in 0..ROUNDS {
                base.push(decode_step_seconds(&mut engine, &vec![None; b], cfg.prompt_len, cfg.decode_steps).median);
                unmerged.push(decode_step_seconds(&mut engine, &vec![Some("x".to_string()); b], cfg.prompt_len, cfg.decode_steps).median);
                engine.merge_adapter("x").expect("merge");
                merged.push(decode_step_seconds(&mut engine, &vec![Some("x".to_string()); b], cfg.prompt_len, cfg.decode_steps).median);
                engine.unmerge_adapter();
            }
            let (base, unmerged, merged) = (median(base), median(unmerged), median(merged));
            let label = format!("rank {r} all-linear, float32 base");
            rows.push(row("lora_step_ms", format!("{label}: base"), b, base * 1e3, "ms"));
            rows.push(row("lora_step_ms", format!("{label}: merged"), b, merged * 1e3, "ms"));
            rows.push(row("lora_step_ms", format!("{label}: unmerged"), b, unmerged * 1e3, "ms"));
            rows.push(row("lora_ratio", format!("{label}: unmerged / merged"), b, unmerged / merged, "x"));
        }
        engine.loras_mut().unload("x").expect("unload");
    }

    let max_adapters = cfg.adapter_counts.iter().copied().max().unwrap_or(1);
    let mut engine = load(cfg, false, max_adapters);
    for i in 0..max_adapters {
        let dir = cfg.work_dir.join(format!("mixed{i}"));
        write_random_adapter(&dir, &shapes, 16, 1000 + i as u64).expect("write adapter");
        engine.loras_mut().load(&format!("m{i}"), &dir).expect("load adapter");
    }
    let b = cfg.mixed_batch;
    // Every configuration once per round, rounds interleaved; each figure is the median.
    let configs: Vec<Option<usize>> = std::iter::once(None).chain(cfg.adapter_counts.iter().copied().map(Some)).collect();
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    for round in 0..ROUNDS {
        for (config, t) in configs.iter().zip(&mut times) {
            progress(&format!("{b} sequences over {} adapters, round {}", config.unwrap_or(0), round + 1));
            let adapters: Vec<Option<String>> = (0..b).map(|i| config.map(|k| format!("m{}", i % k))).collect();
            t.push(decode_step_seconds(&mut engine, &adapters, cfg.prompt_len, cfg.decode_steps).median);
        }
    }
    let steps: Vec<f64> = times.into_iter().map(median).collect();
    let one = configs.iter().zip(&steps).find(|(c, _)| **c == Some(1)).map(|(_, &s)| s);
    for (config, &step) in configs.iter().zip(&steps) {
        match config {
            None => rows.push(row("mixed_step_ms", "no adapter", b, step * 1e3, "ms")),
            Some(k) => {
                rows.push(row("mixed_step_ms", format!("{k} distinct rank-16 adapters"), b, step * 1e3, "ms"));
                if let Some(one) = one {
                    rows.push(row("mixed_ratio", format!("{k} adapters / 1 adapter"), b, step / one, "x"));
                }
            }
        }
    }
}

/// Adapter load time from disk and memory added per resident adapter; and the same
/// adapters as llama.cpp GGUF files against their PEFT directories: read-and-check time of
/// each format (interleaved, so a slow spell of a shared machine falls on both) and whether
/// both give the same greedy tokens.
pub fn adapter_load(cfg: &EngineBenchConfig, rows: &mut Vec<Row>, progress: &dyn Fn(&str)) {
    // One slot more than the timed loads: the GGUF twin of the first one, for the tokens.
    let mut engine = load(cfg, false, cfg.load_samples + 1);
    let shapes = engine.loras().shapes().clone();
    let dirs: Vec<PathBuf> = (0..cfg.load_samples)
        .map(|i| {
            let d = cfg.work_dir.join(format!("load{i}"));
            write_random_adapter(&d, &shapes, 16, 5000 + i as u64).expect("write adapter");
            d
        })
        .collect();
    progress("adapter loads");
    let mut times = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        let t = Instant::now();
        engine.loras_mut().load(&format!("l{i}"), d).expect("load");
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let bytes = engine.loras().resident_bytes() as f64 / cfg.load_samples as f64;
    let file = std::fs::metadata(dirs[0].join("adapter_model.safetensors")).map(|m| m.len()).unwrap_or(0) as f64;
    rows.push(row("adapter_load", "rank-16 all-linear load from disk, p50", 1, crate::stats::percentile(&times, 50.0).unwrap_or(f64::NAN), "ms"));
    rows.push(row("adapter_load", "rank-16 all-linear load from disk, p95", 1, crate::stats::percentile(&times, 95.0).unwrap_or(f64::NAN), "ms"));
    rows.push(row("adapter_memory", "adapter weights in memory (per adapter)", 1, bytes / 1e6, "MB"));
    rows.push(row("adapter_memory", "adapter file size (bf16)", 1, file / 1e6, "MB"));

    progress("GGUF vs PEFT adapter reads");
    let ggufs: Vec<PathBuf> = (0..cfg.load_samples)
        .map(|i| {
            let p = cfg.work_dir.join(format!("load{i}.gguf"));
            write_gguf_adapter(&p, &shapes, &AdapterSpec::all_linear(16, Dtype::BF16, 5000 + i as u64)).expect("write GGUF adapter");
            p
        })
        .collect();
    let (mut peft_ms, mut gguf_ms) = (Vec::new(), Vec::new());
    let reader = engine.loras().reader();
    for (i, (dir, gguf)) in dirs.iter().zip(&ggufs).enumerate() {
        // Each format goes first every other time.
        for first in [i % 2 == 0, i % 2 != 0] {
            if first {
                peft_ms.push(reader.read("peft", dir).expect("read PEFT adapter").1 * 1e3);
            } else {
                gguf_ms.push(reader.read("gguf", gguf).expect("read GGUF adapter").1 * 1e3);
            }
        }
    }
    let n = cfg.load_samples;
    rows.push(row("adapter_load_gguf", format!("rank-16 all-linear bf16 read + check, PEFT directory, median of {n}"), 1, median(peft_ms), "ms"));
    rows.push(row("adapter_load_gguf", format!("same adapters as llama.cpp GGUF files, median of {n}"), 1, median(gguf_ms), "ms"));
    let gguf_file = std::fs::metadata(&ggufs[0]).map(|m| m.len()).unwrap_or(0) as f64;
    rows.push(row("adapter_memory", "adapter file size (GGUF, bf16)", 1, gguf_file / 1e6, "MB"));
    engine.loras_mut().load("g0", &ggufs[0]).expect("load GGUF adapter");
    let mut greedy = |name: &str| {
        let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(16) };
        let request = Request { lora: Some(LoraRequest::new(name)), prompt: Prompt::Tokens(prompt_ids(cfg.prompt_len, 1)), params };
        engine.generate(&[request]).expect("generate").remove(0).token_ids
    };
    let same = greedy("l0") == greedy("g0");
    rows.push(row("adapter_load_gguf", "16 greedy tokens with the GGUF file equal the PEFT directory's (1 = yes)", 1, same as u8 as f64, "bool"));
}

/// `--auto-merge` on a float base: decode step time of one-adapter traffic (folded after
/// the first step) against the base and against the same traffic unmerged, two-adapter
/// traffic with and without `--auto-merge` (never folded), and the fold and unfold times.
pub fn auto_merge(cfg: &EngineBenchConfig, rows: &mut Vec<Row>, progress: &dyn Fn(&str)) {
    let mut engine = load(cfg, true, 4);
    let shapes = engine.loras().shapes().clone();
    for (name, seed) in [("x", 31), ("y", 32)] {
        let dir = cfg.work_dir.join(format!("merge-{name}"));
        write_random_adapter(&dir, &shapes, 16, seed).expect("write adapter");
        engine.loras_mut().load(name, &dir).expect("load adapter");
    }
    let b = cfg.mixed_batch;
    let on = Some(Duration::ZERO);
    let one: Vec<Option<String>> = vec![Some("x".into()); b];
    let two: Vec<Option<String>> = (0..b).map(|i| Some(["x", "y"][i % 2].to_string())).collect();
    let cases: [(&str, &[Option<String>], Option<Duration>); 5] = [
        ("base", &vec![None; b], None),
        ("1 adapter, unmerged", &one, None),
        ("1 adapter, --auto-merge", &one, on),
        ("2 adapters, unmerged", &two, None),
        ("2 adapters, --auto-merge", &two, on),
    ];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for round in 0..ROUNDS {
        progress(&format!("auto-merge, round {}", round + 1));
        for ((_, adapters, after), t) in cases.iter().zip(&mut times) {
            t.push(decode_step_seconds_with(&mut engine, adapters, cfg.prompt_len, cfg.decode_steps, *after).median);
            engine.unmerge_adapter();
        }
    }
    let steps: Vec<f64> = times.into_iter().map(median).collect();
    let label = "rank-16 all-linear, float32 base";
    for ((case, _, _), step) in cases.iter().zip(&steps) {
        rows.push(row("auto_merge", format!("{label}: {case}, decode step"), b, step * 1e3, "ms"));
    }
    rows.push(row("auto_merge", "1 adapter --auto-merge / base, decode step", b, steps[2] / steps[0], "x"));
    rows.push(row("auto_merge", "1 adapter --auto-merge / unmerged, decode step", b, steps[2] / steps[1], "x"));
    rows.push(row("auto_merge", "2 adapters --auto-merge / unmerged, decode step", b, steps[4] / steps[3], "x"));
    progress("merge and unmerge times");
    let (mut merge, mut unmerge) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        merge.push(engine.merge_adapter("x").expect("merge") * 1e3);
        unmerge.push(engine.unmerge_adapter() * 1e3);
    }
    rows.push(row("auto_merge", format!("{label}: merge (fold B·A into the weights), median of 5"), 1, median(merge), "ms"));
    rows.push(row("auto_merge", format!("{label}: unmerge (restore the kept weights), median of 5"), 1, median(unmerge), "ms"));
}

/// Trials of each prefix-cache case (medians reported).
const PREFIX_TRIALS: usize = 5;

/// Time to first token of one request alone under the server's scheduler defaults
/// (chunked prefill), in milliseconds.
fn ttft_ms(engine: &mut Engine, adapter: Option<&str>, prompt: Vec<u32>) -> f64 {
    let mut sched = Scheduler::new(SchedulerConfig::default(), engine).expect("default scheduler");
    let request = Request { lora: adapter.map(LoraRequest::new), prompt: Prompt::Tokens(prompt), params: SamplingParams::greedy(2) };
    let processed = engine.input().process(request).expect("benchmark request");
    let t = Instant::now();
    let ticket = sched.admission_gate().try_enter().expect("an empty queue");
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

/// Requests in the structured-output batch, and tokens each generates.
const STRUCTURED_BATCH: usize = 8;
const STRUCTURED_TOKENS: usize = 64;

/// Output tokens/s of one batch generated freely, as any JSON object (`json_object`), and
/// against a JSON schema (`json_schema`): what structured output's grammar costs per token
/// (a mask over the vocabulary every step). Same chat prompts, greedy, every request runs
/// its full `STRUCTURED_TOKENS` (`ignore_eos`; the prompt and schema ask for a list longer
/// than that, so the grammar is live to the end); rounds interleaved, medians kept. Also the
/// one-off build of the vocabulary tables and the per-request compile of the schema, both
/// paid on the HTTP thread, outside these tokens/s.
pub fn structured(cfg: &EngineBenchConfig, rows: &mut Vec<Row>, progress: &dyn Fn(&str)) {
    use loramux_engine::ResponseFormat;
    let mut engine = load(cfg, false, 1);
    let schema = serde_json::json!({
        "type": "object",
        "properties": {"people": {"type": "array", "minItems": 20, "items": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}, "city": {"type": "string"}},
            "required": ["name", "age", "city"],
            "additionalProperties": false
        }}},
        "required": ["people"],
        "additionalProperties": false
    });
    let formats = [("no constraint", ResponseFormat::Text), ("json_object", ResponseFormat::JsonObject), ("json_schema", ResponseFormat::JsonSchema(schema))];
    let request = |i: usize, format: &ResponseFormat| {
        let ask = format!("List 20 made-up people as JSON, starting with person number {i}: a name, age and city for each.");
        let params = SamplingParams { ignore_eos: true, response_format: format.clone(), ..SamplingParams::greedy(STRUCTURED_TOKENS) };
        Request { lora: None, prompt: Prompt::Chat(vec![loramux_engine::ChatMessage::user(ask)]), params }
    };
    progress("structured output: vocabulary tables and schema compile");
    let t = Instant::now();
    engine.input().process(request(0, &formats[1].1)).expect("json_object request");
    rows.push(row("structured", "vocabulary tables (built once per model, on first use)", 1, t.elapsed().as_secs_f64() * 1e3, "ms"));
    let compiles = 20;
    let t = Instant::now();
    for i in 0..compiles {
        engine.input().process(request(i, &formats[2].1)).expect("json_schema request");
    }
    rows.push(row("structured", "compile the JSON schema (per request, with its checks)", 1, t.elapsed().as_secs_f64() * 1e3 / compiles as f64, "ms"));
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); formats.len()];
    for round in 0..ROUNDS {
        for ((label, format), rate) in formats.iter().zip(&mut rates) {
            progress(&format!("structured output: {label}, round {}", round + 1));
            let processed: Vec<_> = (0..STRUCTURED_BATCH).map(|i| engine.input().process(request(i, format)).expect("benchmark request")).collect();
            let mut sched = batch_scheduler(&engine, STRUCTURED_BATCH, cfg.prompt_len);
            for (i, p) in processed.into_iter().enumerate() {
                let ticket = sched.admission_gate().try_enter().expect("room for the batch");
                sched.add_request(&mut engine, ticket, i as RequestId, p, None).expect("benchmark request");
            }
            let t = Instant::now();
            let mut tokens = 0;
            while sched.has_unfinished() {
                for out in sched.step(&mut engine).outputs {
                    if let RequestEvent::Finished { completion } = out.event {
                        tokens += completion.token_ids.len();
                    }
                }
            }
            rate.push(tokens as f64 / t.elapsed().as_secs_f64());
        }
    }
    let rates: Vec<f64> = rates.into_iter().map(median).collect();
    let b = STRUCTURED_BATCH;
    for ((label, _), rate) in formats.iter().zip(&rates) {
        rows.push(row("structured", format!("{label}: output tokens/s ({STRUCTURED_TOKENS} each, greedy, prefill included)"), b, *rate, "tok/s"));
    }
    rows.push(row("structured", "json_object / no constraint, tokens/s", b, rates[1] / rates[0], "x"));
    rows.push(row("structured", "json_schema / no constraint, tokens/s", b, rates[2] / rates[0], "x"));
}

/// Renders rows as a Markdown table.
pub fn markdown(rows: &[Row]) -> String {
    let mut s = String::from("| section | what | batch | value | unit |\n|---|---|---:|---:|---|\n");
    for r in rows {
        s += &format!("| {} | {} | {} | {:.3} | {} |\n", r.section, r.label, r.batch, r.value, r.unit);
    }
    s
}

/// Writes rows and metadata as JSON.
pub fn write_json(path: &Path, cfg: &EngineBenchConfig, rows: &[Row]) -> std::io::Result<()> {
    let meta = serde_json::json!({
        "timestamp": chrono::Local::now().to_rfc3339(),
        "model": cfg.model_label,
        "model_path": cfg.model.path(),
        "threads": rayon::current_num_threads(),
        "prompt_len": cfg.prompt_len,
        "decode_steps": cfg.decode_steps,
        "loramux_version": env!("CARGO_PKG_VERSION"),
    });
    crate::run::write_atomic(path, &serde_json::to_vec_pretty(&serde_json::json!({"metadata": meta, "results": rows}))?)
}
