//! The quality scenario's Markdown report and plots.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use super::{Quality, QualityResult, Speed, SweepPoint, TaskResult, Variant};
use crate::plot::{self, Bar, Series};
use crate::run::Report;
use crate::BenchError;

/// Table columns shared by the task and sweep tables.
const COLUMNS: &str = "| Exact match | Loglik / item | Loglik / token | tok/s b1 | tok/s b16 | vs base b1 | vs base b16 |";
/// Their alignment row after the first column's.
const ALIGN: &str = "---:|---:|---:|---:|---:|---:|---:|";

fn cells(q: &Quality, s: &Speed) -> String {
    format!(
        "| {:.3} | {:.2} | {:.3} | {:.1} | {:.1} | {:.2} | {:.2} |",
        q.exact_match,
        q.mean_answer_logprob,
        q.mean_token_logprob,
        s.batch1_tok_s,
        s.batch16_tok_s,
        s.relative1(),
        s.relative16()
    )
}

impl QualityResult {
    /// The task measured with the base model, for the sweep's reference row.
    fn base_of(&self, task: &str) -> Option<&super::VariantResult> {
        self.tasks.iter().find(|t| t.task == task).and_then(|t| t.variant(Variant::Base))
    }

    /// Tasks of the sweep, in order of appearance.
    fn sweep_tasks(&self) -> Vec<&str> {
        let mut tasks: Vec<&str> = self.sweep.iter().map(|p| p.task.as_str()).collect();
        tasks.dedup();
        tasks
    }

    fn summary_table(&self, out: &mut String) {
        out.push_str(
            "## Summary (adapter: unmerged on the base as shipped)\n\n\
             | Task | Items | EM base | EM adapter | Loglik/item base | Loglik/item adapter | Merged = unmerged | max abs Δ loglik |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for t in &self.tasks {
            let (Some(base), Some(lora)) = (t.variant(Variant::Base), t.variant(Variant::Unmerged)) else { continue };
            let a = &t.merged_agreement;
            let _ = writeln!(
                out,
                "| {} | {} | {:.3} | {:.3} | {:.2} | {:.2} | {}/{} | {:.1e} |",
                t.task,
                a.items,
                base.quality.exact_match,
                lora.quality.exact_match,
                base.quality.mean_answer_logprob,
                lora.quality.mean_answer_logprob,
                a.identical_outputs,
                a.items,
                a.max_abs_delta_logprob
            );
        }
    }

    fn auto_table(&self, out: &mut String) {
        let Some(a) = &self.auto else { return };
        let _ = writeln!(
            out,
            "\n## auto: the router picks the adapter ({}, fallback to the base under a margin of {})\n\n\
             | Task | Items | Routed right | Fell back | EM auto | EM oracle (adapter named) | EM base |\n|---|---:|---:|---:|---:|---:|---:|",
            a.router, a.min_confidence
        );
        for t in &a.tasks {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {:.3} | {:.3} | {:.3} |",
                t.task, t.items, t.routed_right, t.fell_back, t.exact_match_auto, t.exact_match_oracle, t.exact_match_base
            );
        }
        let _ = writeln!(
            out,
            "| all | {} | {:.1} % | | {:.3} | {:.3} | {:.3} |",
            a.tasks.iter().map(|t| t.items).sum::<usize>(),
            a.routed_right_share * 100.0,
            a.exact_match_auto,
            a.exact_match_oracle,
            a.exact_match_base
        );
    }

    fn task_table(t: &TaskResult, out: &mut String) {
        let _ = writeln!(out, "\n## {} ({} items, answers cut at {} tokens)\n", t.task, t.merged_agreement.items, t.max_tokens);
        let _ = writeln!(out, "| Configuration {COLUMNS}\n|---|{ALIGN}");
        for v in &t.variants {
            let _ = writeln!(out, "| {} {}", v.variant.label(), cells(&v.quality, &v.speed));
        }
        let a = &t.merged_agreement;
        let _ = writeln!(
            out,
            "\nLoRA vs merged, same answers? {}/{} identical greedy answers ({:.1}%) between unmerged and merged on the float32 base; \
             max |Δ loglik| per item {:.1e}.",
            a.identical_outputs,
            a.items,
            a.share_identical * 100.0,
            a.max_abs_delta_logprob
        );
    }

    fn sweep_table(&self, task: &str, out: &mut String) {
        let _ = writeln!(out, "\n## Rank sweep: {task} (adapter unmerged on the base as shipped)\n");
        let _ = writeln!(out, "| Rank {COLUMNS}\n|---:|{ALIGN}");
        if let Some(base) = self.base_of(task) {
            let _ = writeln!(out, "| base {}", cells(&base.quality, &base.speed));
        }
        for p in self.sweep.iter().filter(|p| p.task == task) {
            let _ = writeln!(out, "| {} {}", p.rank, cells(&p.quality, &p.speed));
        }
    }
}

impl Report for QualityResult {
    fn markdown(&self) -> String {
        let m = &self.metadata;
        let s = &self.settings;
        let limit = s.limit.map_or("all".to_string(), |n| format!("first {n}"));
        let mut out = format!(
            "# Adapter quality: rank vs quality vs speed\n\n{} · {} · {} ({} cores) · model {} · held-out items per task: {limit}\n\n\
             Exact match: the greedy answer (cut at the end of turn, trimmed) equals the reference. \
             Loglik: log-probability of the reference answer and the end-of-turn token after the chat prompt, \
             summed per item and averaged over items (/ item), and per token. \
             tok/s: decode tokens/s (batch size over the median of {} decode steps), every row of the batch on the configuration; \
             vs base: over the base model's measured just before on the same engine (as shipped, or float32 for the f32 rows). \
             `auto`: each item sent as `model: \"auto\"`, the router picking among all the tasks' adapters (table below).\n\n",
            m.timestamp, m.machine.hostname, m.machine.cpu_model, m.machine.logical_cores, m.base_model, s.speed_tokens
        );
        self.summary_table(&mut out);
        self.auto_table(&mut out);
        for t in &self.tasks {
            Self::task_table(t, &mut out);
        }
        for task in self.sweep_tasks() {
            self.sweep_table(task, &mut out);
        }
        crate::run::notes_section(&mut out, &self.notes);
        out
    }

    fn plots(&self, dir: &Path, stem: &str) -> Result<Vec<PathBuf>, BenchError> {
        let mut out = Vec::new();
        let bars: Vec<Bar> = self
            .tasks
            .iter()
            .filter_map(|t| Some(Bar { label: t.task.clone(), value: t.variant(Variant::Unmerged)?.quality.exact_match, error: None }))
            .collect();
        if !bars.is_empty() {
            let title = "Exact match by task, adapter unmerged";
            out.extend(plot::bar_chart(&dir.join(format!("{stem}_tasks")), title, "exact match", &bars)?);
        }
        for task in self.sweep_tasks() {
            out.extend(self.sweep_plots(dir, &format!("{stem}_{task}"), task)?);
        }
        Ok(out)
    }
}

impl QualityResult {
    /// A sweep task's points.
    fn points<'a>(&'a self, task: &'a str) -> impl Iterator<Item = &'a SweepPoint> + 'a {
        self.sweep.iter().filter(move |p| p.task == task)
    }

    /// `value` of a sweep task's points by rank, as a series called `name`.
    fn by_rank(&self, task: &str, name: &str, value: impl Fn(&SweepPoint) -> f64) -> Series {
        Series { name: name.into(), points: self.points(task).map(|p| (p.rank as f64, value(p))).collect() }
    }

    /// A quality figure by rank, and the base's as a flat line across the same ranks.
    fn quality_by_rank(&self, task: &str, value: impl Fn(&Quality) -> f64) -> Vec<Series> {
        let lora = self.by_rank(task, "LoRA", |p| value(&p.quality));
        let (lo, hi) = lora.points.iter().fold((f64::INFINITY, 0f64), |(lo, hi), p| (lo.min(p.0), hi.max(p.0)));
        let base = self.base_of(task).map(|b| Series { name: "base".into(), points: vec![(lo, value(&b.quality)), (hi, value(&b.quality))] });
        std::iter::once(lora).chain(base).collect()
    }

    /// Quality against rank (exact match, loglik), speed against rank (beside the base's
    /// measured with each point), and exact match against batch-16 speed relative to the
    /// base with each point labelled by its rank.
    fn sweep_plots(&self, dir: &Path, stem: &str, task: &str) -> Result<Vec<PathBuf>, BenchError> {
        let mut out = Vec::new();
        let em = self.quality_by_rank(task, |q| q.exact_match);
        out.extend(plot::line_chart(&dir.join(format!("{stem}_rank_em")), &format!("{task}: exact match by LoRA rank"), "rank", "exact match", &em, true)?);
        let ll = self.quality_by_rank(task, |q| q.mean_answer_logprob);
        let title = format!("{task}: reference log-likelihood by LoRA rank");
        out.extend(plot::line_chart(&dir.join(format!("{stem}_rank_loglik")), &title, "rank", "mean loglik per item", &ll, true)?);
        let speed = [
            self.by_rank(task, "LoRA, batch 1", |p| p.speed.batch1_tok_s),
            self.by_rank(task, "base beside it, batch 1", |p| p.speed.base_batch1_tok_s),
            self.by_rank(task, "LoRA, batch 16", |p| p.speed.batch16_tok_s),
            self.by_rank(task, "base beside it, batch 16", |p| p.speed.base_batch16_tok_s),
        ];
        let title = format!("{task}: decode speed by LoRA rank");
        out.extend(plot::line_chart(&dir.join(format!("{stem}_rank_speed")), &title, "rank", "tokens/s", &speed, true)?);
        let mut series = vec![Series { name: "LoRA".into(), points: self.points(task).map(|p| (p.speed.relative16(), p.quality.exact_match)).collect() }];
        let mut labels = vec![self.points(task).map(|p| format!("r{}", p.rank)).collect::<Vec<_>>()];
        if let Some(base) = self.base_of(task) {
            series.push(Series { name: "base".into(), points: vec![(1.0, base.quality.exact_match)] });
            labels.push(vec!["base".into()]);
        }
        let (title, x) = (format!("{task}: exact match against speed, by rank"), "decode speed at batch 16, relative to the base");
        out.extend(plot::labeled_scatter(&dir.join(format!("{stem}_tradeoff")), &title, x, "exact match", &series, &labels)?);
        Ok(out)
    }
}
