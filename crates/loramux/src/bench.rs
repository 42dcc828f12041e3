//! `loramux bench`: scenarios that measure how to deploy adapters.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use loramux_bench::engine_bench::{self, EngineBenchConfig};
use loramux_engine::registry::DEFAULT_MODEL;

use crate::generate::locate_model;

/// Arguments of `loramux bench`.
#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Engine speed in-process: roofline, decode/prefill by batch, LoRA cost, adapter loads.
    Engine(EngineArgs),
}

#[derive(Args)]
struct EngineArgs {
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    /// Batch sizes for decode and prefill.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    batches: Vec<usize>,
    #[arg(long, default_value_t = 64)]
    prompt_len: usize,
    #[arg(long, default_value_t = 16)]
    decode_steps: usize,
    #[arg(long, value_delimiter = ',', default_value = "8,16,64")]
    lora_ranks: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    lora_batches: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,16")]
    adapter_counts: Vec<usize>,
    #[arg(long, default_value_t = 16)]
    mixed_batch: usize,
    #[arg(long, default_value_t = 30)]
    load_samples: usize,
    /// Sections to run: throughput, lora, load.
    #[arg(long, value_delimiter = ',', default_value = "throughput,lora,load")]
    sections: Vec<String>,
    /// Where to write the JSON result.
    #[arg(long, default_value = "results/engine_benchmark.json")]
    out: PathBuf,
}

pub fn run(args: BenchArgs) -> Result<()> {
    match args.scenario {
        Scenario::Engine(a) => run_engine(a),
    }
}

fn run_engine(a: EngineArgs) -> Result<()> {
    for s in &a.sections {
        anyhow::ensure!(["throughput", "lora", "load"].contains(&s.as_str()), "unknown section '{s}' (throughput, lora, load)");
    }
    let work = std::env::temp_dir().join(format!("loramux-bench-{}", std::process::id()));
    let cfg = EngineBenchConfig {
        model: locate_model(&a.model)?,
        model_label: a.model.clone(),
        batches: a.batches,
        prompt_len: a.prompt_len,
        decode_steps: a.decode_steps,
        lora_ranks: a.lora_ranks,
        lora_batches: a.lora_batches,
        adapter_counts: a.adapter_counts,
        mixed_batch: a.mixed_batch,
        load_samples: a.load_samples,
        work_dir: work.clone(),
    };
    let progress = |s: &str| eprintln!("  measuring: {s}");
    let mut rows = Vec::new();
    if a.sections.iter().any(|s| s == "throughput") {
        engine_bench::throughput(&cfg, &mut rows, &progress);
    }
    if a.sections.iter().any(|s| s == "lora") {
        engine_bench::lora_cost(&cfg, &mut rows, &progress);
    }
    if a.sections.iter().any(|s| s == "load") {
        engine_bench::adapter_load(&cfg, &mut rows, &progress);
    }
    std::fs::remove_dir_all(&work).ok();
    if let Some(dir) = a.out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    engine_bench::write_json(&a.out, &cfg, &rows)?;
    println!("{}", engine_bench::markdown(&rows));
    eprintln!("results written to {}", a.out.display());
    Ok(())
}
