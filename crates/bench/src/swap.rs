//! `loramux bench swap`: what an adapter costs. Cold load from disk (the server's
//! `load_lora_adapter` round trip) and hot switch (first-token latency of a request right
//! after another adapter's, against one after the same adapter), memory added per adapter,
//! decode speed by rank, and throughput and memory as the adapters on disk grow from 1 to
//! 1000 under round-robin and Zipf popularity: how many adapters one base can serve.

use std::path::{Path, PathBuf};

use clap::Args;
use safetensors::Dtype;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::client::{ChatRequest, MetricsSnapshot, Sample};
use crate::plot::{self, Series};
use crate::run::{self, fmt_opt, BenchContext, Metadata, Report, TargetArgs};
use crate::stats::{self, Summary};
use crate::synth::{write_adapter, AdapterSpec};
use crate::BenchError;

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

async fn costs_and_ranks(
    ctx: &BenchContext,
    s: &SwapSettings,
    bar: &indicatif::ProgressBar,
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
    let rss = |m: &Option<MetricsSnapshot>| m.as_ref().and_then(MetricsSnapshot::resident_bytes).map(|b| b / 1048576.0);

    // Cold loads, with resident memory after each.
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

    // Hot switch: A A B B A A ... with one-token requests; both adapters resident.
    bar.set_message("hot switch");
    for (name, p) in [("hot-a", &load_paths[0]), ("hot-b", &load_paths[1])] {
        ep.load_adapter(name, &p.display().to_string(), Some(ADMIN_KEY)).await?;
    }
    let reqs: Vec<ChatRequest> =
        (0..s.switch_samples + 1).map(|i| request(if (i / 2) % 2 == 0 { "hot-a" } else { "hot-b" }, 1)).collect();
    let hidden = indicatif::ProgressBar::hidden();
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

    // Rank sweep.
    let mut rank_sweep: Vec<RankPoint> = Vec::new();
    for &rank in std::iter::once(&0).chain(&s.ranks) {
        let model = if rank == 0 {
            conn.base_model.clone()
        } else {
            let p = dir.join(format!("rank{rank}"));
            write_adapter(&p, &shapes, &AdapterSpec::all_linear(rank, Dtype::F16, 7)).map_err(|e| written(&p, e))?;
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
    let base_model = conn.base_model.clone();
    if let Some(l) = conn.launched {
        l.stop();
    }
    let costs = SwapCosts {
        cold_load: stats::summarize(&cold_load_ms),
        cold_load_ms,
        server_load_mean_ms,
        memory_per_adapter_mb: slope(&rss_after),
        rss_after_loads_mb: rss_after,
        adapter_weight_mb,
        adapter_file_mb,
        switch_ttft,
        same_ttft,
        hot_switch_cost_ms,
        switch_samples,
    };
    Ok((costs, rank_sweep, base_model))
}

async fn count_sweep(ctx: &BenchContext, s: &SwapSettings, bar: &indicatif::ProgressBar) -> Result<Vec<CountPoint>, BenchError> {
    let shapes = ctx.module_shapes()?;
    let pool = ctx.scratch_dir("swap").join("pool");
    let largest = s.counts.iter().copied().max().unwrap_or(0);
    bar.set_message(format!("writing {largest} adapters"));
    for i in 0..largest {
        let p = pool.join(format!("a{i:04}"));
        if !p.join("adapter_model.safetensors").is_file() {
            write_adapter(&p, &shapes, &AdapterSpec::peft_default(s.count_rank, Dtype::F16, 10_000 + i as u64))
                .map_err(|e| written(&p, e))?;
        }
    }
    let mut points = Vec::new();
    for &count in &s.counts {
        // Each count gets its own --lora-dir of hard links into the pool (no copies).
        let dir = ctx.scratch_dir("swap").join(format!("dir{count}"));
        for i in 0..count {
            let (src, dst) = (pool.join(format!("a{i:04}")), dir.join(format!("a{i:04}")));
            std::fs::create_dir_all(&dst).map_err(|e| written(&dst, e))?;
            for f in ["adapter_config.json", "adapter_model.safetensors"] {
                if !dst.join(f).exists() {
                    std::fs::hard_link(src.join(f), dst.join(f))
                        .or_else(|_| std::fs::copy(src.join(f), dst.join(f)).map(|_| ()))
                        .map_err(|e| written(&dst, e))?;
                }
            }
        }
        let flags = vec![
            "--lora-dir".to_string(),
            dir.display().to_string(),
            "--max-loras".into(),
            s.max_loras.to_string(),
        ];
        let conn = run::connect(ctx, &s.target, &format!("swap-count{count}"), &flags).await?;
        let names: Vec<String> = (0..count).map(|i| format!("a{i:04}")).collect();
        let hidden = indicatif::ProgressBar::hidden();
        let warm: Vec<ChatRequest> = (0..s.count_concurrency).map(|_| request(&names[0], s.max_tokens)).collect();
        run::run_closed_loop(&conn.endpoint, &warm, s.count_concurrency, &hidden).await;
        let mut single_tp = None;
        for (phase, alpha) in [("single", None), ("round_robin", None), ("zipf", Some(s.zipf_alpha))] {
            bar.set_message(format!("{count} adapters, {phase}"));
            let picks: Vec<usize> = match phase {
                "single" => vec![0; s.count_requests],
                _ => run::popularity(s.count_requests, count, alpha, 42),
            };
            let reqs: Vec<ChatRequest> = picks.iter().map(|&i| request(&names[i], s.max_tokens)).collect();
            let before = conn.endpoint.metrics().await;
            let (samples, wall) = run::run_closed_loop(&conn.endpoint, &reqs, s.count_concurrency, &hidden).await;
            let after = conn.endpoint.metrics().await;
            let delta = |name: &str| Some(after.as_ref()?.sum(name)? - before.as_ref()?.sum(name).unwrap_or(0.0));
            let ok = samples.iter().filter(|x| x.ok).count();
            let tp = ok as f64 / wall;
            let single = *single_tp.get_or_insert(tp);
            let mut used = picks.clone();
            used.sort_unstable();
            used.dedup();
            points.push(CountPoint {
                adapters_on_disk: count,
                popularity: phase.into(),
                distinct_adapters_used: used.len(),
                requests: samples.len(),
                errors: samples.len() - ok,
                throughput_req_per_sec: tp,
                tokens_per_sec: samples.iter().filter(|x| x.ok).filter_map(|x| x.completion_tokens).sum::<u64>() as f64 / wall,
                relative_to_single: tp / single,
                adapter_loads: delta("loramux_adapter_loads_total"),
                adapter_evictions: delta("loramux_adapter_evictions_total"),
                peak_memory_mb: after.as_ref().and_then(MetricsSnapshot::peak_resident_bytes).map(|b| b / 1048576.0),
                latency: stats::summarize(&run::ok_latencies(&samples)),
                samples,
            });
            bar.inc(1);
        }
        if let Some(l) = conn.launched {
            l.stop();
        }
        std::fs::remove_dir_all(&dir).ok();
    }
    Ok(points)
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

impl Report for SwapResult {
    fn markdown(&self) -> String {
        let m = &self.metadata;
        let c = &self.costs;
        let sum = |s: &Option<Summary>| {
            s.as_ref().map_or("n/a".into(), |s| format!("p50 {:.2} ms, p95 {:.2} ms (n = {})", s.p50, s.p95, s.n))
        };
        let mut out = format!(
            "# Adapter swap cost\n\n{} · {} · {} ({} cores) · model {}\n\n## Cold load and hot switch\n\n\
             - Cold load (rank {} all-linear, `load_lora_adapter` round trip): {}\n- Server-side load time: {} ms mean\n\
             - Memory per adapter: {} MB resident (slope over {} loads); weights in memory {} MB; file {:.2} MB\n\
             - First token after another adapter: {}\n- First token after the same adapter: {}\n- Hot switch cost (p50 difference): {} ms\n\n\
             ## Decode speed by rank (all-linear adapters, {} tokens per request)\n\n| Rank | Streams | Tokens/s | vs base |\n|---:|---:|---:|---:|\n",
            m.timestamp, m.machine.hostname, m.machine.cpu_model, m.machine.logical_cores, m.base_model,
            self.settings.load_rank, sum(&c.cold_load), fmt_opt(c.server_load_mean_ms, 2),
            fmt_opt(c.memory_per_adapter_mb, 2), c.cold_load_ms.len(), fmt_opt(c.adapter_weight_mb, 2), c.adapter_file_mb,
            sum(&c.switch_ttft), sum(&c.same_ttft), fmt_opt(c.hot_switch_cost_ms, 2), self.settings.max_tokens,
        );
        for p in &self.rank_sweep {
            let rank = if p.rank == 0 { "base".to_string() } else { p.rank.to_string() };
            out += &format!("| {rank} | {} | {:.1} | {:.3} |\n", p.concurrency, p.tokens_per_sec, p.relative_to_base);
        }
        out += &format!(
            "\n## Adapters on disk (rank {} q/v adapters, --max-loras {}, {} clients, {} requests per phase)\n\n\
             | On disk | Popularity | Distinct used | Req/s | Tokens/s | vs single | Loads | Evictions | Peak RSS (MB) | p95 latency (ms) | Errors |\n\
             |---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            self.settings.count_rank, self.settings.max_loras, self.settings.count_concurrency, self.settings.count_requests
        );
        for p in &self.count_sweep {
            out += &format!(
                "| {} | {} | {} | {:.3} | {:.1} | {:.3} | {} | {} | {} | {} | {} |\n",
                p.adapters_on_disk,
                p.popularity,
                p.distinct_adapters_used,
                p.throughput_req_per_sec,
                p.tokens_per_sec,
                p.relative_to_single,
                fmt_opt(p.adapter_loads, 0),
                fmt_opt(p.adapter_evictions, 0),
                fmt_opt(p.peak_memory_mb, 0),
                fmt_opt(p.latency.as_ref().map(|l| l.p95), 1),
                p.errors
            );
        }
        out
    }

    fn plots(&self, dir: &Path, stem: &str) -> Result<Vec<PathBuf>, BenchError> {
        let mut out = Vec::new();
        let mut conc: Vec<usize> = self.rank_sweep.iter().map(|p| p.concurrency).collect();
        conc.sort_unstable();
        conc.dedup();
        let series: Vec<Series> = conc
            .iter()
            .map(|c| Series {
                name: format!("{c} stream(s)"),
                points: self.rank_sweep.iter().filter(|p| p.concurrency == *c && p.rank > 0).map(|p| (p.rank as f64, p.tokens_per_sec)).collect(),
            })
            .filter(|s| !s.points.is_empty())
            .collect();
        if !series.is_empty() {
            out.extend(plot::line_chart(&dir.join(format!("{stem}_rank")), "Decode speed by LoRA rank", "rank", "tokens/s", &series, true)?);
        }
        let count_series: Vec<Series> = ["single", "round_robin", "zipf"]
            .iter()
            .map(|k| Series {
                name: k.to_string(),
                points: self
                    .count_sweep
                    .iter()
                    .filter(|p| p.popularity == *k)
                    .map(|p| (p.adapters_on_disk as f64, p.throughput_req_per_sec))
                    .collect(),
            })
            .filter(|s| !s.points.is_empty())
            .collect();
        if !count_series.is_empty() {
            out.extend(plot::line_chart(
                &dir.join(format!("{stem}_count")),
                "Throughput by adapters on disk",
                "adapters on disk",
                "requests/s",
                &count_series,
                true,
            )?);
            let mem: Vec<Series> = vec![Series {
                name: "peak RSS".into(),
                points: self
                    .count_sweep
                    .iter()
                    .filter(|p| p.popularity == "zipf")
                    .filter_map(|p| Some((p.adapters_on_disk as f64, p.peak_memory_mb?)))
                    .collect(),
            }];
            if !mem[0].points.is_empty() {
                out.extend(plot::line_chart(&dir.join(format!("{stem}_memory")), "Server memory by adapters on disk", "adapters on disk", "peak RSS (MB)", &mem, true)?);
            }
        }
        if !self.costs.cold_load_ms.is_empty() {
            out.extend(plot::box_plot(
                &dir.join(format!("{stem}_cold_load")),
                "Cold adapter load",
                "load_lora_adapter round trip (ms)",
                &[(format!("rank {}", self.settings.load_rank), self.costs.cold_load_ms.clone())],
            )?);
        }
        Ok(out)
    }
}
