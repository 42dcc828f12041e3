//! The adapter-count sweep of the swap scenario: one server per count of adapters on disk,
//! each under single-adapter, round-robin and Zipf traffic.

use std::path::Path;

use safetensors::Dtype;

use super::{request, written, CountPoint, SwapSettings};
use crate::client::{ChatRequest, MetricsSnapshot};
use crate::run::{self, BenchContext};
use crate::stats;
use crate::synth::{write_adapter, AdapterSpec};
use crate::BenchError;

/// Writes the largest count's adapters once into a pool, then measures every count.
pub(super) async fn count_sweep(ctx: &BenchContext, s: &SwapSettings, bar: &indicatif::ProgressBar) -> Result<Vec<CountPoint>, BenchError> {
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
        link_adapters(&pool, &dir, count)?;
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

/// Hard-links (or, where links fail, copies) the first `count` adapters of `pool` into `dir`.
fn link_adapters(pool: &Path, dir: &Path, count: usize) -> Result<(), BenchError> {
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
    Ok(())
}
