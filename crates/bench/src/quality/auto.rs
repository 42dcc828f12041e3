//! The `auto` configuration (issue #20, end to end): every held-out item of every task sent
//! as `model: "auto"` would be. The semantic router (the server's default: the base model's
//! own states, [`BaseEmbedder`]) picks among all the tasks' adapters by their `routing.json`
//! examples; an unsure pick (margin under the default `--router-min-confidence`) goes to the
//! base, as `serve` does with no `--router-fallback`. Each item is then answered greedily by
//! what was picked, and scored against the references as the other configurations are, so
//! `auto` reads beside `oracle` (the right adapter named by hand: the `unmerged` rows) and
//! `base`.

use std::sync::Arc;

use loramux_engine::routing::{read_routing_file, BaseEmbedder, Router, RouterConfig};
use loramux_engine::{Engine, LoraRequest, Request, SamplingParams};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::eval::chat;
use super::inputs::{Item, Task};
use super::{load_adapter, unload_adapter, TaskResult, Variant};
use crate::{engine_error, BenchError};

/// One task's items sent to `auto`.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct AutoTask {
    pub task: String,
    pub items: usize,
    /// Items the router sent to this task's adapter.
    pub routed_right: usize,
    /// Items under the confidence threshold, answered by the base.
    pub fell_back: usize,
    /// Exact match of the answers of whatever `auto` picked.
    pub exact_match_auto: f64,
    /// The task's adapter named by hand (the `unmerged` configuration).
    pub exact_match_oracle: f64,
    /// The base model alone.
    pub exact_match_base: f64,
}

/// `auto` over every task.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct AutoResult {
    /// The router: `base, layer N`.
    pub router: String,
    pub min_confidence: f32,
    pub tasks: Vec<AutoTask>,
    /// Over all items: share routed to the right adapter, and the three exact matches.
    pub routed_right_share: f64,
    pub exact_match_auto: f64,
    pub exact_match_oracle: f64,
    pub exact_match_base: f64,
}

/// Routes and answers every item; `measured` gives the oracle and base figures.
pub(super) fn measure(
    engine: &mut Engine,
    tasks: &[(Task, Vec<Item>)],
    measured: &[TaskResult],
    max_tokens: &[usize],
) -> Result<Option<AutoResult>, BenchError> {
    let embedder = Arc::new(BaseEmbedder::new(Arc::new(engine.model().base_view()), engine.input().clone(), "quality"));
    let router_name = format!("base, layer {}", embedder.layer());
    let router = Router::new(embedder, RouterConfig::default(), None);
    for (task, _) in tasks {
        let Some(spec) = read_routing_file(&task.dir).map_err(|e| BenchError::Invalid(e.to_string()))? else {
            return Ok(None);
        };
        router.insert(&task.name, router.prepare(&spec).map_err(engine_error("embedding routing examples"))?);
    }
    // (the pick, task index, item index); a `None` pick: the base.
    let mut picks: Vec<(Option<String>, usize, usize)> = Vec::new();
    for (ti, (_, items)) in tasks.iter().enumerate() {
        for (ii, item) in items.iter().enumerate() {
            let d = router.route(&chat(item), &|_| true).map_err(engine_error("routing"))?;
            let pick = d.best().filter(|_| !d.fallback).map(|b| b.0.clone());
            picks.push((pick, ti, ii));
        }
    }
    let mut correct: Vec<Vec<bool>> = tasks.iter().map(|(_, items)| vec![false; items.len()]).collect();
    let mut targets: Vec<Option<String>> = picks.iter().map(|p| p.0.clone()).collect();
    targets.sort();
    targets.dedup();
    for target in targets {
        let group: Vec<&(Option<String>, usize, usize)> = picks.iter().filter(|p| p.0 == target).collect();
        if let Some(name) = &target {
            let dir = &tasks.iter().find(|(t, _)| &t.name == name).expect("picked among the tasks").0.dir;
            load_adapter(engine, name, dir)?;
        }
        let requests: Vec<Request> = group
            .iter()
            .map(|&&(_, ti, ii)| Request {
                lora: target.as_deref().map(LoraRequest::new),
                prompt: chat(&tasks[ti].1[ii]),
                params: SamplingParams::greedy(max_tokens[ti]),
            })
            .collect();
        let answers = engine.generate(&requests);
        if let Some(name) = &target {
            unload_adapter(engine, name);
        }
        for (&&(_, ti, ii), answer) in group.iter().zip(&answers.map_err(engine_error("generating answers"))?) {
            correct[ti][ii] = answer.text.trim() == tasks[ti].1[ii].answer;
        }
    }
    let mut out = Vec::new();
    for (ti, (task, items)) in tasks.iter().enumerate() {
        let of_task = || picks.iter().filter(move |p| p.1 == ti);
        let em = |v: Variant| measured[ti].variant(v).map_or(0.0, |r| r.quality.exact_match);
        out.push(AutoTask {
            task: task.name.clone(),
            items: items.len(),
            routed_right: of_task().filter(|p| p.0.as_deref() == Some(task.name.as_str())).count(),
            fell_back: of_task().filter(|p| p.0.is_none()).count(),
            exact_match_auto: correct[ti].iter().filter(|c| **c).count() as f64 / items.len().max(1) as f64,
            exact_match_oracle: em(Variant::Unmerged),
            exact_match_base: em(Variant::Base),
        });
    }
    let n: usize = out.iter().map(|t| t.items).sum();
    let weighted = |f: fn(&AutoTask) -> f64| out.iter().map(|t| f(t) * t.items as f64).sum::<f64>() / n.max(1) as f64;
    Ok(Some(AutoResult {
        router: router_name,
        min_confidence: router.config().min_confidence,
        routed_right_share: out.iter().map(|t| t.routed_right).sum::<usize>() as f64 / n.max(1) as f64,
        exact_match_auto: weighted(|t| t.exact_match_auto),
        exact_match_oracle: weighted(|t| t.exact_match_oracle),
        exact_match_base: weighted(|t| t.exact_match_base),
        tasks: out,
    }))
}
