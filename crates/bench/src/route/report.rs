//! The routing scenario's Markdown report and confusion-matrix plots.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use super::RouteResult;
use crate::plot;
use crate::run::Report;
use crate::BenchError;

impl Report for RouteResult {
    fn markdown(&self) -> String {
        let m = &self.metadata;
        let s = &self.settings;
        let heldout: usize = self.heldout_per_task.iter().sum();
        let mut out = format!(
            "# Semantic routing: which adapter, how sure, how fast\n\n{} · {} · {} ({} cores) · model {} · {} tasks ({}) · \
             {} routing examples per task, {heldout} held-out prompts (disjoint from the examples)\n\n\
             Accuracy: held-out prompts routed to their own task's adapter. Fallback: share with a margin (best minus second \
             cosine score) under {}, which `serve` would send to the fallback. Time: tokenize + embed + score, each prompt new to \
             the router (no cache). TTFT overhead: routing time over the time to the first token of the same prompt sent to its \
             adapter by name, in-process (TTFT p50 {:.1} ms; over HTTP a TTFT is longer, so the overhead smaller).\n\n\
             | Router | Accuracy | Median margin (correct) | Held-out under threshold | Off-topic under threshold | p50 ms | p99 ms | TTFT overhead p50 | p90 | Examples embedded (ms) |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            m.timestamp,
            m.machine.hostname,
            m.machine.cpu_model,
            m.machine.logical_cores,
            m.base_model,
            self.tasks.len(),
            self.tasks.join(", "),
            self.examples_per_task.first().copied().unwrap_or(0),
            s.min_confidence,
            self.ttft_p50_ms,
        );
        for r in &self.routers {
            let _ = writeln!(
                out,
                "| {} | {:.1} % ({}/{}) | {:.3} | {:.1} % | {:.0} % | {:.1} | {:.1} | {:.1} % | {:.1} % | {:.0} |",
                r.router,
                r.accuracy * 100.0,
                r.correct,
                r.total,
                r.median_margin_correct,
                r.heldout_fallback_share * 100.0,
                r.off_topic_fallback_share * 100.0,
                r.p50_ms,
                r.p99_ms,
                r.ttft_overhead_median * 100.0,
                r.ttft_overhead_p90 * 100.0,
                r.examples_ms
            );
        }
        for r in &self.routers {
            let _ = writeln!(out, "\n## Confusion: {} (rows: the prompt's task; columns: routed to)\n", r.router);
            let _ = writeln!(out, "| | {} |\n|---|{}", self.tasks.join(" | "), "---:|".repeat(self.tasks.len()));
            for (task, row) in self.tasks.iter().zip(&r.confusion) {
                let cells: Vec<String> = row.iter().map(usize::to_string).collect();
                let _ = writeln!(out, "| {task} | {} |", cells.join(" | "));
            }
        }
        crate::run::notes_section(&mut out, &self.notes);
        out
    }

    fn plots(&self, dir: &Path, stem: &str) -> Result<Vec<PathBuf>, BenchError> {
        let mut out = Vec::new();
        for r in &self.routers {
            let slug: String = r.router.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).collect();
            let title = format!("{}: {:.1} % of {} held-out prompts", r.router, r.accuracy * 100.0, r.total);
            out.extend(plot::confusion_matrix(&dir.join(format!("{stem}_confusion_{slug}")), &title, &self.tasks, &r.confusion)?);
        }
        Ok(out)
    }
}
