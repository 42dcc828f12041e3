//! The scheduler: which sequences run in each forward pass. One scheduler serves every
//! caller (the server's batch loop, `loramux generate`, the engine benchmark), so what is
//! measured is what is served.
//!
//! Requests flow one way: [`Scheduler::add_request`] puts a processed request in the
//! bounded waiting queue; each [`Scheduler::step`] expires deadlines, admits waiting
//! requests in fair-share order ([`fair`]: first come first served without clients) within
//! the limits ([`admission`]: sequences, KV-cache
//! blocks, adapter readiness from the [`crate::lora::LoraManager`]), plans the pass under
//! the token budget with decode rows first and prefill chunks after (under fair share, the
//! prompts of clients within their share of rows first), preempting the newest
//! sequence while the KV budget would overflow ([`budget`]), runs it with failures isolated
//! to the adapter group that caused them ([`batch`]), and reports each request's new text,
//! end or error as [`RequestOutput`]s.

mod admission;
mod batch;
mod budget;
mod config;
pub mod fair;
mod gate;
pub mod latency;
mod merge;
mod offline;
#[cfg(test)]
mod tests;

pub use config::{defaults, SchedulerConfig};
pub use fair::SchedulingPolicy;
pub use gate::{AdmissionGate, AdmissionTicket, Demand};

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::Engine;
use crate::sequence::{Completion, Sequence};
use crate::error::{EngineError, Result};
use crate::input::ProcessedRequest;
use crate::kv::KV_BLOCK_TOKENS;
use crate::lora::{InsertOutcome, LoraModel, UnloadOutcome};
use crate::sampling::SampledToken;

/// A caller's handle on one request.
pub type RequestId = u64;

/// What happened to a request in a step.
#[derive(Debug)]
pub enum RequestEvent {
    /// It joined the running batch.
    Started { prompt_tokens: usize },
    /// New tokens: the text that can no longer change, and the tokens' log-probabilities
    /// when asked for.
    Output { text: String, new_tokens: usize, logprobs: Vec<SampledToken> },
    /// It ended; `completion.text` is the whole output (already sent in `Output`s).
    Finished { completion: Box<Completion> },
    /// It failed before or during generation; its memory is freed.
    Failed(Arc<EngineError>),
}

/// One event of one request.
#[derive(Debug)]
pub struct RequestOutput {
    pub id: RequestId,
    pub event: RequestEvent,
}

/// The forward pass a step ran.
#[derive(Clone, Copy, Debug)]
pub struct BatchStats {
    /// Sequences in the pass.
    pub seqs: usize,
    /// Token rows run.
    pub rows: usize,
    /// Rows that were one decode token each (the rest were prefill).
    pub decode_rows: usize,
    /// Wall time of the pass.
    pub seconds: f64,
}

/// What one step did.
#[derive(Debug, Default)]
pub struct StepReport {
    pub outputs: Vec<RequestOutput>,
    /// The pass, if one ran.
    pub batch: Option<BatchStats>,
    /// Sequences whose cache was dropped for lack of KV memory in this step.
    pub preemptions: usize,
    /// Adapters read off the loop since the last step, with their read time.
    pub adapters_loaded: Vec<(String, f64)>,
    /// Adapter reads that failed since the last step.
    pub adapter_load_failures: usize,
    /// Adapters folded into the weights in this step, with the seconds it took.
    pub merges: Vec<(String, f64)>,
    /// Adapters unfolded in this step, with the seconds it took.
    pub unmerges: Vec<(String, f64)>,
}

struct Waiting {
    /// Its place in the queue, freed when it leaves the queue in any way (for a request
    /// that starts, once the step that started it has told the gate).
    ticket: AdmissionTicket,
    id: RequestId,
    request: ProcessedRequest,
    deadline: Option<Instant>,
    /// When the request first found every adapter slot pinned.
    blocked_since: Option<Instant>,
}

struct Running {
    id: RequestId,
    seq: Sequence,
    /// The client it is served for (charged for each token generated).
    share: Option<crate::input::FairShare>,
    deadline: Option<Instant>,
    /// Output tokens and logprobs already reported.
    sent_tokens: usize,
    sent_logprobs: usize,
    /// Cache dropped for lack of KV memory; recomputed when it fits again.
    preempted: bool,
}

/// Waiting and running requests of one engine, and the limits they run under.
pub struct Scheduler {
    cfg: SchedulerConfig,
    gate: Arc<AdmissionGate>,
    rate_window: RateWindow,
    budget_blocks: usize,
    block_bytes: usize,
    waiting: VecDeque<Waiting>,
    running: Vec<Running>,
    /// Events produced outside a step (unloads, aborts), delivered with the next one.
    pending: Vec<RequestOutput>,
    /// Fault injection for tests: an adapter name whose admission panics.
    panic_on_admit: Option<String>,
    merge: merge::MergeState,
    /// Weighted service per client: who is admitted next.
    fair: fair::VirtualCounters,
    /// The fitted step time: how many rows and prefill tokens keep `target_tpot`.
    step_model: latency::StepModel,
    /// Prompt tokens of started requests, output tokens of finished ones (all, and those
    /// that stopped by themselves before `max_tokens`) and prefill tokens per step,
    /// averaged: the batch a TPOT target allows, and what the gate's TTFT estimate expects
    /// of the requests ahead and of the next steps.
    typical_prompt: Ewma,
    typical_output: Ewma,
    natural_output: Ewma,
    prefill_per_step: Ewma,
    /// Wall time of recent steps, averaged over a few: the estimate's floor when the
    /// machine is slower right now than the fit (which remembers ~200 steps) says.
    recent_step_seconds: Ewma,
    /// Places of the requests started this step, freed when the gate hears of the step: a
    /// newcomer meanwhile counts them as waiting, never as neither waiting nor running.
    started_tickets: Vec<AdmissionTicket>,
}

/// An exponential moving average (0 until the first value).
#[derive(Clone, Copy, Debug, Default)]
struct Ewma(f64);

impl Ewma {
    fn add(&mut self, x: f64, weight: f64) {
        self.0 = if self.0 == 0.0 { x } else { (1.0 - weight) * self.0 + weight * x };
    }
}

/// Requests started since `since`, and whether some request waited all along (the window
/// measures capacity only then).
struct RateWindow {
    since: Instant,
    started: usize,
    saturated: bool,
}

/// How long a start-rate measurement runs.
const RATE_WINDOW: Duration = Duration::from_millis(500);

fn failed(id: RequestId, e: EngineError) -> RequestOutput {
    RequestOutput { id, event: RequestEvent::Failed(Arc::new(e)) }
}

impl Scheduler {
    /// A scheduler for `engine` under `cfg`; refuses a KV budget that cannot hold one
    /// sequence of the model's maximum length, and whole-prompt prefill with a token budget
    /// smaller than the longest prompt.
    pub fn new(cfg: SchedulerConfig, engine: &Engine) -> Result<Self> {
        let block_bytes = engine.kv_floats_per_token() * std::mem::size_of::<f32>() * KV_BLOCK_TOKENS;
        let budget_blocks = cfg.kv_cache_bytes / block_bytes.max(1);
        let max_model_len = engine.max_model_len();
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        if budget_blocks < budget::blocks(max_model_len) {
            return Err(EngineError::Config(format!(
                "the KV cache budget ({:.2} GiB) cannot hold one sequence of the maximum model length {max_model_len} \
                 ({:.2} GiB): raise --kv-cache-gib or lower --max-model-len",
                gib(cfg.kv_cache_bytes),
                gib(budget::blocks(max_model_len) * block_bytes)
            )));
        }
        if !cfg.enable_chunked_prefill && cfg.max_num_batched_tokens < max_model_len {
            return Err(EngineError::Config(format!(
                "without chunked prefill a prompt runs whole in one pass: --max-num-batched-tokens ({}) must be at least \
                 the maximum model length ({max_model_len})",
                cfg.max_num_batched_tokens
            )));
        }
        if cfg.max_num_seqs == 0 || cfg.max_num_batched_tokens == 0 || cfg.max_waiting == 0 {
            return Err(EngineError::Config("max_num_seqs, max_num_batched_tokens and max_waiting must be positive".into()));
        }
        Ok(Self {
            gate: AdmissionGate::new(cfg.max_waiting, cfg.max_queue_delay, cfg.target_ttft, cfg.max_num_seqs.div_ceil(4)),
            rate_window: RateWindow { since: Instant::now(), started: 0, saturated: true },
            cfg,
            budget_blocks,
            block_bytes,
            waiting: VecDeque::new(),
            running: Vec::new(),
            pending: Vec::new(),
            panic_on_admit: None,
            merge: merge::MergeState::default(),
            fair: fair::VirtualCounters::default(),
            step_model: latency::StepModel::default(),
            typical_prompt: Ewma::default(),
            typical_output: Ewma::default(),
            natural_output: Ewma::default(),
            prefill_per_step: Ewma::default(),
            recent_step_seconds: Ewma::default(),
            started_tickets: Vec::new(),
        })
    }

    /// Makes admitting a request on adapter `name` panic (fault-injection tests only).
    #[doc(hidden)]
    pub fn inject_admission_panic(&mut self, name: Option<String>) {
        self.panic_on_admit = name;
    }

    /// The waiting queue's bound, for threads that submit requests.
    pub fn admission_gate(&self) -> &Arc<AdmissionGate> {
        &self.gate
    }

    /// The limits in force.
    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Queues a request that holds a place from [`AdmissionGate::try_enter`]. Refused when
    /// its adapter is unknown (checked by the adapter manager, the one place that knows).
    pub fn add_request(
        &mut self,
        engine: &mut Engine,
        ticket: AdmissionTicket,
        id: RequestId,
        request: ProcessedRequest,
        deadline: Option<Instant>,
    ) -> Result<()> {
        if let Some(l) = request.lora() {
            engine.loras_mut().resolve(&l.lora_name)?;
        }
        self.fair.arrive(request.share(), self.waiting.iter().map(|w| w.request.share()));
        self.waiting.push_back(Waiting { ticket, id, request, deadline, blocked_since: None });
        Ok(())
    }

    /// Drops a request whose caller went away, freeing its memory. Returns whether it was here.
    pub fn abort(&mut self, engine: &mut Engine, id: RequestId) -> bool {
        if let Some(i) = self.waiting.iter().position(|w| w.id == id) {
            self.waiting.remove(i);
            return true;
        }
        if let Some(i) = self.running.iter().position(|r| r.id == id) {
            let mut r = self.running.swap_remove(i);
            engine.finish_sequence(&mut r.seq);
            return true;
        }
        false
    }

    /// Drops every request (shutdown), freeing their memory; returns their ids so the
    /// caller can tell each why.
    pub fn abort_all(&mut self, engine: &mut Engine) -> Vec<RequestId> {
        let mut ids: Vec<RequestId> = self.waiting.drain(..).map(|w| w.id).collect();
        for mut r in self.running.drain(..) {
            engine.finish_sequence(&mut r.seq);
            ids.push(r.id);
        }
        ids
    }

    /// Loads an adapter read off the loop (vLLM's `load_lora_adapter`).
    pub fn load_adapter(&mut self, engine: &mut Engine, model: LoraModel, seconds: f64, replace: bool) -> Result<InsertOutcome> {
        if replace {
            let name = model.name.clone();
            self.unmerge_if(engine, &name);
        }
        engine.loras_mut().add(model, seconds, replace)
    }

    /// Unloads an adapter (vLLM's `unload_lora_adapter`): running requests on it finish,
    /// waiting ones fail as for an unknown model.
    pub fn unload_adapter(&mut self, engine: &mut Engine, name: &str) -> Result<UnloadOutcome> {
        self.unmerge_if(engine, name);
        let outcome = engine.loras_mut().unload(name)?;
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        for w in self.waiting.drain(..) {
            if w.request.lora().is_some_and(|l| l.lora_name == name) {
                self.pending.push(failed(w.id, EngineError::UnknownAdapter(name.to_string())));
            } else {
                kept.push_back(w);
            }
        }
        self.waiting = kept;
        Ok(outcome)
    }

    /// Requests waiting to run: queued, or preempted and waiting for KV memory (as vLLM
    /// counts them, so gateways read the same thing from either).
    pub fn num_waiting(&self) -> usize {
        self.waiting.len() + self.running.iter().filter(|r| r.preempted).count()
    }

    /// The fitted step time, once enough steps ran ([`latency`]).
    pub fn step_coefficients(&self) -> Option<latency::StepCoefficients> {
        self.step_model.coefficients()
    }

    /// Most sequences the batch may hold now: `max_num_seqs`, or fewer while the fitted step
    /// time says more, with the prefill that keeps them replaced, would break `target_tpot`.
    fn batch_limit(&self) -> usize {
        match (self.cfg.target_tpot, self.step_model.coefficients()) {
            (Some(t), Some(c)) => {
                let prefill_per_output = if self.typical_output.0 > 0.0 { self.typical_prompt.0 / self.typical_output.0 } else { 0.0 };
                self.cfg.max_num_seqs.min(c.balanced_rows(latency::planned_step(t), prefill_per_output))
            }
            _ => self.cfg.max_num_seqs,
        }
    }

    /// Tells the admission gate what its TTFT estimate needs (once the step time is fitted):
    /// the rows, the steps until one frees, a step's predicted time and prefill.
    fn publish_outlook(&self) {
        let Some(c) = self.step_model.coefficients() else { return };
        let rows = self.batch_limit();
        let active = || self.running.iter().filter(|r| !r.preempted);
        let running = active().count();
        let natural = self.natural_output.0;
        let first_free_steps = active()
                .map(|r| {
                    let done = r.seq.output_ids.len() as f64;
                    let expected = if natural > 0.0 { natural.max(done + 1.0) } else { f64::INFINITY };
                    expected.min(r.seq.params().max_tokens.unwrap_or(usize::MAX) as f64) - done
                })
                .fold(f64::INFINITY, f64::min);
        let prefill = self.prefill_budget(rows);
        let pending_prefill_tokens = active().map(|r| r.seq.pending_len()).filter(|&n| n > 1).sum();
        self.gate.publish(&gate::Outlook {
            rows,
            running,
            pending_prefill_tokens,
            first_free_steps: first_free_steps.max(0.0),
            step_seconds: c.predict(rows, self.prefill_per_step.0.min(prefill as f64).round() as usize).max(self.recent_step_seconds.0),
            prefill_tokens_per_step: prefill as f64,
            natural_output: natural,
        });
    }

    /// Each client's weighted service so far ([`fair`]), by name ("" for requests without one).
    pub fn fair_counters(&self) -> impl Iterator<Item = (&str, f64)> + '_ {
        self.fair.iter()
    }

    /// Requests in the running batch (preempted ones excluded).
    pub fn num_running(&self) -> usize {
        self.running.iter().filter(|r| !r.preempted).count()
    }

    /// Whether any request is waiting or running.
    pub fn has_unfinished(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Whether the next step has a pass to run (else callers may sleep until a request comes).
    pub fn has_runnable(&self) -> bool {
        self.running.iter().any(|r| !r.preempted) || !self.pending.is_empty()
    }

    /// KV-cache bytes the running sequences hold, and the budget.
    pub fn kv_usage_bytes(&self) -> (usize, usize) {
        let used: usize = self.running.iter().map(|r| budget::cache_blocks(&r.seq)).sum();
        (used * self.block_bytes, self.budget_blocks * self.block_bytes)
    }

    /// Adapter names of running requests, sorted, each once.
    pub fn running_adapters(&self) -> Vec<&str> {
        sorted_names(self.running.iter().filter(|r| !r.preempted).filter_map(|r| r.seq.lora()).map(|l| l.lora_name.as_str()))
    }

    /// Adapter names of waiting requests, sorted, each once.
    pub fn waiting_adapters(&self) -> Vec<&str> {
        let preempted = self.running.iter().filter(|r| r.preempted).filter_map(|r| r.seq.lora());
        sorted_names(self.waiting.iter().filter_map(|w| w.request.lora()).chain(preempted).map(|l| l.lora_name.as_str()))
    }

    /// One scheduling iteration: adapter reads, deadlines, admission, one forward pass, and
    /// every request's news.
    pub fn step(&mut self, engine: &mut Engine) -> StepReport {
        let mut report = StepReport { outputs: std::mem::take(&mut self.pending), ..StepReport::default() };
        let loads = engine.loras_mut().poll_loads();
        report.adapters_loaded = loads.loaded;
        report.adapter_load_failures = loads.failed.len();
        for (name, e) in loads.failed {
            tracing::warn!(adapter = %name, "adapter failed to load: {e}");
            self.fail_waiting_on(&name, &e, &mut report.outputs);
        }
        let now = Instant::now();
        self.expire(engine, now, &mut report.outputs);
        let running_before = self.running.len();
        self.admit(engine, &mut report.outputs);
        self.measure_start_rate(now, self.running.len() - running_before);
        report.preemptions = self.preempt_to_fit();
        self.steer_merge(engine, &mut report);
        self.run_batch(engine, &mut report);
        if let Some(b) = &report.batch {
            self.prefill_per_step.add((b.rows - b.decode_rows) as f64, 0.05);
            self.recent_step_seconds.add(b.seconds, 0.2);
        }
        if self.cfg.target_ttft.is_some() {
            self.publish_outlook();
        }
        self.started_tickets.clear();
        report
    }

    fn measure_start_rate(&mut self, now: Instant, started: usize) {
        let w = &mut self.rate_window;
        w.started += started;
        w.saturated &= !self.waiting.is_empty();
        let elapsed = now.duration_since(w.since);
        if elapsed >= RATE_WINDOW {
            if w.saturated && w.started > 0 {
                self.gate.observe_start_rate(w.started as f64 / elapsed.as_secs_f64());
            }
            *w = RateWindow { since: now, started: 0, saturated: !self.waiting.is_empty() };
        }
    }

    fn fail_waiting_on(&mut self, adapter: &str, e: &Arc<EngineError>, outputs: &mut Vec<RequestOutput>) {
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        for w in self.waiting.drain(..) {
            if w.request.lora().is_some_and(|l| l.lora_name == adapter) {
                outputs.push(RequestOutput { id: w.id, event: RequestEvent::Failed(e.clone()) });
            } else {
                kept.push_back(w);
            }
        }
        self.waiting = kept;
    }

    /// Fails requests whose deadline passed, freeing their memory.
    fn expire(&mut self, engine: &mut Engine, now: Instant, outputs: &mut Vec<RequestOutput>) {
        let late = |d: Option<Instant>| d.is_some_and(|d| now >= d);
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        for w in self.waiting.drain(..) {
            if late(w.deadline) {
                outputs.push(failed(w.id, EngineError::DeadlineExceeded("the request waited past its deadline".into())));
            } else {
                kept.push_back(w);
            }
        }
        self.waiting = kept;
        let mut i = 0;
        while i < self.running.len() {
            if late(self.running[i].deadline) {
                let mut r = self.running.swap_remove(i);
                engine.finish_sequence(&mut r.seq);
                outputs.push(failed(r.id, EngineError::DeadlineExceeded("generation ran past the request's deadline".into())));
            } else {
                i += 1;
            }
        }
    }

}

fn sorted_names<'a>(names: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut v: Vec<&str> = names.collect();
    v.sort_unstable();
    v.dedup();
    v
}
