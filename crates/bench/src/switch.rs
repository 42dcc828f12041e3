//! `loramux bench switch`: the adapter-switching experiment. Warm up A→B→A, then runs of N
//! requests all on adapter A and runs alternating A/B, interleaved (single, alternating,
//! single, …) so drift hits both alike. Reports throughput, latency percentiles, the
//! switches the server reported, the throughput drop and the slowdown factor.

use std::path::{Path, PathBuf};

use clap::Args;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::client::{ChatRequest, Endpoint, MetricsSnapshot, Sample};
use crate::plot::{self, Bar};
use crate::run::{self, fmt_opt, BenchContext, Metadata, Report, TargetArgs};
use crate::stats::{self, Summary};
use crate::BenchError;

/// Settings of the switch scenario.
#[derive(Args, Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct SwitchSettings {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Adapter A (the one "single" runs use).
    #[arg(long, default_value = "pirate")]
    pub adapter_a: String,
    /// Adapter B (alternated with A).
    #[arg(long, default_value = "cowboy")]
    pub adapter_b: String,
    /// Requests per run.
    #[arg(long, default_value_t = 20)]
    pub requests: usize,
    /// Runs of each kind (single, alternating).
    #[arg(long, default_value_t = 2)]
    pub runs: usize,
    /// Clients sending at once (closed loop); 1 is the original sequential experiment.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    #[arg(long, default_value = "Reply with exactly: ok")]
    pub prompt: String,
    #[arg(long, default_value_t = 8)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Generate exactly --max-tokens tokens (vLLM's `ignore_eos`): adapters that answer at
    /// different lengths then cost the same work, so throughputs compare switching alone.
    #[arg(long)]
    #[serde(default)]
    pub ignore_eos: bool,
}

/// One measured run.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct SwitchRun {
    /// e.g. `single_run_1`, `alternating_run_2`.
    pub name: String,
    /// `single` or `alternating`.
    pub kind: String,
    pub requests: usize,
    pub errors: usize,
    pub wall_s: f64,
    pub throughput_req_per_sec: f64,
    pub latency: Option<Summary>,
    /// Time to first token of the requests that succeeded.
    pub ttft: Option<Summary>,
    /// Adapter switches the server reported during the run (`*_switches_total`), if it exports them.
    pub server_switches: Option<f64>,
    /// Adapter loads the server reported during the run (`loramux_adapter_loads_total`).
    pub adapter_loads: Option<f64>,
    pub samples: Vec<Sample>,
}

/// Aggregates over runs.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct SwitchSummary {
    pub single_throughput_req_per_sec: f64,
    pub alternating_throughput_req_per_sec: f64,
    /// alternating / single: 1.0 means switching costs nothing.
    pub alternating_over_single: f64,
    /// (1 - alternating/single) in percent.
    pub throughput_drop_percent: f64,
    /// single / alternating.
    pub slowdown_factor: f64,
    pub single_latency: Option<Summary>,
    pub alternating_latency: Option<Summary>,
    /// Time to first token over all single (alternating) runs.
    pub single_ttft: Option<Summary>,
    pub alternating_ttft: Option<Summary>,
    pub errors: usize,
}

/// The switch scenario's result file.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct SwitchResult {
    pub metadata: Metadata,
    pub settings: SwitchSettings,
    pub warmup: Vec<Sample>,
    pub runs: Vec<SwitchRun>,
    pub summary: SwitchSummary,
}

fn switch_counters(m: &Option<MetricsSnapshot>) -> (Option<f64>, Option<f64>) {
    let Some(m) = m else { return (None, None) };
    let switches = ["llmux_switches_total", "loramux_adapter_switches_total"].iter().find_map(|n| m.sum(n));
    (switches, m.sum("loramux_adapter_loads_total"))
}

fn delta(after: Option<f64>, before: Option<f64>) -> Option<f64> {
    Some(after? - before.unwrap_or(0.0))
}

/// Runs the scenario; `endpoint` is the server under test.
pub async fn measure(
    ctx: &BenchContext,
    settings: &SwitchSettings,
    endpoint: &Endpoint,
    base_model: &str,
    server: &str,
) -> Result<SwitchResult, BenchError> {
    if settings.requests == 0 || settings.runs == 0 || settings.concurrency == 0 {
        return Err(BenchError::Invalid("--requests, --runs and --concurrency must be at least 1".into()));
    }
    let (a, b) = (settings.adapter_a.as_str(), settings.adapter_b.as_str());
    endpoint.require_models(&[a, b]).await?;
    let metadata = Metadata::new("switch", ctx, base_model, server);
    let req = |model: &str| ChatRequest {
        model: model.to_string(),
        prompt: settings.prompt.clone(),
        max_tokens: settings.max_tokens,
        temperature: settings.temperature,
        ignore_eos: settings.ignore_eos,
    };
    let bar = run::progress(3 + 2 * settings.runs * settings.requests, "switch");
    let (warmup, _) = run::run_closed_loop(endpoint, &[req(a), req(b), req(a)], 1, &bar).await;
    let mut runs = Vec::new();
    for i in 1..=settings.runs {
        for kind in ["single", "alternating"] {
            let requests: Vec<ChatRequest> = (0..settings.requests)
                .map(|j| req(if kind == "alternating" && j % 2 == 1 { b } else { a }))
                .collect();
            bar.set_message(format!("{kind} run {i}"));
            let before = switch_counters(&endpoint.metrics().await);
            let (samples, wall_s) = run::run_closed_loop(endpoint, &requests, settings.concurrency, &bar).await;
            let after = switch_counters(&endpoint.metrics().await);
            let ok = samples.iter().filter(|s| s.ok).count();
            runs.push(SwitchRun {
                name: format!("{kind}_run_{i}"),
                kind: kind.into(),
                requests: samples.len(),
                errors: samples.len() - ok,
                wall_s,
                throughput_req_per_sec: ok as f64 / wall_s,
                latency: stats::summarize(&run::ok_latencies(&samples)),
                ttft: stats::summarize(&ok_ttfts(&samples)),
                server_switches: delta(after.0, before.0),
                adapter_loads: delta(after.1, before.1),
                samples,
            });
        }
    }
    bar.finish_and_clear();
    let summary = summarize_runs(&runs)?;
    Ok(SwitchResult { metadata, settings: settings.clone(), warmup, runs, summary })
}

fn ok_ttfts(samples: &[Sample]) -> Vec<f64> {
    samples.iter().filter(|s| s.ok).filter_map(|s| s.ttft_ms).collect()
}

fn summarize_runs(runs: &[SwitchRun]) -> Result<SwitchSummary, BenchError> {
    fn of<'a>(runs: &'a [SwitchRun], kind: &'a str) -> impl Iterator<Item = &'a SwitchRun> {
        runs.iter().filter(move |r| r.kind == kind)
    }
    let mean_tp = |kind: &str| {
        let v: Vec<f64> = of(runs, kind).map(|r| r.throughput_req_per_sec).collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let lat = |kind: &str| {
        let all: Vec<f64> = of(runs, kind).flat_map(|r| run::ok_latencies(&r.samples)).collect();
        stats::summarize(&all)
    };
    let ttft = |kind: &str| {
        let all: Vec<f64> = of(runs, kind).flat_map(|r| ok_ttfts(&r.samples)).collect();
        stats::summarize(&all)
    };
    let (single, alternating) = (mean_tp("single"), mean_tp("alternating"));
    if single <= 0.0 || alternating <= 0.0 {
        return Err(BenchError::Server(format!(
            "no request succeeded in some runs (errors: {}); see the samples' errors",
            runs.iter().map(|r| r.errors).sum::<usize>()
        )));
    }
    Ok(SwitchSummary {
        single_throughput_req_per_sec: single,
        alternating_throughput_req_per_sec: alternating,
        alternating_over_single: alternating / single,
        throughput_drop_percent: (1.0 - alternating / single) * 100.0,
        slowdown_factor: single / alternating,
        single_latency: lat("single"),
        alternating_latency: lat("alternating"),
        single_ttft: ttft("single"),
        alternating_ttft: ttft("alternating"),
        errors: runs.iter().map(|r| r.errors).sum(),
    })
}

impl Report for SwitchResult {
    fn markdown(&self) -> String {
        let s = &self.summary;
        let m = &self.metadata;
        let mut out = format!(
            "# Adapter switching: `{}` vs `{}` alternating\n\n{} · {} · {} ({} cores) · model {} · server {}\n\n\
             {} requests per run, concurrency {}, max_tokens {}{}, temperature {}, prompt {:?}. Runs interleaved single/alternating after an A→B→A warm-up.\n\n\
             | Run | Requests | Errors | Throughput (req/s) | p50 latency (ms) | p95 latency (ms) | p50 TTFT (ms) | p95 TTFT (ms) | Switches | Adapter loads |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            self.settings.adapter_a, self.settings.adapter_b, m.timestamp, m.machine.hostname, m.machine.cpu_model,
            m.machine.logical_cores, m.base_model, m.server, self.settings.requests, self.settings.concurrency,
            self.settings.max_tokens, if self.settings.ignore_eos { " (exactly: ignore_eos)" } else { "" },
            self.settings.temperature, self.settings.prompt,
        );
        for r in &self.runs {
            out += &format!(
                "| `{}` | {} | {} | {:.4} | {} | {} | {} | {} | {} | {} |\n",
                r.name,
                r.requests,
                r.errors,
                r.throughput_req_per_sec,
                fmt_opt(r.latency.as_ref().map(|l| l.p50), 2),
                fmt_opt(r.latency.as_ref().map(|l| l.p95), 2),
                fmt_opt(r.ttft.as_ref().map(|l| l.p50), 2),
                fmt_opt(r.ttft.as_ref().map(|l| l.p95), 2),
                fmt_opt(r.server_switches, 0),
                fmt_opt(r.adapter_loads, 0),
            );
        }
        out += &format!(
            "\n- Single-adapter throughput: **{:.4} req/s**\n- Alternating throughput: **{:.4} req/s**\n\
             - Alternating / single: **{:.3}** (throughput drop {:.2}%, slowdown factor {:.3}x)\n\
             - Time to first token p95: single {} ms, alternating {} ms\n- Errors: {}\n\n\
             \"Switches\" is the server's own `*_switches_total` counter where it exports one; loramux mixes adapters \
             in one batch and never switches, so it reports adapter loads (`loramux_adapter_loads_total`) instead: \
             the only time changing adapter costs anything.\n",
            s.single_throughput_req_per_sec,
            s.alternating_throughput_req_per_sec,
            s.alternating_over_single,
            s.throughput_drop_percent,
            s.slowdown_factor,
            fmt_opt(s.single_ttft.as_ref().map(|t| t.p95), 1),
            fmt_opt(s.alternating_ttft.as_ref().map(|t| t.p95), 1),
            s.errors
        );
        out
    }

    fn plots(&self, dir: &Path, stem: &str) -> Result<Vec<PathBuf>, BenchError> {
        let bars: Vec<Bar> = self
            .runs
            .iter()
            .map(|r| Bar { label: r.name.clone(), value: r.throughput_req_per_sec, error: None })
            .collect();
        let mut out = plot::bar_chart(&dir.join(format!("{stem}_throughput")), "Throughput by run", "requests/s", &bars)?;
        let groups: Vec<(String, Vec<f64>)> = ["single", "alternating"]
            .iter()
            .map(|k| {
                let v = self.runs.iter().filter(|r| r.kind == *k).flat_map(|r| run::ok_latencies(&r.samples)).collect();
                (k.to_string(), v)
            })
            .filter(|(_, v): &(String, Vec<f64>)| !v.is_empty())
            .collect();
        if !groups.is_empty() {
            out.extend(plot::box_plot(&dir.join(format!("{stem}_latency")), "Request latency", "latency (ms)", &groups)?);
        }
        Ok(out)
    }
}
