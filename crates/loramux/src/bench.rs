//! `loramux bench`: scenarios that measure how to deploy adapters.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use loramux_bench::deployment::{self, DeploymentSettings};
use loramux_bench::engine_bench::{self, EngineBenchConfig};
use loramux_bench::fairness::{self, FairnessSettings};
use loramux_bench::load::{self, LoadSettings};
use loramux_bench::quality::{self, QualitySettings};
use loramux_bench::route::{self, RouteSettings};
use loramux_bench::run::{self, BenchContext, TargetArgs};
use loramux_bench::swap::{self, SwapSettings};
use loramux_bench::switch::{self, SwitchSettings};
use loramux_bench::{report, schema};
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
    /// Alternating two adapters against staying on one: throughput, latency, switches.
    Switch(ScenarioArgs<SwitchSettings>),
    /// Unmerged LoRA vs the same adapter merged vs 2 and 3 adapters: latency statistics, memory.
    Deployment(ScenarioArgs<DeploymentSettings>),
    /// Adapter cold load and hot switch cost, rank sweep, 1 to 1000 adapters on disk.
    Swap(ScenarioArgs<SwapSettings>),
    /// Open-loop Poisson load over adapters: throughput, TTFT/ITL/E2E percentiles, goodput.
    Load(ScenarioArgs<LoadSettings>),
    /// Re-render the Markdown summary and plots of a saved result file.
    Report {
        /// A result JSON written by a scenario.
        file: PathBuf,
    },
    /// Overlay several load results' goodput and TPOT p99 by arrival rate (before/after a change, two machines).
    Compare {
        /// Load result JSONs, each as LABEL=FILE or FILE (labelled by its folder's name).
        #[arg(required = true, num_args = 1..)]
        files: Vec<String>,
        /// Path stem of the plots: <OUT>_goodput.{svg,png} and <OUT>_tpot.{svg,png}.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the JSON Schema of every scenario's result file.
    Schema,
    /// Engine speed in-process: roofline, decode/prefill by batch, LoRA cost, adapter loads.
    Engine(EngineArgs),
    /// Task adapters in-process: exact match and reference log-likelihood against decode speed,
    /// base vs unmerged vs merged, and by LoRA rank.
    Quality(ScenarioArgs<QualitySettings>),
    /// Semantic routing in-process: accuracy, confusion matrix, routing time and its share of
    /// TTFT, for the base-model router by layer and the sentence-embedding model side by side.
    Route(ScenarioArgs<RouteSettings>),
    /// Two tenants past saturation, heavy and light: served share, TTFT against alone, and
    /// the service difference over time, by scheduling policy (fcfs vs fair).
    Fairness(ScenarioArgs<FairnessSettings>),
}

/// A scenario's settings plus where to write.
#[derive(Args)]
struct ScenarioArgs<S: Args> {
    #[command(flatten)]
    settings: S,
    /// Folder for the JSON result, Markdown summary, plots and server logs [default: results/<scenario>].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
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
    #[arg(long, default_value_t = 32)]
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
    /// Requests in the serving-mix replay (section `mix`).
    #[arg(long, default_value_t = 256)]
    mix_requests: usize,
    /// Shared system prompt length in the prefix-cache section (section `prefix`).
    #[arg(long, default_value_t = 1000)]
    prefix_tokens: usize,
    /// Sections to run: throughput, lora, load, mix, prefix, automerge, pin, structured, sampler.
    #[arg(long, value_delimiter = ',', default_value = "throughput,lora,load,mix,prefix,automerge,pin,structured,sampler")]
    sections: Vec<String>,
    /// Where to write the JSON result.
    #[arg(long, default_value = "results/engine_benchmark.json")]
    out: PathBuf,
}

pub fn run(args: BenchArgs) -> Result<()> {
    match args.scenario {
        Scenario::Engine(a) => run_engine(a),
        Scenario::Quality(a) => run_quality(a),
        Scenario::Route(a) => run_route(a),
        Scenario::Fairness(a) => {
            let ctx = context(a.out, "fairness", Some(locate_model(&a.settings.model)?))?;
            let json = ctx.out_dir.join("fairness.json");
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
            let result = runtime.block_on(fairness::measure(&ctx, &a.settings))?;
            finish(&result, &json)
        }
        Scenario::Report { file } => {
            for p in report::rerender(&file)? {
                eprintln!("wrote {}", p.display());
            }
            Ok(())
        }
        Scenario::Compare { files, out } => {
            for p in report::compare_load(&files, &out)? {
                eprintln!("wrote {}", p.display());
            }
            Ok(())
        }
        Scenario::Schema => {
            println!("{}", serde_json::to_string_pretty(&schema::all())?);
            Ok(())
        }
        Scenario::Switch(a) => scenario(a.out, "switch", &a.settings.target.clone(), "switch.json", |ctx| async move {
            let conn = run::connect(&ctx, &a.settings.target, "switch", &[]).await?;
            let r = switch::measure(&ctx, &a.settings, &conn.endpoint, &conn.base_model, &conn.server).await?;
            Ok(Box::new(r) as Box<dyn Written>)
        }),
        Scenario::Deployment(a) => {
            scenario(a.out, "deployment", &a.settings.target.clone(), deployment::RESULT_FILE, |ctx| async move {
                Ok(Box::new(deployment::measure(&ctx, &a.settings).await?) as Box<dyn Written>)
            })
        }
        Scenario::Swap(a) => scenario(a.out, "swap", &a.settings.target.clone(), "swap.json", |ctx| async move {
            Ok(Box::new(swap::measure(&ctx, &a.settings).await?) as Box<dyn Written>)
        }),
        Scenario::Load(a) => scenario(a.out, "load", &a.settings.target.clone(), "load.json", |ctx| async move {
            Ok(Box::new(load::measure(&ctx, &a.settings).await?) as Box<dyn Written>)
        }),
    }
}

/// A scenario result that can write its files.
trait Written {
    fn write(&self, json: &std::path::Path) -> Result<Vec<PathBuf>, loramux_bench::BenchError>;
    fn markdown(&self) -> String;
}

impl<R: serde::Serialize + run::Report> Written for R {
    fn write(&self, json: &std::path::Path) -> Result<Vec<PathBuf>, loramux_bench::BenchError> {
        run::write_outputs(self, json)
    }
    fn markdown(&self) -> String {
        run::Report::markdown(self)
    }
}

/// Resolves the model (pulling it if a server will be started), runs `measure` on a fresh
/// async runtime, writes the outputs into `out` and prints the summary.
fn scenario<F, Fut>(out: Option<PathBuf>, name: &str, target: &TargetArgs, file: &str, measure: F) -> Result<()>
where
    F: FnOnce(BenchContext) -> Fut,
    Fut: std::future::Future<Output = Result<Box<dyn Written>, loramux_bench::BenchError>>,
{
    let model = match &target.url {
        Some(_) => None,
        None => Some(locate_model(target.model.as_deref().unwrap_or(DEFAULT_MODEL))?),
    };
    let ctx = context(out, name, model)?;
    let json = ctx.out_dir.join(file);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    let result = runtime.block_on(measure(ctx))?;
    finish(result.as_ref(), &json)
}

/// A run's context: the output folder (`out`, by default results/<name>), the model and the command line.
fn context(out: Option<PathBuf>, name: &str, model: Option<loramux_engine::ModelLocation>) -> Result<BenchContext> {
    let out_dir = out.unwrap_or_else(|| PathBuf::from("results").join(name));
    // Absolute, so adapter paths sent to servers mean the same to them.
    let out_dir = std::path::absolute(&out_dir).with_context(|| format!("resolving {}", out_dir.display()))?;
    Ok(BenchContext {
        exe: std::env::current_exe().context("locating the loramux binary")?,
        model,
        out_dir,
        command: std::env::args().collect(),
    })
}

/// Writes a result's JSON, Markdown and plots and prints its summary.
fn finish(result: &dyn Written, json: &std::path::Path) -> Result<()> {
    let written = result.write(json)?;
    println!("{}", result.markdown());
    for p in written {
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

/// `bench quality`: reads the inputs (failing before the model loads), then measures in-process.
fn run_quality(a: ScenarioArgs<QualitySettings>) -> Result<()> {
    let inputs = quality::inputs(&a.settings)?;
    let ctx = context(a.out, "quality", Some(locate_model(&a.settings.model)?))?;
    let progress = |s: &str| eprintln!("  measuring: {s}");
    let result = quality::measure(&ctx, &a.settings, inputs, &progress)?;
    finish(&result, &ctx.out_dir.join(quality::RESULT_FILE))
}

/// `bench route`: reads the labelled set (failing before the model loads), then measures in-process.
fn run_route(a: ScenarioArgs<RouteSettings>) -> Result<()> {
    let tasks = route::inputs(&a.settings)?;
    let ctx = context(a.out, "route", Some(locate_model(&a.settings.model)?))?;
    let progress = |s: &str| eprintln!("  measuring: {s}");
    let result = route::measure(&ctx, &a.settings, tasks, &progress)?;
    finish(&result, &ctx.out_dir.join(route::RESULT_FILE))
}

fn run_engine(a: EngineArgs) -> Result<()> {
    for s in &a.sections {
        anyhow::ensure!(
            ["throughput", "lora", "load", "mix", "prefix", "automerge", "pin", "structured", "sampler"].contains(&s.as_str()),
            "unknown section '{s}' (throughput, lora, load, mix, prefix, automerge, pin, structured, sampler)"
        );
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
        mix_requests: a.mix_requests,
        prefix_tokens: a.prefix_tokens,
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
    if a.sections.iter().any(|s| s == "mix") {
        engine_bench::serving_mix(&cfg, &mut rows, &progress);
    }
    if a.sections.iter().any(|s| s == "prefix") {
        engine_bench::prefix_ttft(&cfg, &mut rows, &progress);
    }
    if a.sections.iter().any(|s| s == "automerge") {
        engine_bench::auto_merge(&cfg, &mut rows, &progress);
    }
    if a.sections.iter().any(|s| s == "pin") {
        engine_bench::pinning(&cfg, &mut rows, &progress);
    }
    if a.sections.iter().any(|s| s == "sampler") {
        engine_bench::sampler(&cfg, &mut rows, &progress);
    }
    if a.sections.iter().any(|s| s == "structured") {
        engine_bench::structured(&cfg, &mut rows, &progress);
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
