//! `loramux bench quality`: what an adapter buys and what it costs, measured in-process on
//! the engine (issue #19, rank vs quality vs speed). For each task adapter and its held-out
//! set: exact match of greedy answers, the log-likelihood of the reference answers (prompt
//! log-probabilities of answer + end of turn) and decode tokens/s at batch 1 and 16 — for
//! the base alone, the adapter unmerged on the base as shipped, and, on a float32 copy of the
//! base, the adapter unmerged and merged, whose answers must agree. Then the same for each
//! adapter of a rank sweep of a task.
//!
//! This file holds the settings, the result types and [`measure`]; `inputs.rs` reads the
//! adapters and held-out sets, `eval.rs` runs the engine, `report.rs` writes Markdown and plots.

pub mod auto;
mod eval;
pub mod inputs;
mod report;

use std::path::{Path, PathBuf};

use clap::Args;
use loramux_engine::{Engine, ModelLocation};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::run::{BenchContext, Metadata};
use crate::BenchError;
use inputs::{Item, SweepAdapter, Task};

/// The result file's name in the output folder.
pub const RESULT_FILE: &str = "quality.json";

/// Settings of the quality scenario.
#[derive(Args, Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct QualitySettings {
    /// Model the adapters were trained on (a known name, a GGUF file or a model folder).
    #[arg(long, default_value = loramux_engine::registry::DEFAULT_MODEL)]
    pub model: String,
    /// Folder of task adapters: <task>/ holding a PEFT adapter and heldout.jsonl.
    #[arg(long, default_value = "adapters/tasks")]
    pub adapters: PathBuf,
    /// Tasks to measure, by folder name [default: all].
    #[arg(long, value_delimiter = ',', value_name = "TASK,...")]
    pub only: Vec<String>,
    /// Held-out items per task: the first N [default: all].
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Rank-sweep adapters, <task>-r<rank>/ [default: <cache>/adapters/rank-sweep; skipped with a note when absent].
    #[arg(long, value_name = "DIR")]
    pub sweep: Option<PathBuf>,
    /// Skip the rank sweep.
    #[arg(long, conflicts_with = "sweep")]
    #[serde(default)]
    pub no_sweep: bool,
    /// Decode steps timed for each tokens/s figure (their median is the figure).
    #[arg(long, default_value_t = 64)]
    pub speed_tokens: usize,
}

/// How a configuration runs a task. `auto` (the semantic router choosing among every
/// task's adapters) is measured across tasks, in [`auto::AutoResult`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// The base model as shipped, no adapter.
    Base,
    /// The adapter applied beside the base as shipped, per row (what `serve` does).
    Unmerged,
    /// The adapter applied per row beside the base dequantized to float32: the reference
    /// `merged_f32` must agree with.
    UnmergedF32,
    /// The adapter folded into the float32 base (`Engine::merge_adapter`).
    MergedF32,
}

impl Variant {
    /// The row's name in reports.
    pub fn label(self) -> &'static str {
        match self {
            Self::Base => "base",
            Self::Unmerged => "adapter, unmerged",
            Self::UnmergedF32 => "adapter, unmerged (f32 base)",
            Self::MergedF32 => "adapter, merged (f32 base)",
        }
    }
}

/// One held-out item's outcome.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct ItemSample {
    /// Position in the held-out file.
    pub index: usize,
    /// The greedy answer (special tokens dropped, cut at the end of turn).
    pub output: String,
    /// `output` trimmed equals the reference answer.
    pub exact_match: bool,
    /// Sum of the log-probabilities of the reference answer's tokens and the end of turn.
    pub answer_logprob: f64,
    /// Tokens in that sum.
    pub answer_tokens: usize,
}

/// Quality on a held-out set.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct Quality {
    /// Share of items answered exactly.
    pub exact_match: f64,
    /// Mean over items of the reference answer's log-likelihood (answer + end of turn).
    pub mean_answer_logprob: f64,
    /// The same per token: summed log-probabilities over summed tokens.
    pub mean_token_logprob: f64,
    pub samples: Vec<ItemSample>,
}

impl Quality {
    /// The means of `samples` (not empty).
    pub fn from_samples(samples: Vec<ItemSample>) -> Self {
        let n = samples.len().max(1) as f64;
        let total: f64 = samples.iter().map(|s| s.answer_logprob).sum();
        let tokens: usize = samples.iter().map(|s| s.answer_tokens).sum();
        Self {
            exact_match: samples.iter().filter(|s| s.exact_match).count() as f64 / n,
            mean_answer_logprob: total / n,
            mean_token_logprob: total / tokens.max(1) as f64,
            samples,
        }
    }
}

/// Decode speed, every row of the batch on the configuration's adapter: batch size over the
/// median decode step time.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct Speed {
    pub batch1_tok_s: f64,
    pub batch16_tok_s: f64,
    /// The base model's, on the same engine, measured just before (for `merged_f32`: before
    /// merging): what the relative speeds divide by, so that a machine slowing down between
    /// configurations does not pass for an adapter's cost.
    pub base_batch1_tok_s: f64,
    pub base_batch16_tok_s: f64,
}

impl Speed {
    /// Batch-1 speed over the base's measured beside it.
    pub fn relative1(&self) -> f64 {
        self.batch1_tok_s / self.base_batch1_tok_s
    }

    /// Batch-16 speed over the base's measured beside it.
    pub fn relative16(&self) -> f64 {
        self.batch16_tok_s / self.base_batch16_tok_s
    }
}

/// One configuration of a task.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct VariantResult {
    pub variant: Variant,
    pub quality: Quality,
    pub speed: Speed,
}

/// Whether the merged adapter answers as the unmerged one does on the same float32 base.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct Agreement {
    pub items: usize,
    /// Items whose greedy answers are the same text.
    pub identical_outputs: usize,
    /// `identical_outputs / items` (should be 1).
    pub share_identical: f64,
    /// Largest difference of an item's reference log-likelihood between the two.
    pub max_abs_delta_logprob: f64,
}

impl Agreement {
    /// Compares two measurements of the same items.
    pub fn between(a: &Quality, b: &Quality) -> Self {
        let pairs = || a.samples.iter().zip(&b.samples);
        let identical = pairs().filter(|(x, y)| x.output == y.output).count();
        let items = a.samples.len();
        Self {
            items,
            identical_outputs: identical,
            share_identical: identical as f64 / items.max(1) as f64,
            max_abs_delta_logprob: pairs().map(|(x, y)| (x.answer_logprob - y.answer_logprob).abs()).fold(0.0, f64::max),
        }
    }
}

/// One task's measurements.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct TaskResult {
    pub task: String,
    /// The adapter folder.
    pub adapter: String,
    /// The held-out file.
    pub heldout: String,
    /// Most tokens a greedy answer could take (longest reference + end of turn + 3).
    pub max_tokens: usize,
    /// In order: base, unmerged, unmerged_f32, merged_f32.
    pub variants: Vec<VariantResult>,
    /// `merged_f32` against `unmerged_f32`.
    pub merged_agreement: Agreement,
}

impl TaskResult {
    /// The measurement of `variant`, if made.
    pub fn variant(&self, variant: Variant) -> Option<&VariantResult> {
        self.variants.iter().find(|v| v.variant == variant)
    }
}

/// One adapter of the rank sweep, unmerged on the base as shipped.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct SweepPoint {
    pub task: String,
    pub rank: usize,
    pub adapter: String,
    pub quality: Quality,
    pub speed: Speed,
}

/// The quality scenario's result file.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct QualityResult {
    pub metadata: Metadata,
    pub settings: QualitySettings,
    /// The rank-sweep folder read; `None` when the sweep was skipped.
    pub sweep_dir: Option<String>,
    pub tasks: Vec<TaskResult>,
    pub sweep: Vec<SweepPoint>,
    /// Every item sent to `model: "auto"`; `None` when a task has no routing.json.
    #[serde(default)]
    pub auto: Option<auto::AutoResult>,
    /// What was left out, and why.
    pub notes: Vec<String>,
}

/// The checked inputs of a run: read before the model loads, so bad input fails at once.
pub struct Inputs {
    pub tasks: Vec<(Task, Vec<Item>)>,
    pub sweep: Vec<SweepAdapter>,
    pub sweep_dir: Option<PathBuf>,
    pub notes: Vec<String>,
}

/// Finds the tasks and sweep adapters and reads every held-out set.
pub fn inputs(s: &QualitySettings) -> Result<Inputs, BenchError> {
    if s.limit == Some(0) || s.speed_tokens == 0 {
        return Err(BenchError::Invalid("--limit and --speed-tokens must be at least 1".into()));
    }
    let found = inputs::find_tasks(&s.adapters, &s.only)?;
    let mut tasks = Vec::new();
    for task in found {
        let items = inputs::read_heldout(&task.heldout, s.limit)?;
        tasks.push((task, items));
    }
    let names: Vec<Task> = tasks.iter().map(|(t, _)| t.clone()).collect();
    let dir = s.sweep.clone().unwrap_or_else(|| loramux_engine::registry::cache_dir().join("adapters/rank-sweep"));
    let (sweep, sweep_dir, notes) = match () {
        _ if s.no_sweep => (Vec::new(), None, vec!["rank sweep skipped (--no-sweep)".to_string()]),
        _ if !dir.is_dir() => (Vec::new(), None, vec![format!("rank sweep skipped: {} does not exist", dir.display())]),
        _ => {
            let (sweep, notes) = inputs::find_sweep(&dir, &names)?;
            (sweep, Some(dir), notes)
        }
    };
    Ok(Inputs { tasks, sweep, sweep_dir, notes })
}

/// A task's items ready to run: the references in tokens and the answer budget.
struct Job<'a> {
    items: &'a [Item],
    scored: Vec<eval::Scored>,
    max_tokens: usize,
    speed_tokens: usize,
}

impl Job<'_> {
    /// Quality and speed of `adapter` (already resident, or merged) on `engine`, the speed
    /// beside the base's measured now, or given in `base` (an engine with an adapter merged
    /// runs nothing else).
    fn run(&self, engine: &mut Engine, adapter: Option<&str>, base: Option<[f64; 2]>) -> Result<(Quality, Speed), BenchError> {
        let quality = eval::quality(engine, adapter, self.items, &self.scored, self.max_tokens)?;
        Ok((quality, eval::speed(engine, adapter, self.speed_tokens, base)))
    }
}

/// Loads the adapter in `dir` as `name`.
fn load_adapter(engine: &mut Engine, name: &str, dir: &Path) -> Result<(), BenchError> {
    engine.loras_mut().load(name, dir).map(|_| ()).map_err(|e| BenchError::Invalid(format!("{}: {e}", dir.display())))
}

fn unload_adapter(engine: &mut Engine, name: &str) {
    engine.loras_mut().unload(name).expect("the adapter was loaded");
}

/// The model as shipped and dequantized to float32 (for merging).
struct Engines {
    shipped: Engine,
    float: Engine,
}

/// Every configuration of one task.
fn measure_task(engines: &mut Engines, task: &Task, job: &Job, progress: &dyn Fn(&str)) -> Result<TaskResult, BenchError> {
    let name = task.name.as_str();
    progress(&format!("{name}: base"));
    let mut variants = Vec::new();
    let mut push = |variant: Variant, (quality, speed): (Quality, Speed)| variants.push(VariantResult { variant, quality, speed });
    push(Variant::Base, job.run(&mut engines.shipped, None, None)?);
    progress(&format!("{name}: adapter unmerged"));
    load_adapter(&mut engines.shipped, name, &task.dir)?;
    push(Variant::Unmerged, job.run(&mut engines.shipped, Some(name), None)?);
    unload_adapter(&mut engines.shipped, name);
    progress(&format!("{name}: adapter unmerged and merged on the float32 base"));
    load_adapter(&mut engines.float, name, &task.dir)?;
    let (quality, speed) = job.run(&mut engines.float, Some(name), None)?;
    let float_base = [speed.base_batch1_tok_s, speed.base_batch16_tok_s];
    push(Variant::UnmergedF32, (quality, speed));
    engines.float.merge_adapter(name).map_err(|e| BenchError::Invalid(format!("merging {name}: {e}")))?;
    let merged = job.run(&mut engines.float, Some(name), Some(float_base));
    engines.float.unmerge_adapter();
    unload_adapter(&mut engines.float, name);
    push(Variant::MergedF32, merged?);
    let merged_agreement = Agreement::between(&variants[2].quality, &variants[3].quality);
    Ok(TaskResult {
        task: name.into(),
        adapter: task.dir.display().to_string(),
        heldout: task.heldout.display().to_string(),
        max_tokens: job.max_tokens,
        variants,
        merged_agreement,
    })
}

/// Runs the scenario on `ctx.model` over `inputs` (from [`inputs`]).
pub fn measure(ctx: &BenchContext, s: &QualitySettings, inputs: Inputs, progress: &dyn Fn(&str)) -> Result<QualityResult, BenchError> {
    let model: &ModelLocation = ctx.model.as_ref().ok_or_else(|| BenchError::Invalid("quality needs a model".into()))?;
    progress("loading the model as shipped and as float32");
    let mut engines = Engines { shipped: eval::load(model, false)?, float: eval::load(model, true)? };
    let mut jobs = Vec::new();
    for (_, items) in &inputs.tasks {
        let scored = eval::tokenize(&engines.shipped, items)?;
        jobs.push(Job { items, max_tokens: eval::answer_budget(&scored), scored, speed_tokens: s.speed_tokens });
    }
    let mut tasks = Vec::new();
    for ((task, _), job) in inputs.tasks.iter().zip(&jobs) {
        tasks.push(measure_task(&mut engines, task, job, progress)?);
    }
    progress("auto: every item routed among all the tasks' adapters");
    let budgets: Vec<usize> = jobs.iter().map(|j| j.max_tokens).collect();
    let auto = auto::measure(&mut engines.shipped, &inputs.tasks, &tasks, &budgets)?;
    let mut notes = inputs.notes;
    if auto.is_none() {
        notes.push("auto not measured: a task has no routing.json".into());
    }
    let mut sweep = Vec::new();
    for a in &inputs.sweep {
        let job = inputs.tasks.iter().zip(&jobs).find(|((t, _), _)| t.name == a.task).map(|(_, j)| j).expect("sweep tasks are measured");
        let name = format!("{}-r{}", a.task, a.rank);
        progress(&format!("sweep: {name}"));
        load_adapter(&mut engines.shipped, &name, &a.dir)?;
        let measured = job.run(&mut engines.shipped, Some(&name), None);
        unload_adapter(&mut engines.shipped, &name);
        let (quality, speed) = measured?;
        sweep.push(SweepPoint { task: a.task.clone(), rank: a.rank, adapter: a.dir.display().to_string(), quality, speed });
    }
    Ok(QualityResult {
        metadata: Metadata::new("quality", ctx, &s.model, "in-process engine (no server)"),
        settings: s.clone(),
        sweep_dir: inputs.sweep_dir.map(|d| d.display().to_string()),
        tasks,
        sweep,
        auto,
        notes,
    })
}
