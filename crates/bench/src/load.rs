//! `loramux bench load`: an open-loop load generator. Requests arrive as a Poisson process
//! at each given rate whether or not earlier ones have finished (as real users do), each
//! for an adapter drawn uniformly or by Zipf popularity, with prompt and output lengths
//! drawn from ranges. Reports throughput, time to first token, inter-token and end-to-end
//! latency percentiles, and goodput: requests per second that met the latency SLO.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::client::{ChatRequest, Sample};
use crate::plot::{self, Series};
use crate::run::{self, fmt_opt, BenchContext, Metadata, Report, TargetArgs};
use crate::stats::{self, Summary};
use crate::BenchError;

/// How requests pick their adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Popularity {
    Uniform,
    Zipf,
}

/// Settings of the load scenario.
#[derive(Args, Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct LoadSettings {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Arrival rates to sweep, requests per second (Poisson).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub rates: Vec<f64>,
    /// Seconds of arrivals per rate.
    #[arg(long, default_value_t = 20.0)]
    pub duration: f64,
    /// Models to address (adapter names, or the base's); default: every adapter the server lists.
    #[arg(long, value_delimiter = ',')]
    pub adapters: Vec<String>,
    #[arg(long, value_enum, default_value = "uniform")]
    pub popularity: Popularity,
    #[arg(long, default_value_t = 1.0)]
    pub zipf_alpha: f64,
    /// Prompt length in words, uniform in MIN:MAX.
    #[arg(long, default_value = "8:64")]
    pub prompt_words: String,
    /// Output tokens, uniform in MIN:MAX (generated exactly: ignore_eos).
    #[arg(long, default_value = "16:64")]
    pub output_tokens: String,
    /// SLO on time to first token, ms.
    #[arg(long, default_value_t = 1000.0)]
    pub slo_ttft_ms: f64,
    /// SLO on mean time per output token after the first, ms.
    #[arg(long, default_value_t = 100.0)]
    pub slo_tpot_ms: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Prompts from task adapters' held-out sets (<DIR>/<task>/heldout.jsonl) instead of random
    /// words, each request addressed to its task's adapter (start the server with those
    /// adapters, e.g. --server-arg=--lora-dir=adapters/tasks).
    #[arg(long, value_name = "DIR")]
    #[serde(default)]
    pub task_prompts: Option<PathBuf>,
    /// With --task-prompts: send every request as `model: "auto"` (the semantic router picks),
    /// the same prompts, arrivals and lengths as without it.
    #[arg(long, requires = "task_prompts")]
    #[serde(default)]
    pub auto: bool,
}

/// One rate's measurements.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct LoadPoint {
    pub rate_req_per_sec: f64,
    pub requests: usize,
    /// Failed requests, refusals included.
    pub errors: usize,
    /// Requests the server refused at once (HTTP 429: a full queue, a latency target).
    #[serde(default)]
    pub refused: usize,
    /// From the first arrival to the last completion.
    pub wall_s: f64,
    pub throughput_req_per_sec: f64,
    pub output_tokens_per_sec: f64,
    /// Requests per second that succeeded within both SLOs.
    pub goodput_req_per_sec: f64,
    pub slo_attainment: f64,
    pub ttft: Option<Summary>,
    pub tpot: Option<Summary>,
    pub itl: Option<Summary>,
    pub e2e: Option<Summary>,
    pub samples: Vec<Sample>,
}

/// The load scenario's result file.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct LoadResult {
    pub metadata: Metadata,
    pub settings: LoadSettings,
    /// The models requests were spread over.
    pub models: Vec<String>,
    pub points: Vec<LoadPoint>,
}

fn parse_range(s: &str, what: &str) -> Result<(usize, usize), BenchError> {
    let bad = || BenchError::Invalid(format!("{what} '{s}': expected MIN:MAX with 1 <= MIN <= MAX"));
    let (a, b) = s.split_once(':').unwrap_or((s, s));
    let (a, b): (usize, usize) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
    if a == 0 || a > b {
        return Err(bad());
    }
    Ok((a, b))
}

const WORDS: &[&str] = &[
    "the", "river", "signal", "market", "quiet", "engine", "garden", "winter", "carbon", "letter", "summit", "orbit",
    "harbor", "pattern", "silver", "thunder", "valley", "window", "anchor", "ballad", "canyon", "desert", "ember",
    "forest", "glacier", "horizon", "island", "jungle", "lantern", "meadow", "nectar", "ocean",
];

/// A prompt of `words` words drawn from a small vocabulary: the load scenario's requests
/// (and the engine benchmark's replay of them).
pub(crate) fn prompt(rng: &mut StdRng, words: usize) -> String {
    let body: Vec<&str> = (0..words).map(|_| WORDS[rng.random_range(0..WORDS.len())]).collect();
    format!("Continue this text: {}", body.join(" "))
}

/// Runs the scenario.
pub async fn measure(ctx: &BenchContext, s: &LoadSettings) -> Result<LoadResult, BenchError> {
    // NaN fails every comparison, so it is named: `!(x > 0.0)` said the same, less plainly.
    if s.rates.is_empty() || s.rates.iter().any(|r| !r.is_finite() || *r <= 0.0) || s.duration.is_nan() || s.duration <= 0.0 {
        return Err(BenchError::Invalid("--rates must be positive numbers and --duration positive".into()));
    }
    let words = parse_range(&s.prompt_words, "--prompt-words")?;
    let outputs = parse_range(&s.output_tokens, "--output-tokens")?;
    let tasks = match &s.task_prompts {
        Some(dir) => crate::quality::inputs::find_tasks(dir, &s.adapters)?
            .into_iter()
            .map(|t| Ok((t.name.clone(), crate::quality::inputs::read_heldout(&t.heldout, None)?)))
            .collect::<Result<Vec<_>, BenchError>>()?,
        None => Vec::new(),
    };
    let conn = run::connect(ctx, &s.target, "load", &[]).await?;
    let models = if !tasks.is_empty() {
        let names: Vec<String> = tasks.iter().map(|t| t.0.clone()).collect();
        conn.endpoint.require_models(&names.iter().map(String::as_str).collect::<Vec<_>>()).await?;
        names
    } else if s.adapters.is_empty() {
        let all = conn.endpoint.models().await?;
        let adapters: Vec<String> = all.iter().filter(|m| **m != conn.base_model).cloned().collect();
        if adapters.is_empty() { vec![conn.base_model.clone()] } else { adapters }
    } else {
        let wanted: Vec<&str> = s.adapters.iter().map(String::as_str).collect();
        conn.endpoint.require_models(&wanted).await?;
        s.adapters.clone()
    };
    let metadata = Metadata::new("load", ctx, &conn.base_model, &conn.server);
    let expected: usize = s.rates.iter().map(|r| (r * s.duration).ceil() as usize).sum();
    let bar = run::progress(expected, "load");
    let mut points = Vec::new();
    let mut rng = StdRng::seed_from_u64(s.seed);
    for &rate in &s.rates {
        bar.set_message(format!("{rate} req/s"));
        // Arrival times and requests are drawn before sending, so sending never waits on drawing.
        let mut at = 0.0f64;
        let mut plan: Vec<(f64, ChatRequest)> = Vec::new();
        loop {
            at += -(1.0 - rng.random::<f64>()).ln() / rate;
            if at >= s.duration {
                break;
            }
            let n_words = rng.random_range(words.0..=words.1);
            plan.push((at, ChatRequest {
                model: String::new(),
                prompt: prompt(&mut rng, n_words),
                max_tokens: rng.random_range(outputs.0..=outputs.1),
                temperature: 0.0,
                ignore_eos: true,
            }));
        }
        let alpha = (s.popularity == Popularity::Zipf).then_some(s.zipf_alpha);
        let picks = run::popularity(plan.len(), models.len(), alpha, rng.random());
        for ((_, req), pick) in plan.iter_mut().zip(picks) {
            req.model = models[pick].clone();
            if let Some((_, items)) = tasks.get(pick) {
                req.prompt = items[rng.random_range(0..items.len())].prompt.clone();
                if s.auto {
                    req.model = "auto".into();
                }
            }
        }
        let start = Instant::now();
        let mut tasks = Vec::with_capacity(plan.len());
        for (i, (offset, req)) in plan.into_iter().enumerate() {
            let (endpoint, bar) = (conn.endpoint.clone(), bar.clone());
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until((start + Duration::from_secs_f64(offset)).into()).await;
                let sample = endpoint.chat(&req, i, start).await;
                bar.inc(1);
                sample
            }));
        }
        let mut samples = Vec::with_capacity(tasks.len());
        for t in tasks {
            if let Ok(sample) = t.await {
                samples.push(sample);
            }
        }
        let wall_s = start.elapsed().as_secs_f64();
        points.push(point(rate, samples, wall_s, s));
    }
    bar.finish_and_clear();
    if let Some(l) = conn.launched {
        l.stop();
    }
    Ok(LoadResult { metadata, settings: s.clone(), models, points })
}

fn point(rate: f64, samples: Vec<Sample>, wall_s: f64, s: &LoadSettings) -> LoadPoint {
    let ok: Vec<&Sample> = samples.iter().filter(|x| x.ok).collect();
    let good = ok
        .iter()
        .filter(|x| x.ttft_ms.is_some_and(|t| t <= s.slo_ttft_ms) && x.tpot_ms().is_none_or(|t| t <= s.slo_tpot_ms))
        .count();
    let collect = |f: &dyn Fn(&Sample) -> Option<f64>| ok.iter().filter_map(|x| f(x)).collect::<Vec<f64>>();
    let itl: Vec<f64> = ok.iter().flat_map(|x| x.itl_ms.iter().copied()).collect();
    let tokens: u64 = ok.iter().filter_map(|x| x.completion_tokens).sum();
    LoadPoint {
        rate_req_per_sec: rate,
        requests: samples.len(),
        errors: samples.len() - ok.len(),
        refused: samples.iter().filter(|x| x.error.as_deref().is_some_and(|e| e.starts_with("HTTP 429"))).count(),
        wall_s,
        throughput_req_per_sec: ok.len() as f64 / wall_s,
        output_tokens_per_sec: tokens as f64 / wall_s,
        goodput_req_per_sec: good as f64 / wall_s,
        slo_attainment: good as f64 / samples.len().max(1) as f64,
        ttft: stats::summarize(&collect(&|x| x.ttft_ms)),
        tpot: stats::summarize(&collect(&|x| x.tpot_ms())),
        itl: stats::summarize(&itl),
        e2e: stats::summarize(&collect(&|x| Some(x.latency_ms))),
        samples,
    }
}

impl Report for LoadResult {
    fn markdown(&self) -> String {
        let m = &self.metadata;
        let st = &self.settings;
        let mut out = format!(
            "# Open-loop load\n\n{} · {} · {} ({} cores) · model {} · server {}\n\n\
             Poisson arrivals for {} s per rate over {} ({:?} popularity{}), {}, {} output tokens; \
             SLO: TTFT ≤ {} ms and TPOT ≤ {} ms.\n\n\
             | Rate (req/s) | Requests | Refused (429) | Other errors | Throughput (req/s) | Tokens/s | Goodput (req/s) | SLO met | TTFT p50/p99 (ms) | TPOT p50/p99 (ms) | ITL p99 (ms) | E2E p50/p99 (ms) |\n\
             |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            m.timestamp, m.machine.hostname, m.machine.cpu_model, m.machine.logical_cores, m.base_model, m.server,
            st.duration, self.models.join(", "), st.popularity,
            if st.popularity == Popularity::Zipf { format!(", alpha {}", st.zipf_alpha) } else { String::new() },
            match (&st.task_prompts, st.auto) {
                (Some(d), true) => format!("held-out prompts of the tasks in {}, each sent as model \"auto\" (the router picks)", d.display()),
                (Some(d), false) => format!("held-out prompts of the tasks in {}, each sent to its task's adapter by name", d.display()),
                (None, _) => format!("prompts of {} words", st.prompt_words),
            },
            st.output_tokens, st.slo_ttft_ms, st.slo_tpot_ms,
        );
        let pair = |s: &Option<Summary>| s.as_ref().map_or("n/a".into(), |s| format!("{:.0} / {:.0}", s.p50, s.p99));
        for p in &self.points {
            out += &format!(
                "| {} | {} | {} | {} | {:.2} | {:.1} | {:.2} | {:.0}% | {} | {} | {} | {} |\n",
                p.rate_req_per_sec,
                p.requests,
                p.refused,
                p.errors - p.refused,
                p.throughput_req_per_sec,
                p.output_tokens_per_sec,
                p.goodput_req_per_sec,
                p.slo_attainment * 100.0,
                pair(&p.ttft),
                pair(&p.tpot),
                fmt_opt(p.itl.as_ref().map(|s| s.p99), 0),
                pair(&p.e2e),
            );
        }
        out
    }

    fn plots(&self, dir: &Path, stem: &str) -> Result<Vec<PathBuf>, BenchError> {
        let series = |name: &str, f: &dyn Fn(&LoadPoint) -> Option<f64>| Series {
            name: name.into(),
            points: self.points.iter().filter_map(|p| Some((p.rate_req_per_sec, f(p)?))).collect(),
        };
        let mut out = plot::line_chart(
            &dir.join(format!("{stem}_throughput")),
            "Throughput and goodput by arrival rate",
            "arrival rate (req/s)",
            "requests/s",
            &[
                series("offered", &|p| Some(p.rate_req_per_sec)),
                series("throughput", &|p| Some(p.throughput_req_per_sec)),
                series("goodput", &|p| Some(p.goodput_req_per_sec)),
            ],
            false,
        )?;
        let lat: Vec<Series> = [
            series("TPOT p99", &|p| p.tpot.as_ref().map(|s| s.p99)),
            series("TTFT p50", &|p| p.ttft.as_ref().map(|s| s.p50)),
            series("TTFT p99", &|p| p.ttft.as_ref().map(|s| s.p99)),
            series("E2E p50", &|p| p.e2e.as_ref().map(|s| s.p50)),
            series("E2E p99", &|p| p.e2e.as_ref().map(|s| s.p99)),
        ]
        .into_iter()
        .filter(|s| !s.points.is_empty())
        .collect();
        if !lat.is_empty() {
            out.extend(plot::line_chart(&dir.join(format!("{stem}_latency")), "Latency by arrival rate", "arrival rate (req/s)", "ms", &lat, false)?);
        }
        Ok(out)
    }
}
