//! `loramux bench engine`: the engine's own speed on one machine, measured in one run so
//! ratios compare like with like — memory-bandwidth roofline, decode and prefill
//! tokens/s by batch size, the cost of unmerged LoRA against merged and base by rank,
//! mixed batches over many distinct adapters, adapter load time and memory, and time to
//! first token with a cached prompt prefix.
//! Throughput is total time over steps; the LoRA comparisons are median step times over
//! interleaved rounds, so a slow spell of a shared machine does not fall on one side.
//!
//! The measurements every section shares (decode step times, prefill rate, the batch
//! scheduler, rows) are here; the sections are in `throughput.rs` (roofline, decode and
//! prefill by batch, serving mix), `lora.rs` (LoRA cost by rank, mixed batches,
//! `--auto-merge`), `adapters.rs` (adapter load, memory, GGUF against PEFT), `ttft.rs`
//! (prefix cache, pinning), `structured.rs` (structured output) and `sampler.rs` (sampling
//! controls: penalties, logit_bias, min_p).

mod adapters;
mod lora;
mod sampler;
mod structured;
mod throughput;
mod ttft;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use loramux_engine::{
    Engine, EngineOptions, LoraLimits, LoraRequest, ModelLocation, Prompt, Request, RequestId, SamplingParams, Scheduler,
    SchedulerConfig,
};
use serde::Serialize;

pub use adapters::adapter_load;
pub use lora::{auto_merge, lora_cost};
pub use sampler::sampler;
pub use structured::structured;
pub use throughput::{memory_bandwidth_gbs, serving_mix, throughput};
pub use ttft::{pinning, prefix_ttft};

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
        let ticket = sched.admission_gate().try_enter(loramux_engine::scheduler::Demand::of(&processed)).expect("room for the batch");
        sched.add_request(engine, ticket, i as RequestId, processed, None).expect("benchmark request");
    }
}

/// Times `steps` decode steps of `adapters.len()` sequences, each scheduler step alone.
pub fn decode_step_seconds(engine: &mut Engine, adapters: &[Option<String>], prompt_len: usize, steps: usize) -> StepTimes {
    let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(steps + 2) };
    decode_step_seconds_with(engine, adapters, prompt_len, steps, None, &params)
}

/// [`decode_step_seconds`] under `--auto-merge` after `auto_merge_after` (a merge falls in
/// the untimed first step when the hysteresis is zero), every request sampled with `params`
/// (which must generate at least `steps + 2` tokens).
fn decode_step_seconds_with(
    engine: &mut Engine,
    adapters: &[Option<String>],
    prompt_len: usize,
    steps: usize,
    auto_merge_after: Option<Duration>,
    params: &SamplingParams,
) -> StepTimes {
    let mut sched = batch_scheduler_with(engine, adapters.len(), prompt_len, auto_merge_after);
    add_requests(&mut sched, engine, adapters, prompt_len, 0, params);
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
