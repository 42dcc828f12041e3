//! The batch loop: a thread that owns the engine and its scheduler, takes commands from
//! handlers, and steps. Each iteration takes every queued command, drops requests whose
//! client went away, runs one scheduler step (admission, one forward pass) and hands the
//! outputs to the [`Emitter`]. A panic anywhere in an iteration ends the loop cleanly:
//! every request gets a 500, `/health` turns 503 and the server process exits non-zero so
//! an orchestrator restarts it, instead of a live HTTP front over a dead engine.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use loramux_engine::lora::{InsertOutcome, LoraModel, UnloadOutcome};
use loramux_engine::panic_message;
use loramux_engine::{Engine, EngineError, Scheduler};
use tokio::sync::mpsc as tmpsc;

use super::emitter::Emitter;
use super::{AdapterEntry, Command, Event, Job, Shared};
use crate::config::Settings;
use crate::error::ApiError;
use crate::metrics::Metrics;

/// How long an idle loop sleeps for a command; with requests waiting (for an adapter
/// read, say) it looks again sooner.
const IDLE_WAIT: Duration = Duration::from_millis(500);
const WAITING_POLL: Duration = Duration::from_millis(5);

pub(super) struct BatchLoop {
    engine: Engine,
    scheduler: Scheduler,
    rx: mpsc::Receiver<Command>,
    shared: Arc<Shared>,
    emitter: Emitter,
    base_name: String,
    drain_deadline: Option<Instant>,
    /// The adapter list changed since it was last published.
    views_dirty: bool,
    /// Evictions, loads and resident adapters when the list was last published: a change
    /// (an adapter unloaded while in use goes when its last request ends, inside a step)
    /// publishes it again.
    last_adapter_state: (u64, u64, usize, u64),
    /// Each adapter's rank as last seen resident, so the list still shows it after an
    /// eviction (forgotten on unload and on a replacing load).
    ranks: HashMap<String, usize>,
}

impl BatchLoop {
    pub fn new(engine: Engine, scheduler: Scheduler, rx: mpsc::Receiver<Command>, shared: Arc<Shared>, metrics: Arc<Metrics>, settings: &Settings) -> Self {
        let emitter = Emitter::new(metrics, engine.input().tokenizer().clone(), settings.lora.max_loras, (settings.target_ttft, settings.target_tpot));
        Self {
            engine,
            scheduler,
            rx,
            shared,
            emitter,
            base_name: settings.served_model_name.clone(),
            drain_deadline: None,
            views_dirty: true,
            last_adapter_state: (0, 0, 0, 0),
            ranks: HashMap::new(),
        }
    }

    /// Serves until drained or every handle is gone; a panic ends the loop with every
    /// request failed and the loop marked dead.
    pub fn run(mut self) {
        loop {
            match std::panic::catch_unwind(AssertUnwindSafe(|| self.iterate())) {
                Ok(true) => {}
                Ok(false) => break,
                Err(panic) => {
                    let message = format!("the batch loop crashed: {}", panic_message(&*panic));
                    tracing::error!("{message}; failing every request and stopping (the process exits non-zero)");
                    self.shared.alive.store(false, Ordering::Relaxed);
                    self.emitter.fail_all(ApiError::internal(message));
                    return;
                }
            }
        }
        self.scheduler.abort_all(&mut self.engine);
        self.emitter.fail_all(ApiError::unavailable("the server is stopping"));
        self.shared.alive.store(false, Ordering::Relaxed);
    }

    /// One iteration; `false` when the loop should end.
    fn iterate(&mut self) -> bool {
        if !self.scheduler.has_runnable() {
            if self.drain_deadline.is_some() && !self.scheduler.has_unfinished() {
                return false;
            }
            // Every handle is gone (the server was dropped without a shutdown): stop.
            if Arc::strong_count(&self.shared) == 1 {
                return false;
            }
            let wait = if self.scheduler.has_unfinished() { WAITING_POLL } else { IDLE_WAIT };
            match self.rx.recv_timeout(wait) {
                Ok(cmd) => self.handle(cmd),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return self.scheduler.has_unfinished(),
            }
        }
        while let Ok(cmd) = self.rx.try_recv() {
            self.handle(cmd);
        }
        if self.drain_deadline.is_some_and(|d| Instant::now() >= d) {
            for id in self.scheduler.abort_all(&mut self.engine) {
                self.emitter.reject(id, ApiError::unavailable("the server is shutting down: request cancelled"));
            }
        }
        for id in self.emitter.cancelled() {
            self.scheduler.abort(&mut self.engine, id);
        }
        let report = self.scheduler.step(&mut self.engine);
        if !report.adapters_loaded.is_empty() || report.adapter_load_failures > 0 || !report.merges.is_empty() || !report.unmerges.is_empty() {
            self.views_dirty = true;
        }
        // Gauges first: a client that got its answer and then scrapes sees the state after it.
        self.update_views();
        self.emitter.deliver(report);
        true
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit { job, ticket, events, arrival } => self.submit(*job, ticket, events, arrival),
            // The published adapter list is brought up to date before the reply, so a client
            // that lists models or sends a request right after sees the change.
            Command::Insert { model, seconds, replace, reply } => {
                self.ranks.remove(&model.name);
                let r = self.insert(*model, seconds, replace);
                self.publish_adapters();
                let _ = reply.send(r);
            }
            Command::Unload { name, reply } => {
                let r = self.unload(&name);
                self.ranks.remove(&name);
                self.publish_adapters();
                let _ = reply.send(r);
            }
            Command::Pin { name, reply } => {
                let r = self.engine.loras_mut().pin(&name).map_err(|e| ApiError::from_engine(&e));
                self.publish_adapters();
                let _ = reply.send(r);
            }
            Command::Drain { deadline } => {
                tracing::info!(
                    running = self.scheduler.num_running(),
                    waiting = self.scheduler.num_waiting(),
                    "draining: no new requests; in-flight ones have until the shutdown timeout"
                );
                self.drain_deadline = Some(deadline);
            }
        }
    }

    fn submit(&mut self, job: Job, ticket: loramux_engine::AdmissionTicket, events: tmpsc::UnboundedSender<Event>, arrival: Instant) {
        if self.drain_deadline.is_some() {
            let _ = events.send(Event::Error(ApiError::unavailable("the server is shutting down")));
            return;
        }
        let id = self.emitter.register(events, job.label, job.tenant, arrival);
        if let Err(e) = self.scheduler.add_request(&mut self.engine, ticket, id, job.request, job.deadline) {
            self.emitter.reject(id, ApiError::from_engine(&e));
        }
    }

    fn insert(&mut self, model: LoraModel, seconds: f64, replace: bool) -> Result<InsertOutcome, ApiError> {
        let name = model.name.clone();
        if name == self.base_name {
            return Err(ApiError::invalid_param("lora_name", format!("'{name}' is the base model's name")));
        }
        let outcome = self.scheduler.load_adapter(&mut self.engine, model, seconds, replace).map_err(|e| match e {
            EngineError::AdapterExists(_) => ApiError::invalid_param("lora_name", e.to_string()).with_code("adapter_exists"),
            e => ApiError::from_engine(&e),
        })?;
        match outcome {
            InsertOutcome::Resident => tracing::info!(adapter = %name, ms = format!("{:.1}", seconds * 1e3), "adapter loaded at run time"),
            InsertOutcome::Registered => tracing::info!(adapter = %name, "adapter registered at run time; resident on first use (all slots busy)"),
        }
        Ok(outcome)
    }

    fn unload(&mut self, name: &str) -> Result<(), ApiError> {
        if name == self.base_name {
            return Err(ApiError::invalid_param("lora_name", "the base model cannot be unloaded"));
        }
        match self.scheduler.unload_adapter(&mut self.engine, name) {
            Ok(UnloadOutcome::Removed) => tracing::info!(adapter = %name, "adapter unloaded"),
            Ok(UnloadOutcome::WhenIdle) => tracing::info!(adapter = %name, "adapter unloaded; removed when its running requests finish"),
            Err(EngineError::UnknownAdapter(_)) => {
                return Err(ApiError::not_found(format!("The lora adapter '{name}' cannot be found.")).with_param("lora_name"))
            }
            Err(e) => return Err(ApiError::from_engine(&e)),
        }
        Ok(())
    }

    /// Publishes the adapter list and gauges: at startup before the server answers, then
    /// whenever they change.
    pub(super) fn publish_adapters(&mut self) {
        let list = self.engine.loras().adapters();
        self.emitter.adapter_gauges(&list, self.engine.loras());
        let merged = self.engine.merged_adapter().map(str::to_string);
        let loras = self.engine.loras();
        let entries = list
            .into_iter()
            .map(|a| {
                if let Some(m) = a.resident.and_then(|slot| loras.get(slot)) {
                    if self.ranks.get(&a.name) != Some(&m.max_rank) {
                        self.ranks.insert(a.name.clone(), m.max_rank);
                    }
                }
                AdapterEntry {
                    rank: self.ranks.get(&a.name).copied(),
                    merged: merged.as_deref() == Some(a.name.as_str()),
                    resident: a.resident.is_some(),
                    bytes: a.bytes,
                    active: a.active,
                    pinned: a.pinned,
                    requests: a.requests,
                    name: a.name,
                }
            })
            .collect();
        if let Ok(mut v) = self.shared.adapters.write() {
            *v = entries;
        }
        self.views_dirty = false;
    }

    fn update_views(&mut self) {
        let loras = self.engine.loras();
        let state = (loras.stats().evictions, loras.stats().loads, loras.resident_count(), loras.usage_epoch());
        if self.views_dirty || state != self.last_adapter_state {
            self.last_adapter_state = state;
            self.publish_adapters();
        }
        self.emitter.scheduler_gauges(&self.scheduler, self.engine.loras().stats(), self.engine.prefix_cache_stats());
    }
}
