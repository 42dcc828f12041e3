//! The server's side of scheduling: a thin actor over the engine's
//! [`loramux_engine::Scheduler`]. One dedicated thread owns the [`Engine`] and the
//! scheduler ([`actor`]); HTTP handlers tokenize their prompts themselves (the engine's
//! input processor is shared), take a place in the bounded waiting queue (refused at once
//! with 429 when it is full), and send the processed request through a bounded command
//! channel. Each step's outputs go back to each request's event stream ([`emitter`]).
//! Data flows one way: handler -> waiting queue -> batch step -> emitter -> handler.
//!
//! [`Engine`]: loramux_engine::Engine

mod actor;
mod emitter;
mod startup;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, TrySendError};
use std::sync::{Arc, RwLock};
use std::time::Instant;

pub use loramux_engine::lora::InsertOutcome;
use loramux_engine::lora::{AdapterReader, LoraModel, ModuleShapes};
use loramux_engine::scheduler::Demand;
use loramux_engine::{AdmissionGate, EngineError, FinishReason, InputProcessor, ModelLocation, ProcessedRequest};
use tokio::sync::{mpsc as tmpsc, oneshot};

pub(crate) use startup::spawn;

use crate::error::ApiError;
use crate::protocol::{PromptLogprobs, TokenLogprob};

/// What a request's stream carries.
#[derive(Clone, Debug)]
pub enum Event {
    /// The request passed every check (adapter known, queue not full) and joined the batch.
    Accepted { prompt_tokens: usize },
    /// New output: text that can no longer change, and the tokens generated since the last delta.
    Delta { text: String, tokens: usize, logprobs: Vec<TokenLogprob> },
    /// The request finished; an embedding request with its pooled vector (not normalised).
    Done {
        finish: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        prompt_logprobs: Option<Box<PromptLogprobs>>,
        embedding: Option<Vec<f32>>,
    },
    /// The request failed (before or during generation).
    Error(ApiError),
}

/// A request for the batch loop: processed (tokenized and checked) off the loop.
pub struct Job {
    pub request: ProcessedRequest,
    /// Metrics label: the adapter's name or the base model's.
    pub label: String,
    /// The tenant it runs for: its metrics label and the tokens generated for it.
    pub tenant: Arc<crate::tenants::RequestTenant>,
    /// When the request must be done by (queue plus generation), if it has a deadline.
    pub deadline: Option<Instant>,
}

pub(crate) enum Command {
    Submit { job: Box<Job>, ticket: loramux_engine::AdmissionTicket, events: tmpsc::UnboundedSender<Event>, arrival: Instant },
    Insert { model: Box<LoraModel>, seconds: f64, replace: bool, reply: oneshot::Sender<Result<InsertOutcome, ApiError>> },
    Unload { name: String, reply: oneshot::Sender<Result<(), ApiError>> },
    Pin { name: String, reply: oneshot::Sender<Result<(), ApiError>> },
    Drain { deadline: Instant },
}

/// One adapter as `/v1/models` and `/v1/lora_adapters` show it.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterEntry {
    pub name: String,
    pub resident: bool,
    pub bytes: usize,
    /// Running sequences on it.
    pub active: usize,
    /// Largest rank over its projections, once it has been resident (`None` before).
    pub rank: Option<usize>,
    pub pinned: bool,
    /// Folded into the base weights by `--auto-merge` now.
    pub merged: bool,
    /// Requests started on it since it became known.
    pub requests: u64,
}

/// What the loop publishes for handlers: a snapshot of the adapter list, and whether the
/// loop lives and admits.
pub struct Shared {
    adapters: RwLock<Vec<AdapterEntry>>,
    draining: AtomicBool,
    alive: AtomicBool,
}

impl Shared {
    fn new() -> Self {
        Self { adapters: RwLock::new(Vec::new()), draining: AtomicBool::new(false), alive: AtomicBool::new(true) }
    }

    /// Every adapter requests may name, sorted by name, as of the last step.
    pub fn adapters(&self) -> Vec<AdapterEntry> {
        self.adapters.read().map(|a| a.clone()).unwrap_or_default()
    }

    /// Whether new requests are refused because the server is shutting down.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Whether the batch loop is running: `/health` says 503 once it is not.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }
}

/// Facts about the loaded model, fixed after startup.
#[derive(Clone, Debug)]
pub struct EngineInfo {
    pub location: ModelLocation,
    pub architecture: String,
    pub max_model_len: usize,
    pub weight_bytes: usize,
    pub quantized: bool,
    pub shapes: ModuleShapes,
    pub max_lora_rank: usize,
    pub kv_budget_bytes: usize,
    pub kv_bytes_per_token: usize,
    pub load_seconds: f64,
    /// Adapters loaded at startup with their bytes, and how many are known in all.
    pub startup_adapters: Vec<(String, usize)>,
    pub known_adapters: usize,
    /// The adapter folded into the base weights at startup (`--merge-lora`).
    pub merged_lora: Option<PathBuf>,
}

/// How handlers reach the loop.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::SyncSender<Command>,
    gate: Arc<AdmissionGate>,
    pub shared: Arc<Shared>,
    pub info: Arc<EngineInfo>,
    /// Tokenizer, chat template and prompt checks, run on the handler's thread.
    pub input: Arc<InputProcessor>,
    /// Reads adapters for runtime loads on the handler's side, off the loop.
    pub reader: AdapterReader,
    /// The semantic router (`model: "auto"`), run on the handler's side, off the loop.
    pub router: Arc<loramux_engine::routing::Router>,
}

fn loop_stopped() -> ApiError {
    ApiError::unavailable("the batch loop has stopped")
}

impl SchedulerHandle {
    /// Queues a processed request; its events arrive on the returned stream (dropping it
    /// cancels). Refused at once with 429 when the waiting queue is full or the request
    /// would miss the TTFT target; `loramux_admissions_total` counts which.
    pub fn submit(&self, job: Job, metrics: &crate::metrics::Metrics) -> Result<tmpsc::UnboundedReceiver<Event>, ApiError> {
        if self.shared.is_draining() {
            return Err(ApiError::unavailable("the server is shutting down"));
        }
        if !self.shared.is_alive() {
            return Err(loop_stopped());
        }
        let ticket = match self.gate.try_enter(Demand::of(&job.request)) {
            Ok(t) => {
                metrics.admissions.with_label_values(&["admitted", "ok"]).inc();
                t
            }
            Err(e) => {
                if let EngineError::Overloaded { reason, .. } = &e {
                    metrics.admissions.with_label_values(&["refused", reason.as_str()]).inc();
                }
                return Err(ApiError::from_engine(&e));
            }
        };
        let (tx, rx) = tmpsc::unbounded_channel();
        match self.tx.try_send(Command::Submit { job: Box::new(job), ticket, events: tx, arrival: Instant::now() }) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => Err(ApiError::overloaded("the batch loop's command queue is full; retry later")),
            Err(TrySendError::Disconnected(_)) => Err(loop_stopped()),
        }
    }

    fn command(&self, cmd: Command) -> Result<(), ApiError> {
        match self.tx.try_send(cmd) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(ApiError::overloaded("the batch loop's command queue is full; retry later")),
            Err(TrySendError::Disconnected(_)) => Err(loop_stopped()),
        }
    }

    /// Makes a validated adapter known and, if a slot can be had, resident.
    pub async fn insert_adapter(&self, model: LoraModel, seconds: f64, replace: bool) -> Result<InsertOutcome, ApiError> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Insert { model: Box::new(model), seconds, replace, reply })?;
        rx.await.map_err(|_| loop_stopped())?
    }

    /// Forgets an adapter (at once, or when its running requests finish).
    pub async fn unload_adapter(&self, name: &str) -> Result<(), ApiError> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Unload { name: name.to_string(), reply })?;
        rx.await.map_err(|_| loop_stopped())?
    }

    /// Makes a known adapter resident and never evicted (`--pin-lora` of a remote adapter,
    /// once it is fetched).
    pub async fn pin_adapter(&self, name: &str) -> Result<(), ApiError> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Pin { name: name.to_string(), reply })?;
        rx.await.map_err(|_| loop_stopped())?
    }

    /// Stops admitting new requests; in-flight ones run until `deadline`, then are cancelled.
    pub fn drain(&self, deadline: Instant) {
        self.shared.draining.store(true, Ordering::Relaxed);
        let _ = self.tx.send(Command::Drain { deadline });
    }
}
