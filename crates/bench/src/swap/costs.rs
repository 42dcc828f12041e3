//! The first server of the swap scenario: cold loads, the hot switch and the rank sweep,
//! all on one server started with adapter updates enabled.

use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use loramux_engine::lora::ModuleShapes;
use safetensors::Dtype;

use super::{mb, request, slope, written, RankPoint, SwapCosts, SwapSettings, ADMIN_KEY};
use crate::client::{ChatRequest, Endpoint, MetricsSnapshot};
use crate::run::{self, BenchContext};
use crate::stats;
use crate::synth::{write_adapter, AdapterSpec};
use crate::BenchError;

/// Starts the server and measures, in order, cold loads, the hot switch and the rank sweep;
/// returns them with the server's base model name.
pub(super) async fn costs_and_ranks(
    ctx: &BenchContext,
    s: &SwapSettings,
    bar: &ProgressBar,
) -> Result<(SwapCosts, Vec<RankPoint>, String), BenchError> {
    let shapes = ctx.module_shapes()?;
    let dir = ctx.scratch_dir("swap");
    let flags: Vec<String> = [
        "--enable-lora-updates",
        "--admin-api-key",
        ADMIN_KEY,
        "--allowed-lora-root",
        &dir.display().to_string(),
        "--max-loras",
        &(s.load_samples + s.ranks.len() + 2).to_string(),
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    let mut load_paths = Vec::new();
    for i in 0..s.load_samples.max(2) {
        let p = dir.join(format!("cold{i}"));
        write_adapter(&p, &shapes, &AdapterSpec::all_linear(s.load_rank, Dtype::F16, i as u64)).map_err(|e| written(&p, e))?;
        load_paths.push(p);
    }
    let conn = run::connect(ctx, &s.target, "swap", &flags).await?;
    let ep = &conn.endpoint;
    let costs = cold_loads(ep, s, &load_paths, bar).await?;
    let costs = hot_switch(ep, s, &load_paths, bar, costs).await?;
    let rank_sweep = rank_sweep(ep, s, &shapes, &dir, &conn.base_model, bar).await?;
    let base_model = conn.base_model.clone();
    if let Some(l) = conn.launched {
        l.stop();
    }
    Ok((costs, rank_sweep, base_model))
}

/// Cold loads of the first `s.load_samples` adapters of `load_paths`, with resident memory
/// after each, then unloads them. The hot-switch fields are left empty for [`hot_switch`].
async fn cold_loads(ep: &Endpoint, s: &SwapSettings, load_paths: &[PathBuf], bar: &ProgressBar) -> Result<SwapCosts, BenchError> {
    let rss = |m: &Option<MetricsSnapshot>| m.as_ref().and_then(MetricsSnapshot::resident_bytes).map(|b| b / 1048576.0);
    bar.set_message("cold loads");
    let before = ep.metrics().await;
    let mut cold_load_ms = Vec::new();
    let mut rss_after = rss(&before).into_iter().collect::<Vec<_>>();
    for (i, p) in load_paths.iter().enumerate().take(s.load_samples) {
        cold_load_ms.push(ep.load_adapter(&format!("cold{i}"), &p.display().to_string(), Some(ADMIN_KEY)).await? * 1e3);
        rss_after.extend(rss(&ep.metrics().await));
        bar.inc(1);
    }
    let after = ep.metrics().await;
    let server_load_mean_ms = (|| {
        let (b, a) = (before.as_ref()?, after.as_ref()?);
        let secs = a.sum("loramux_adapter_load_seconds_sum")? - b.sum("loramux_adapter_load_seconds_sum").unwrap_or(0.0);
        let n = a.sum("loramux_adapter_load_seconds_count")? - b.sum("loramux_adapter_load_seconds_count").unwrap_or(0.0);
        (n > 0.0).then(|| secs / n * 1e3)
    })();
    let adapter_weight_mb = after.as_ref().and_then(|m| m.get("loramux_adapter_resident_bytes", "adapter", "cold0")).map(|b| b / 1048576.0);
    let adapter_file_mb = std::fs::metadata(load_paths[0].join("adapter_model.safetensors")).map(|m| mb(m.len())).unwrap_or(0.0);
    for i in 0..s.load_samples {
        ep.unload_adapter(&format!("cold{i}"), Some(ADMIN_KEY)).await?;
    }
    Ok(SwapCosts {
        cold_load: stats::summarize(&cold_load_ms),
        cold_load_ms,
        server_load_mean_ms,
        memory_per_adapter_mb: slope(&rss_after),
        rss_after_loads_mb: rss_after,
        adapter_weight_mb,
        adapter_file_mb,
        switch_ttft: None,
        same_ttft: None,
        hot_switch_cost_ms: None,
        switch_samples: Vec::new(),
    })
}

/// Hot switch: A A B B A A ... with one-token requests, both adapters (the first two of
/// `load_paths`) resident; fills the hot-switch fields of `costs`.
async fn hot_switch(
    ep: &Endpoint,
    s: &SwapSettings,
    load_paths: &[PathBuf],
    bar: &ProgressBar,
    costs: SwapCosts,
) -> Result<SwapCosts, BenchError> {
    bar.set_message("hot switch");
    for (name, p) in [("hot-a", &load_paths[0]), ("hot-b", &load_paths[1])] {
        ep.load_adapter(name, &p.display().to_string(), Some(ADMIN_KEY)).await?;
    }
    let reqs: Vec<ChatRequest> =
        (0..s.switch_samples + 1).map(|i| request(if (i / 2) % 2 == 0 { "hot-a" } else { "hot-b" }, 1)).collect();
    let hidden = ProgressBar::hidden();
    let (switch_samples, _) = run::run_closed_loop(ep, &reqs, 1, &hidden).await;
    let (mut switched, mut same) = (Vec::new(), Vec::new());
    for w in switch_samples.windows(2) {
        if let (true, Some(t)) = (w[1].ok, w[1].ttft_ms) {
            if w[0].model == w[1].model { same.push(t) } else { switched.push(t) }
        }
    }
    let (switch_ttft, same_ttft) = (stats::summarize(&switched), stats::summarize(&same));
    let hot_switch_cost_ms = switch_ttft.as_ref().zip(same_ttft.as_ref()).map(|(a, b)| a.p50 - b.p50);
    bar.inc(1);
    Ok(SwapCosts { switch_ttft, same_ttft, hot_switch_cost_ms, switch_samples, ..costs })
}

/// Decode speed of the base (rank 0) and of one all-linear adapter per rank of `s.ranks`,
/// at each concurrency of `s.rank_concurrency`.
async fn rank_sweep(
    ep: &Endpoint,
    s: &SwapSettings,
    shapes: &ModuleShapes,
    dir: &Path,
    base_model: &str,
    bar: &ProgressBar,
) -> Result<Vec<RankPoint>, BenchError> {
    let hidden = ProgressBar::hidden();
    let mut rank_sweep: Vec<RankPoint> = Vec::new();
    for &rank in std::iter::once(&0).chain(&s.ranks) {
        let model = if rank == 0 {
            base_model.to_string()
        } else {
            let p = dir.join(format!("rank{rank}"));
            write_adapter(&p, shapes, &AdapterSpec::all_linear(rank, Dtype::F16, 7)).map_err(|e| written(&p, e))?;
            let name = format!("rank{rank}");
            ep.load_adapter(&name, &p.display().to_string(), Some(ADMIN_KEY)).await?;
            name
        };
        for &c in &s.rank_concurrency {
            bar.set_message(format!("rank {rank} x{c}"));
            let reqs: Vec<ChatRequest> = (0..c * 2).map(|_| request(&model, s.max_tokens)).collect();
            run::run_closed_loop(ep, &reqs[..c], c, &hidden).await; // warm-up
            let (samples, wall) = run::run_closed_loop(ep, &reqs, c, &hidden).await;
            let tokens: u64 = samples.iter().filter(|x| x.ok).filter_map(|x| x.completion_tokens).sum();
            let tps = tokens as f64 / wall;
            let base = rank_sweep.iter().find(|p| p.rank == 0 && p.concurrency == c).map_or(tps, |p| p.tokens_per_sec);
            rank_sweep.push(RankPoint {
                rank,
                concurrency: c,
                tokens_per_sec: tps,
                relative_to_base: tps / base,
                errors: samples.iter().filter(|x| !x.ok).count(),
                samples,
            });
            bar.inc(1);
        }
    }
    Ok(rank_sweep)
}
