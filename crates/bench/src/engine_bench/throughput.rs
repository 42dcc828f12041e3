//! Throughput sections: the memory-bandwidth roofline, decode and prefill tokens/s by batch
//! size, and the serving-mix replay.

use std::time::Instant;

use loramux_engine::lora::LoraModule;
use loramux_engine::{LoraRequest, Prompt, Request, RequestId, SamplingParams, Scheduler, SchedulerConfig};
use rayon::prelude::*;

use super::{decode_step_seconds, load, prefill_tokens_per_second, row, EngineBenchConfig, Row};

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
        let ticket = sched.admission_gate().try_enter(loramux_engine::scheduler::Demand::of(&processed)).expect("room");
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

