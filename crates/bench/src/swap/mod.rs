//! `loramux bench swap`: what an adapter costs. Cold load from disk (the server's
//! `load_lora_adapter` round trip) and hot switch (first-token latency of a request right
//! after another adapter's, against one after the same adapter), memory added per adapter,
//! decode speed by rank, and throughput and memory as the adapters on disk grow from 1 to
//! 1000 under round-robin and Zipf popularity: how many adapters one base can serve.
//!
//! This file holds the settings, the result types and [`measure`]; `costs.rs` measures on
//! the first server (cold loads, hot switch, rank sweep), `count.rs` the adapter-count sweep,
//! and `report.rs` renders the Markdown and plots.

mod costs;
mod count;
mod report;

use std::path::Path;

use clap::Args;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::client::{ChatRequest, Sample};
use crate::run::{self, BenchContext, Metadata, TargetArgs};
use crate::stats::Summary;
use crate::BenchError;
use costs::costs_and_ranks;
use count::count_sweep;

const ADMIN_KEY: &str = "loramux-bench-admin";

/// Settings of the swap scenario.
#[derive(Args, Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct SwapSettings {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Cold loads to time (distinct adapters, rank --load-rank over all linear projections).
    #[arg(long, default_value_t = 20)]
    pub load_samples: usize,
    #[arg(long, default_value_t = 16)]
    pub load_rank: usize,
    /// Requests for the hot-switch measurement.
    #[arg(long, default_value_t = 40)]
    pub switch_samples: usize,
    /// Ranks of the decode-speed sweep (all linear projections).
    #[arg(long, value_delimiter = ',', default_value = "4,8,16,32,64")]
    pub ranks: Vec<usize>,
    /// Concurrent streams in the rank sweep.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub rank_concurrency: Vec<usize>,
    /// Tokens generated per request in the sweeps.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// Adapters on disk in the count sweep.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100,1000")]
    pub counts: Vec<usize>,
    /// Rank of the count sweep's adapters (PEFT's default targets, q_proj and v_proj, float16).
    #[arg(long, default_value_t = 8)]
    pub count_rank: usize,
    /// Requests per count-sweep phase.
    #[arg(long, default_value_t = 96)]
    pub count_requests: usize,
    #[arg(long, default_value_t = 8)]
    pub count_concurrency: usize,
    /// Resident adapters of the count-sweep servers (--max-loras).
    #[arg(long, default_value_t = 8)]
    pub max_loras: usize,
    /// Zipf exponent of the popularity phase.
    #[arg(long, default_value_t = 1.0)]
    pub zipf_alpha: f64,
}

/// Cold loads and hot switches.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct SwapCosts {
    /// `load_lora_adapter` round trips (read, validate, make resident), ms.
    pub cold_load_ms: Vec<f64>,
    pub cold_load: Option<Summary>,
    /// Server-side load time (`loramux_adapter_load_seconds`) mean, ms.
    pub server_load_mean_ms: Option<f64>,
    /// Resident memory of the server after each load, MB (first entry: before any).
    pub rss_after_loads_mb: Vec<f64>,
    /// Least-squares slope of RSS over adapters loaded, MB per adapter.
    pub memory_per_adapter_mb: Option<f64>,
    /// In-memory bytes of one adapter as the server reports it, MB.
    pub adapter_weight_mb: Option<f64>,
    /// File size of one adapter on disk, MB.
    pub adapter_file_mb: f64,
    /// First-token latency of requests whose predecessor used the other adapter.
    pub switch_ttft: Option<Summary>,
    /// First-token latency of requests whose predecessor used the same adapter.
    pub same_ttft: Option<Summary>,
    /// switch p50 − same p50, ms: what changing adapter between requests costs.
    pub hot_switch_cost_ms: Option<f64>,
    pub switch_samples: Vec<Sample>,
}

/// One point of the rank sweep.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct RankPoint {
    /// 0 is the base model without adapter.
    pub rank: usize,
    pub concurrency: usize,
    pub tokens_per_sec: f64,
    /// tokens_per_sec / the base's at the same concurrency.
    pub relative_to_base: f64,
    pub errors: usize,
    pub samples: Vec<Sample>,
}

/// One point of the adapter-count sweep.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct CountPoint {
    pub adapters_on_disk: usize,
    /// `single` (all on one adapter), `round_robin` or `zipf`.
    pub popularity: String,
    pub distinct_adapters_used: usize,
    pub requests: usize,
    pub errors: usize,
    pub throughput_req_per_sec: f64,
    pub tokens_per_sec: f64,
    /// Throughput over the `single` phase on the same server.
    pub relative_to_single: f64,
    pub adapter_loads: Option<f64>,
    pub adapter_evictions: Option<f64>,
    pub peak_memory_mb: Option<f64>,
    pub latency: Option<Summary>,
    pub samples: Vec<Sample>,
}

/// The swap scenario's result file.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct SwapResult {
    pub metadata: Metadata,
    pub settings: SwapSettings,
    pub costs: SwapCosts,
    pub rank_sweep: Vec<RankPoint>,
    pub count_sweep: Vec<CountPoint>,
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn slope(ys: &[f64]) -> Option<f64> {
    let n = ys.len() as f64;
    if ys.len() < 2 {
        return None;
    }
    let mx = (n - 1.0) / 2.0;
    let my = ys.iter().sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (i, y) in ys.iter().enumerate() {
        sxy += (i as f64 - mx) * (y - my);
        sxx += (i as f64 - mx).powi(2);
    }
    Some(sxy / sxx)
}

fn request(model: &str, max_tokens: usize) -> ChatRequest {
    ChatRequest {
        model: model.into(),
        prompt: "Write one sentence about the sea.".into(),
        max_tokens,
        temperature: 0.0,
        ignore_eos: true,
    }
}

fn written(path: &Path, e: std::io::Error) -> BenchError {
    BenchError::Io { path: path.to_path_buf(), source: e }
}

/// Runs the scenario.
pub async fn measure(ctx: &BenchContext, s: &SwapSettings) -> Result<SwapResult, BenchError> {
    if s.target.url.is_some() {
        return Err(BenchError::Invalid(
            "swap starts its own servers (it loads adapters it makes and restarts with 1 to 1000 adapters on disk); --url is not supported".into(),
        ));
    }
    if s.load_samples == 0 || s.counts.contains(&0) || s.ranks.contains(&0) || s.count_concurrency == 0 {
        return Err(BenchError::Invalid("--load-samples, --counts, --ranks and --count-concurrency must be at least 1".into()));
    }
    let steps = s.load_samples + 1 + (s.ranks.len() + 1) * s.rank_concurrency.len() + 3 * s.counts.len();
    let bar = run::progress(steps, "swap");
    let outcome = async {
        let (costs, rank_sweep, base_model) = costs_and_ranks(ctx, s, &bar).await?;
        let count_sweep = count_sweep(ctx, s, &bar).await?;
        Ok::<_, BenchError>((costs, rank_sweep, base_model, count_sweep))
    }
    .await;
    bar.finish_and_clear();
    std::fs::remove_dir_all(ctx.scratch_dir("swap")).ok();
    let (costs, rank_sweep, base_model, count_sweep) = outcome?;
    let metadata = Metadata::new("swap", ctx, &base_model, "loramux (started by the benchmark)");
    Ok(SwapResult { metadata, settings: s.clone(), costs, rank_sweep, count_sweep })
}

