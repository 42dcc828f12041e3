//! Adapter section: load time from disk, memory per adapter, and GGUF files against PEFT
//! directories.

use std::path::PathBuf;
use std::time::Instant;

use loramux_engine::{LoraRequest, Prompt, Request, SamplingParams};
use safetensors::Dtype;

use super::{load, median, prompt_ids, row, EngineBenchConfig, Row};
use crate::synth::{write_gguf_adapter, write_random_adapter, AdapterSpec};

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

