//! The swap scenario's Markdown report and plots.

use std::path::{Path, PathBuf};

use super::SwapResult;
use crate::plot::{self, Series};
use crate::run::{fmt_opt, Report};
use crate::stats::Summary;
use crate::BenchError;

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
