//! `loramux bench deployment`: the LoRA-versus-merged study. For every adapter (tasks ×
//! seeds) one server serves it unmerged and another serves it merged into the base (the
//! study's "fully fine-tuned" model); servers with 2 and 3 adapters of different tasks
//! serve them alternately. Each configuration records latency, throughput and peak memory;
//! the analysis pairs LoRA with merged per adapter (paired t-test, Cohen's d, confidence
//! intervals) and prices multi-adapter serving and each extra adapter's memory.
//!
//! Merging needs a float base, so every server here runs the model dequantized
//! (`--dequantize`): LoRA and merged are compared on the same float32 weights.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use safetensors::Dtype;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::client::{ChatRequest, MetricsSnapshot, Sample};
use crate::plot::{self, Bar};
use crate::run::{self, fmt_opt, BenchContext, Metadata, Report, TargetArgs};
use crate::stats::{self, PairedTTest};
use crate::synth::{write_adapter, AdapterSpec};
use crate::BenchError;

/// The study's result file name.
pub const RESULT_FILE: &str = "deployment_benchmark_results.json";

/// Settings of the deployment scenario.
#[derive(Args, Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct DeploymentSettings {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Adapters to study as TASK=PATH (repeat a task for its seeds). Without any, random
    /// adapters are made: --tasks × --seeds of --rank over all linear projections.
    #[arg(long = "adapter", value_name = "TASK=PATH")]
    pub adapters: Vec<String>,
    #[arg(long, default_value_t = 3)]
    pub tasks: usize,
    #[arg(long, default_value_t = 3)]
    pub seeds: usize,
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Measured requests per configuration.
    #[arg(long, default_value_t = 10)]
    pub samples: usize,
    /// Unmeasured requests first.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Clients at once (1: the study's one-request-at-a-time latency).
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Tokens generated per request (exactly: ignore_eos).
    #[arg(long, default_value_t = 16)]
    pub max_tokens: usize,
    #[arg(long, default_value = "Write one sentence about the sea.")]
    pub prompt: String,
}

/// One configuration's measurements (a row of the study's `results`).
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct DeploymentRow {
    /// `single_lora`, `full_ft` (merged), `multi_lora_2` or `multi_lora_3`.
    pub config_type: String,
    pub config_name: String,
    /// Task of a single adapter; tasks joined by `+` for multi-adapter rows.
    pub task: String,
    pub seed: Option<usize>,
    pub adapters: Vec<String>,
    pub num_samples: usize,
    pub errors: usize,
    pub mean_latency_ms: f64,
    pub std_latency_ms: f64,
    pub p50_latency_ms: f64,
    pub p95_latency_ms: f64,
    pub throughput_req_per_sec: f64,
    pub tokens_per_sec: f64,
    /// Peak resident memory of the server process (VmHWM).
    pub peak_memory_mb: Option<f64>,
    /// Resident memory after the measured requests (VmRSS): steadier than the peak, which
    /// includes transient buffers of model loading.
    pub rss_after_mb: Option<f64>,
    /// Device memory where there is a GPU; null on CPU.
    pub peak_gpu_memory_mb: Option<f64>,
    /// Bytes of resident adapters the server reported (`loramux_adapters_resident_bytes`).
    pub adapter_resident_bytes: Option<f64>,
    /// The raw per-request latencies.
    pub latencies_ms: Vec<f64>,
    pub samples: Vec<Sample>,
}

/// LoRA against merged over matched pairs.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct LoraVsMerged {
    pub pairs: usize,
    pub lora_mean_latency_ms: f64,
    pub merged_mean_latency_ms: f64,
    pub lora_ci95_ms: (f64, f64),
    pub merged_ci95_ms: (f64, f64),
    /// (LoRA − merged) / merged, percent.
    pub overhead_percent: f64,
    pub paired_t_test: Option<PairedTTest>,
    /// As the study computed it: mean difference over the root mean of population variances.
    pub cohens_d: Option<f64>,
    /// Paired effect size: mean difference over the differences' standard deviation.
    pub cohens_dz: Option<f64>,
    pub lora_throughput_req_per_sec: f64,
    pub merged_throughput_req_per_sec: f64,
}

/// The analysis the study's notebook does, computed here.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct DeploymentAnalysis {
    pub lora_vs_merged: LoraVsMerged,
    pub single_mean_latency_ms: f64,
    pub multi_2_mean_latency_ms: Option<f64>,
    pub multi_3_mean_latency_ms: Option<f64>,
    /// Multi-adapter latency over single-adapter latency, percent.
    pub multi_2_overhead_percent: Option<f64>,
    pub multi_3_overhead_percent: Option<f64>,
    /// (RSS of the 3-adapter server − RSS of the single-adapter server of its first adapter) / 2.
    pub memory_per_extra_adapter_mb: Option<f64>,
    /// Mean in-memory size of one adapter as the server reports it.
    pub adapter_weight_mb: Option<f64>,
    /// memory_per_extra_adapter_mb / adapter_weight_mb (1.0: an adapter costs its weights).
    pub memory_ratio: Option<f64>,
    pub conclusion: String,
}

/// Metadata plus the study's own fields.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct DeploymentMetadata {
    #[serde(flatten)]
    pub common: Metadata,
    pub num_samples: usize,
    pub warmup_samples: usize,
}

/// `deployment_benchmark_results.json`.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct DeploymentResult {
    pub metadata: DeploymentMetadata,
    pub settings: DeploymentSettings,
    pub results: Vec<DeploymentRow>,
    pub analysis: DeploymentAnalysis,
}

struct StudyAdapter {
    name: String,
    task: String,
    seed: usize,
    path: PathBuf,
}

fn study_adapters(ctx: &BenchContext, s: &DeploymentSettings) -> Result<Vec<StudyAdapter>, BenchError> {
    if !s.adapters.is_empty() {
        let mut out: Vec<StudyAdapter> = Vec::new();
        for spec in &s.adapters {
            let (task, path) = spec
                .split_once('=')
                .filter(|(t, p)| !t.is_empty() && !p.is_empty())
                .ok_or_else(|| BenchError::Invalid(format!("--adapter '{spec}': expected TASK=PATH")))?;
            let path = PathBuf::from(path);
            if !path.join("adapter_config.json").is_file() {
                return Err(BenchError::Invalid(format!("--adapter {task}: {} has no adapter_config.json", path.display())));
            }
            let seed = out.iter().filter(|a| a.task == task).count();
            out.push(StudyAdapter { name: format!("{task}-seed{seed}"), task: task.into(), seed, path });
        }
        return Ok(out);
    }
    if s.tasks == 0 || s.seeds == 0 {
        return Err(BenchError::Invalid("--tasks and --seeds must be at least 1".into()));
    }
    let shapes = ctx.module_shapes()?;
    let dir = ctx.scratch_dir("deployment");
    let mut out = Vec::new();
    for t in 0..s.tasks {
        for seed in 0..s.seeds {
            let name = format!("task{t}-seed{seed}");
            let path = dir.join(&name);
            let spec = AdapterSpec::all_linear(s.rank, Dtype::F16, (t * 1000 + seed) as u64);
            write_adapter(&path, &shapes, &spec).map_err(|e| BenchError::Io { path: path.clone(), source: e })?;
            out.push(StudyAdapter { name, task: format!("task{t}"), seed, path });
        }
    }
    Ok(out)
}

fn mb(bytes: Option<f64>) -> Option<f64> {
    bytes.map(|b| b / (1024.0 * 1024.0))
}

/// Starts a server with `extra` flags, sends warm-up then measured requests over `models`
/// in turn, and returns the row.
#[allow(clippy::too_many_arguments)]
async fn measure_config(
    ctx: &BenchContext,
    s: &DeploymentSettings,
    config_type: &str,
    config_name: &str,
    task: &str,
    seed: Option<usize>,
    adapters: Vec<String>,
    extra: Vec<String>,
    bar: &indicatif::ProgressBar,
) -> Result<DeploymentRow, BenchError> {
    let mut args = vec!["--dequantize".to_string()];
    args.extend(extra);
    let conn = run::connect(ctx, &s.target, &format!("deployment-{config_name}"), &args).await?;
    let models: Vec<String> = if adapters.is_empty() { vec![conn.base_model.clone()] } else { adapters.clone() };
    let wanted: Vec<&str> = models.iter().map(String::as_str).collect();
    conn.endpoint.require_models(&wanted).await?;
    let req = |i: usize| ChatRequest {
        model: models[i % models.len()].clone(),
        prompt: s.prompt.clone(),
        max_tokens: s.max_tokens,
        temperature: 0.0,
        ignore_eos: true,
    };
    let hidden = indicatif::ProgressBar::hidden();
    let warm: Vec<ChatRequest> = (0..s.warmup).map(req).collect();
    run::run_closed_loop(&conn.endpoint, &warm, s.concurrency, &hidden).await;
    bar.set_message(config_name.to_string());
    let measured: Vec<ChatRequest> = (0..s.samples).map(req).collect();
    let (samples, wall) = run::run_closed_loop(&conn.endpoint, &measured, s.concurrency, bar).await;
    let metrics = conn.endpoint.metrics().await;
    let latencies = run::ok_latencies(&samples);
    let summary = stats::summarize(&latencies)
        .ok_or_else(|| BenchError::Server(format!("{config_name}: no request succeeded: {:?}", samples.first().and_then(|s| s.error.clone()))))?;
    let tokens: u64 = samples.iter().filter(|s| s.ok).filter_map(|s| s.completion_tokens).sum();
    let row = DeploymentRow {
        config_type: config_type.into(),
        config_name: config_name.into(),
        task: task.into(),
        seed,
        adapters,
        num_samples: samples.len(),
        errors: samples.iter().filter(|s| !s.ok).count(),
        mean_latency_ms: summary.mean,
        std_latency_ms: summary.std_dev,
        p50_latency_ms: summary.p50,
        p95_latency_ms: summary.p95,
        throughput_req_per_sec: latencies.len() as f64 / wall,
        tokens_per_sec: tokens as f64 / wall,
        peak_memory_mb: mb(metrics.as_ref().and_then(MetricsSnapshot::peak_resident_bytes)),
        rss_after_mb: mb(metrics.as_ref().and_then(MetricsSnapshot::resident_bytes)),
        peak_gpu_memory_mb: None,
        adapter_resident_bytes: metrics.as_ref().and_then(|m| m.sum("loramux_adapters_resident_bytes")),
        latencies_ms: latencies,
        samples,
    };
    if let Some(l) = conn.launched {
        l.stop();
    }
    Ok(row)
}

/// Runs the whole study.
pub async fn measure(ctx: &BenchContext, s: &DeploymentSettings) -> Result<DeploymentResult, BenchError> {
    if s.target.url.is_some() {
        return Err(BenchError::Invalid(
            "deployment starts its own servers (each merged model is a separate deployment); --url is not supported".into(),
        ));
    }
    if s.samples < 2 {
        return Err(BenchError::Invalid("--samples must be at least 2".into()));
    }
    let adapters = study_adapters(ctx, s)?;
    let mut tasks: Vec<&str> = adapters.iter().map(|a| a.task.as_str()).collect();
    tasks.dedup();
    let firsts: Vec<&StudyAdapter> = tasks.iter().filter_map(|t| adapters.iter().find(|a| a.task == *t)).collect();
    let multi: Vec<usize> = [2, 3].into_iter().filter(|k| *k <= firsts.len()).collect();
    let bar = run::progress((2 * adapters.len() + multi.len()) * s.samples, "deployment");
    let mut results = Vec::new();
    for a in &adapters {
        let module = format!("{}={}", a.name, a.path.display());
        let lora = vec!["--lora-modules".to_string(), module];
        results.push(
            measure_config(ctx, s, "single_lora", &a.name, &a.task, Some(a.seed), vec![a.name.clone()], lora, &bar).await?,
        );
        let merge = vec!["--merge-lora".to_string(), a.path.display().to_string()];
        results.push(
            measure_config(ctx, s, "full_ft", &format!("{}-merged", a.name), &a.task, Some(a.seed), vec![], merge, &bar)
                .await?,
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for k in multi {
        let chosen = &firsts[..k];
        let mut flags = vec!["--lora-modules".to_string()];
        flags.extend(chosen.iter().map(|a| format!("{}={}", a.name, a.path.display())));
        let names: Vec<String> = chosen.iter().map(|a| a.name.clone()).collect();
        let task = chosen.iter().map(|a| a.task.as_str()).collect::<Vec<_>>().join("+");
        results.push(
            measure_config(ctx, s, &format!("multi_lora_{k}"), &format!("multi-{k}"), &task, None, names, flags, &bar)
                .await?,
        );
    }
    bar.finish_and_clear();
    std::fs::remove_dir_all(ctx.scratch_dir("deployment")).ok();
    let analysis = analyse(&results)?;
    let common = Metadata::new("deployment", ctx, &run::model_label(&s.target), "loramux (started by the benchmark, --dequantize)");
    Ok(DeploymentResult {
        metadata: DeploymentMetadata { common, num_samples: s.samples, warmup_samples: s.warmup },
        settings: s.clone(),
        results,
        analysis,
    })
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// The statistics of the study, from the rows alone (so `bench report` can redo them).
pub fn analyse(rows: &[DeploymentRow]) -> Result<DeploymentAnalysis, BenchError> {
    let sorted = |kind: &str| {
        let mut v: Vec<&DeploymentRow> = rows.iter().filter(|r| r.config_type == kind).collect();
        v.sort_by(|a, b| (&a.task, a.seed).cmp(&(&b.task, b.seed)));
        v
    };
    let (single, merged) = (sorted("single_lora"), sorted("full_ft"));
    if single.is_empty() || single.len() != merged.len() {
        return Err(BenchError::Invalid(format!(
            "need matched single_lora and full_ft rows (have {} and {})",
            single.len(),
            merged.len()
        )));
    }
    let lora_lat: Vec<f64> = single.iter().map(|r| r.mean_latency_ms).collect();
    let merged_lat: Vec<f64> = merged.iter().map(|r| r.mean_latency_ms).collect();
    let ci = |v: &[f64]| stats::mean_ci(v, 0.95).unwrap_or((mean(v), mean(v)));
    let (lora_mean, merged_mean) = (mean(&lora_lat), mean(&merged_lat));
    let lvm = LoraVsMerged {
        pairs: single.len(),
        lora_mean_latency_ms: lora_mean,
        merged_mean_latency_ms: merged_mean,
        lora_ci95_ms: ci(&lora_lat),
        merged_ci95_ms: ci(&merged_lat),
        overhead_percent: (lora_mean - merged_mean) / merged_mean * 100.0,
        paired_t_test: stats::paired_t_test(&lora_lat, &merged_lat).ok(),
        cohens_d: stats::cohens_d(&lora_lat, &merged_lat),
        cohens_dz: stats::cohens_dz(&lora_lat, &merged_lat),
        lora_throughput_req_per_sec: mean(&single.iter().map(|r| r.throughput_req_per_sec).collect::<Vec<_>>()),
        merged_throughput_req_per_sec: mean(&merged.iter().map(|r| r.throughput_req_per_sec).collect::<Vec<_>>()),
    };
    let multi = |k: usize| rows.iter().find(|r| r.config_type == format!("multi_lora_{k}"));
    let overhead = |k: usize| multi(k).map(|r| (r.mean_latency_ms - lora_mean) / lora_mean * 100.0);
    // Memory: the 3-adapter server against the single-adapter server of its first adapter.
    let per_extra = multi(3).and_then(|m3| {
        let first = rows.iter().find(|r| r.config_type == "single_lora" && Some(&r.config_name) == m3.adapters.first())?;
        Some((m3.rss_after_mb? - first.rss_after_mb?) / 2.0)
    });
    let weight_mb = {
        let v: Vec<f64> = single.iter().filter_map(|r| r.adapter_resident_bytes).map(|b| b / (1024.0 * 1024.0)).collect();
        (!v.is_empty()).then(|| mean(&v))
    };
    let ratio = per_extra.zip(weight_mb).map(|(p, w)| p / w);
    let significance = match &lvm.paired_t_test {
        Some(t) if t.p_value < 0.05 => format!("significant (paired t = {:.2}, p = {:.2e}, n = {})", t.t, t.p_value, t.n),
        Some(t) => format!("not significant (paired t = {:.2}, p = {:.3}, n = {})", t.t, t.p_value, t.n),
        None => "not testable (too few pairs or identical differences)".into(),
    };
    let conclusion = format!(
        "Unmerged LoRA latency is {:+.1}% against the same adapter merged ({:.1} vs {:.1} ms per request), {}; \
         serving 2 adapters from one base costs {} and 3 adapters {} against one adapter; each extra adapter adds {} MB \
         of resident memory against {} MB of weights.",
        lvm.overhead_percent,
        lora_mean,
        merged_mean,
        significance,
        overhead(2).map_or("n/a".into(), |v| format!("{v:+.1}%")),
        overhead(3).map_or("n/a".into(), |v| format!("{v:+.1}%")),
        fmt_opt(per_extra, 1),
        fmt_opt(weight_mb, 1),
    );
    Ok(DeploymentAnalysis {
        lora_vs_merged: lvm,
        single_mean_latency_ms: lora_mean,
        multi_2_mean_latency_ms: multi(2).map(|r| r.mean_latency_ms),
        multi_3_mean_latency_ms: multi(3).map(|r| r.mean_latency_ms),
        multi_2_overhead_percent: overhead(2),
        multi_3_overhead_percent: overhead(3),
        memory_per_extra_adapter_mb: per_extra,
        adapter_weight_mb: weight_mb,
        memory_ratio: ratio,
        conclusion,
    })
}

impl Report for DeploymentResult {
    fn markdown(&self) -> String {
        let m = &self.metadata.common;
        let a = &self.analysis;
        let l = &a.lora_vs_merged;
        let mut out = format!(
            "# Deployment: unmerged LoRA vs merged vs multi-adapter\n\n{} · {} · {} ({} cores) · model {} (float32) · \
             {} samples per configuration after {} warm-up, concurrency {}, {} tokens per request\n\n\
             | Config type | Config | Task | Mean latency (ms) | Std (ms) | p95 (ms) | Throughput (req/s) | Peak RSS (MB) | RSS after (MB) | Errors |\n\
             |---|---|---|---:|---:|---:|---:|---:|---:|---:|\n",
            m.timestamp, m.machine.hostname, m.machine.cpu_model, m.machine.logical_cores, m.base_model,
            self.metadata.num_samples, self.metadata.warmup_samples, self.settings.concurrency, self.settings.max_tokens,
        );
        for r in &self.results {
            out += &format!(
                "| {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.3} | {} | {} | {} |\n",
                r.config_type,
                r.config_name,
                r.task,
                r.mean_latency_ms,
                r.std_latency_ms,
                r.p95_latency_ms,
                r.throughput_req_per_sec,
                fmt_opt(r.peak_memory_mb, 0),
                fmt_opt(r.rss_after_mb, 0),
                r.errors
            );
        }
        let t = l.paired_t_test.as_ref();
        out += &format!(
            "\n## LoRA vs merged ({} pairs)\n\n- LoRA: {:.2} ms (95% CI {:.2}–{:.2}); merged: {:.2} ms (95% CI {:.2}–{:.2})\n\
             - Overhead: **{:+.2}%**\n- Paired t-test: t = {}, p = {}; Cohen's d (study formula) = {}, d_z = {}\n\
             - Throughput: LoRA {:.3} req/s, merged {:.3} req/s\n\n## Multi-adapter\n\n\
             - Single: {:.2} ms; 2 adapters: {} ms ({}%); 3 adapters: {} ms ({}%)\n\
             - Memory per extra adapter: {} MB; adapter weights: {} MB; ratio {}\n\n## Conclusion\n\n{}\n",
            l.pairs,
            l.lora_mean_latency_ms,
            l.lora_ci95_ms.0,
            l.lora_ci95_ms.1,
            l.merged_mean_latency_ms,
            l.merged_ci95_ms.0,
            l.merged_ci95_ms.1,
            l.overhead_percent,
            fmt_opt(t.map(|t| t.t), 3),
            t.map_or("n/a".into(), |t| format!("{:.3e}", t.p_value)),
            fmt_opt(l.cohens_d, 3),
            fmt_opt(l.cohens_dz, 3),
            l.lora_throughput_req_per_sec,
            l.merged_throughput_req_per_sec,
            a.single_mean_latency_ms,
            fmt_opt(a.multi_2_mean_latency_ms, 2),
            a.multi_2_overhead_percent.map_or("n/a".into(), |v| format!("{v:+.2}")),
            fmt_opt(a.multi_3_mean_latency_ms, 2),
            a.multi_3_overhead_percent.map_or("n/a".into(), |v| format!("{v:+.2}")),
            fmt_opt(a.memory_per_extra_adapter_mb, 2),
            fmt_opt(a.adapter_weight_mb, 2),
            fmt_opt(a.memory_ratio, 3),
            a.conclusion
        );
        out
    }

    fn plots(&self, dir: &Path, stem: &str) -> Result<Vec<PathBuf>, BenchError> {
        let lat = |kind: &str| -> Vec<f64> {
            self.results.iter().filter(|r| r.config_type == kind).map(|r| r.mean_latency_ms).collect()
        };
        let mut out = plot::box_plot(
            &dir.join(format!("{stem}_latency_box")),
            "Mean latency per adapter: LoRA vs merged",
            "mean latency (ms)",
            &[("LoRA adapter".to_string(), lat("single_lora")), ("Merged (full FT)".to_string(), lat("full_ft"))],
        )?;
        let a = &self.analysis;
        let mut bars = vec![Bar { label: "Single LoRA".into(), value: a.single_mean_latency_ms, error: None }];
        for (label, v) in [("Multi-adapter (2)", a.multi_2_mean_latency_ms), ("Multi-adapter (3)", a.multi_3_mean_latency_ms)] {
            if let Some(v) = v {
                bars.push(Bar { label: label.into(), value: v, error: None });
            }
        }
        bars.push(Bar { label: "Merged".into(), value: a.lora_vs_merged.merged_mean_latency_ms, error: None });
        out.extend(plot::bar_chart(&dir.join(format!("{stem}_configs")), "Latency by deployment", "mean latency (ms)", &bars)?);
        let mut overheads = vec![Bar { label: "LoRA vs merged".into(), value: a.lora_vs_merged.overhead_percent, error: None }];
        for (label, v) in [("Multi-2 vs single", a.multi_2_overhead_percent), ("Multi-3 vs single", a.multi_3_overhead_percent)] {
            if let Some(v) = v {
                overheads.push(Bar { label: label.into(), value: v, error: None });
            }
        }
        out.extend(plot::bar_chart(&dir.join(format!("{stem}_overhead")), "Latency overhead", "overhead (%)", &overheads)?);
        Ok(out)
    }
}
