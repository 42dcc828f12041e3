//! `loramux bench route`: how well and how fast the semantic router picks the adapter
//! (issue #20), in-process. The labelled set is the task adapters' own: each task's
//! `routing.json` examples are what the router knows, its held-out prompts (`heldout.jsonl`,
//! disjoint from the examples, checked) are what it is asked. For the base-model router at
//! each layer asked for, and for the sentence-embedding model (all-MiniLM-L6-v2) when it is
//! pulled, side by side in one run: held-out accuracy and its confusion matrix, the margins,
//! the share of off-topic prompts that fall back, routing time p50/p99 (every prompt new to
//! the router: no cache), and the overhead on TTFT: for each prompt, the routing time over
//! the time to the first token of the same prompt sent to its adapter by name (an unrouted
//! request of the same length), measured right beside it.
//!
//! This file holds the settings, the result types and [`measure`]; `report.rs` writes the
//! Markdown and the confusion-matrix plots.

mod report;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use loramux_engine::registry::resolve_folder_model;
use loramux_engine::routing::{read_routing_file, BaseEmbedder, Embedder, Pooling, Router, RouterConfig, SentenceEmbedder};
use loramux_engine::{ChatMessage, Engine, EngineOptions, LoraLimits, LoraRequest, ModelLocation, Prompt, Request, SamplingParams};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::quality::inputs::{find_tasks, read_heldout, Item, Task};
use crate::run::{BenchContext, Metadata};
use crate::stats::percentile;
use crate::{engine_error, BenchError};

/// The result file's name in the output folder.
pub const RESULT_FILE: &str = "route.json";

/// Prompts no task adapter is for: how often the router admits it is unsure.
const OFF_TOPIC: [&str; 8] = [
    "Tell me a joke about penguins.",
    "What is the capital of Australia?",
    "Write a haiku about autumn leaves.",
    "How do I bake sourdough bread?",
    "Who painted the Mona Lisa?",
    "Give me three tips for a job interview.",
    "Explain how rainbows form.",
    "Recommend a good science fiction novel.",
];

/// Settings of the routing scenario.
#[derive(Args, Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct RouteSettings {
    /// Base model (a known name, a GGUF file or a model folder).
    #[arg(long, default_value = loramux_engine::registry::DEFAULT_MODEL)]
    pub model: String,
    /// Folder of task adapters: <task>/ with routing.json and heldout.jsonl.
    #[arg(long, default_value = "adapters/tasks")]
    pub adapters: PathBuf,
    /// Held-out prompts per task: the first N.
    #[arg(long, value_name = "N", default_value_t = 40)]
    pub limit: usize,
    /// Decoder layers the base-model router is measured at (0 = embeddings).
    #[arg(long, value_delimiter = ',', value_name = "L,...", default_value = "2,4,8,15")]
    pub layers: Vec<usize>,
    /// The sentence-embedding router to compare with (skipped with a note when not pulled).
    #[arg(long, value_name = "MODEL", default_value = "all-minilm-l6-v2")]
    pub router_model: String,
    /// Margin under which a pick falls back (as `--router-min-confidence`).
    #[arg(long, default_value_t = RouterConfig::DEFAULT_MIN_CONFIDENCE)]
    pub min_confidence: f32,
}

/// One router's figures.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct RouterRun {
    /// `base, layer N` or the sentence model's name.
    pub router: String,
    /// The base model's layer pooled; `None` for the sentence model.
    pub layer: Option<usize>,
    /// Held-out prompts routed to their own task's adapter, over all.
    pub accuracy: f64,
    pub correct: usize,
    pub total: usize,
    /// `confusion[true task][picked task]`, in the order of `RouteResult::tasks`.
    pub confusion: Vec<Vec<usize>>,
    /// Median margin (best minus second score) of correct picks.
    pub median_margin_correct: f64,
    /// Share of held-out prompts under `min_confidence` (they would go to the fallback).
    pub heldout_fallback_share: f64,
    /// Share of the off-topic prompts under `min_confidence`.
    pub off_topic_fallback_share: f64,
    /// Routing time per prompt (tokenize, embed, score), milliseconds.
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Embedding every task's examples, milliseconds (once per adapter; cached on disk by the server).
    pub examples_ms: f64,
    /// Median over prompts of routing time / TTFT of the same prompt sent by name.
    pub ttft_overhead_median: f64,
    /// 90th percentile of that ratio.
    pub ttft_overhead_p90: f64,
}

/// The routing scenario's result file.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct RouteResult {
    pub metadata: Metadata,
    pub settings: RouteSettings,
    /// Task names, the order of every confusion matrix.
    pub tasks: Vec<String>,
    /// Routing examples per task.
    pub examples_per_task: Vec<usize>,
    /// Held-out prompts per task.
    pub heldout_per_task: Vec<usize>,
    /// TTFT of the held-out prompts sent to their adapter by name (in-process: prefill and
    /// the first sampled token, no HTTP), milliseconds.
    pub ttft_p50_ms: f64,
    pub routers: Vec<RouterRun>,
    /// What was left out, and why.
    pub notes: Vec<String>,
}

/// A task's routing examples and held-out prompts.
pub struct LabelledTask {
    pub task: Task,
    pub examples: loramux_engine::routing::RoutingSpec,
    pub heldout: Vec<Item>,
}

/// Reads the labelled set (failing before the model loads): every task needs a
/// `routing.json`, and no held-out prompt may be one of its examples.
pub fn inputs(s: &RouteSettings) -> Result<Vec<LabelledTask>, BenchError> {
    if s.limit == 0 || s.layers.is_empty() {
        return Err(BenchError::Invalid("--limit must be at least 1 and --layers not empty".into()));
    }
    let mut out = Vec::new();
    for task in find_tasks(&s.adapters, &[])? {
        let examples = read_routing_file(&task.dir)
            .map_err(|e| BenchError::Invalid(e.to_string()))?
            .ok_or_else(|| BenchError::Invalid(format!("{}: no routing.json (the router's examples)", task.dir.display())))?;
        let heldout = read_heldout(&task.heldout, Some(s.limit))?;
        if let Some(dup) = heldout.iter().find(|i| examples.examples.contains(&i.prompt)) {
            return Err(BenchError::Invalid(format!("{}: held-out prompt {:?} is also a routing example", task.heldout.display(), dup.prompt)));
        }
        out.push(LabelledTask { task, examples, heldout });
    }
    if out.len() < 2 {
        return Err(BenchError::Invalid(format!("{}: routing needs at least two tasks", s.adapters.display())));
    }
    Ok(out)
}

/// A router under test and what it measured so far.
struct Candidate {
    name: String,
    layer: Option<usize>,
    router: Router,
    examples_ms: f64,
    picks: Vec<(usize, usize, f32)>,
    times_ms: Vec<f64>,
    ratios: Vec<f64>,
}

/// The `q`-th percentile (0-100) of samples; 0 when there are none.
fn pct(samples: &[f64], q: f64) -> f64 {
    percentile(samples, q).unwrap_or(0.0)
}

fn candidate(name: String, layer: Option<usize>, embedder: Arc<dyn Embedder>, tasks: &[LabelledTask]) -> Result<Candidate, BenchError> {
    let router = Router::new(embedder, RouterConfig { cache_entries: 0, ..RouterConfig::default() }, None);
    let t = Instant::now();
    for lt in tasks {
        let route = router.prepare(&lt.examples).map_err(engine_error("embedding routing examples"))?;
        router.insert(&lt.task.name, route);
    }
    let examples_ms = t.elapsed().as_secs_f64() * 1e3;
    Ok(Candidate { name, layer, router, examples_ms, picks: Vec::new(), times_ms: Vec::new(), ratios: Vec::new() })
}

/// Routes `prompt`: (picked task index, margin, milliseconds).
fn route_once(c: &Candidate, prompt: &Prompt, names: &[String]) -> Result<(usize, f32, f64), BenchError> {
    let t = Instant::now();
    let d = c.router.route(prompt, &|_| true).map_err(engine_error("routing"))?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let best = d.best().map(|b| b.0.clone()).unwrap_or_default();
    Ok((names.iter().position(|n| *n == best).unwrap_or(0), d.confidence, ms))
}

/// Time to the first token of `prompt` on `adapter`, alone in the engine, milliseconds.
fn ttft_ms(engine: &mut Engine, adapter: &str, prompt: &Prompt) -> Result<f64, BenchError> {
    let req = Request { lora: Some(LoraRequest::new(adapter)), prompt: prompt.clone(), params: SamplingParams::greedy(1) };
    let t = Instant::now();
    engine.generate(std::slice::from_ref(&req)).map_err(engine_error("generating"))?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// Runs the scenario on `ctx.model` over `tasks` (from [`inputs`]).
pub fn measure(ctx: &BenchContext, s: &RouteSettings, tasks: Vec<LabelledTask>, progress: &dyn Fn(&str)) -> Result<RouteResult, BenchError> {
    let model: &ModelLocation = ctx.model.as_ref().ok_or_else(|| BenchError::Invalid("route needs a model".into()))?;
    progress("loading the model and the task adapters");
    let options = EngineOptions { lora: LoraLimits { max_loras: tasks.len(), ..LoraLimits::default() }, ..EngineOptions::default() };
    let mut engine = Engine::load(model, &options).map_err(engine_error("loading the model"))?;
    for lt in &tasks {
        engine.loras_mut().load(&lt.task.name, &lt.task.dir).map_err(|e| BenchError::Invalid(format!("{}: {e}", lt.task.dir.display())))?;
    }
    let names: Vec<String> = tasks.iter().map(|t| t.task.name.clone()).collect();
    let model_id = model.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut notes = Vec::new();
    let mut candidates = Vec::new();
    for &layer in &s.layers {
        progress(&format!("embedding the examples: base model, layer {layer}"));
        let view = Arc::new(engine.model().base_view());
        let embedder = Arc::new(BaseEmbedder::with_layer(view, engine.input().clone(), &model_id, layer, Pooling::MeanSkipFirst));
        let layer = embedder.layer();
        candidates.push(candidate(format!("base, layer {layer}"), Some(layer), embedder, &tasks)?);
    }
    match resolve_folder_model(&s.router_model) {
        Ok(dir) => {
            progress(&format!("embedding the examples: {}", s.router_model));
            let embedder = SentenceEmbedder::load(&dir, engine.model().device()).map_err(engine_error("loading the sentence model"))?;
            candidates.push(candidate(s.router_model.clone(), None, Arc::new(embedder), &tasks)?);
        }
        Err(e) => notes.push(format!("sentence-embedding router not measured: {e}")),
    }
    // Warm every adapter and kernel once, so no figure carries a first-call cost.
    let first = Prompt::Chat(vec![ChatMessage::user(tasks[0].heldout[0].prompt.clone())]);
    for n in &names {
        ttft_ms(&mut engine, n, &first)?;
    }
    for c in &candidates {
        route_once(c, &Prompt::Chat(vec![ChatMessage::user("warm up")]), &names)?;
    }
    let mut ttfts = Vec::new();
    for (ti, lt) in tasks.iter().enumerate() {
        progress(&format!("routing the held-out prompts of {}", lt.task.name));
        for item in &lt.heldout {
            let prompt = Prompt::Chat(vec![ChatMessage::user(item.prompt.clone())]);
            // Paired: each router's time against the TTFT measured right beside it.
            let ttft = ttft_ms(&mut engine, &lt.task.name, &prompt)?;
            ttfts.push(ttft);
            for c in candidates.iter_mut() {
                let (pick, margin, ms) = route_once(c, &prompt, &names)?;
                c.picks.push((ti, pick, margin));
                c.times_ms.push(ms);
                c.ratios.push(ms / ttft);
            }
        }
    }
    let mut routers = Vec::new();
    for c in &candidates {
        let mut off_topic_unsure = 0;
        for text in OFF_TOPIC {
            let (_, margin, _) = route_once(c, &Prompt::Chat(vec![ChatMessage::user(text)]), &names)?;
            off_topic_unsure += usize::from(margin < s.min_confidence);
        }
        routers.push(summarise(c, names.len(), s.min_confidence, off_topic_unsure));
    }
    Ok(RouteResult {
        metadata: Metadata::new("route", ctx, &s.model, "in-process engine (no server)"),
        settings: s.clone(),
        tasks: names,
        examples_per_task: tasks.iter().map(|t| t.examples.examples.len()).collect(),
        heldout_per_task: tasks.iter().map(|t| t.heldout.len()).collect(),
        ttft_p50_ms: pct(&ttfts, 50.0),
        routers,
        notes,
    })
}

fn summarise(c: &Candidate, n_tasks: usize, min_confidence: f32, off_topic_unsure: usize) -> RouterRun {
    let mut confusion = vec![vec![0; n_tasks]; n_tasks];
    for &(truth, pick, _) in &c.picks {
        confusion[truth][pick] += 1;
    }
    let correct = c.picks.iter().filter(|p| p.0 == p.1).count();
    let total = c.picks.len();
    let margins: Vec<f64> = c.picks.iter().filter(|p| p.0 == p.1).map(|p| p.2 as f64).collect();
    let unsure = c.picks.iter().filter(|p| p.2 < min_confidence).count();
    RouterRun {
        router: c.name.clone(),
        layer: c.layer,
        accuracy: correct as f64 / total.max(1) as f64,
        correct,
        total,
        confusion,
        median_margin_correct: pct(&margins, 50.0),
        heldout_fallback_share: unsure as f64 / total.max(1) as f64,
        off_topic_fallback_share: off_topic_unsure as f64 / OFF_TOPIC.len() as f64,
        p50_ms: pct(&c.times_ms, 50.0),
        p99_ms: pct(&c.times_ms, 99.0),
        examples_ms: c.examples_ms,
        ttft_overhead_median: pct(&c.ratios, 50.0),
        ttft_overhead_p90: pct(&c.ratios, 90.0),
    }
}
