//! The batch loop. One dedicated thread owns the [`Engine`] and every [`Sequence`]; HTTP
//! handlers talk to it through a command channel and get a per-request event stream back.
//!
//! Each iteration: take commands (new requests, adapter inserts and removals, finished
//! adapter reads), drop requests whose client went away, admit waiting requests first come
//! first served within the limits (sequences, KV-cache blocks, resident adapters), run ONE
//! `engine.step` over the whole mixed-adapter batch (decode tokens plus prefill chunks), and
//! push each request's new text to its stream. Adapters are read from disk on loader
//! threads, never in this loop; the loop only swaps the finished adapter in between steps.

use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use loramux_engine::kv::{KvCache, KV_BLOCK_TOKENS};
use loramux_engine::lora::{LoraModel, ModuleShapes};
use loramux_engine::{
    Engine, EngineError, EngineOptions, FinishReason, ModelLocation, Prompt, Request, SampledToken, SamplingParams,
    Sequence,
};
use tokio::sync::{mpsc as tmpsc, oneshot};

use crate::config::Settings;
use crate::error::{ApiError, ServerError};
use crate::metrics::Metrics;

/// What a request asks the loop to run.
#[derive(Clone, Debug)]
pub struct Job {
    /// Adapter name, `None` for the base model.
    pub adapter: Option<String>,
    /// Where to find the adapter if the loop does not know it yet (found in a `--lora-dir`).
    pub discovered_path: Option<PathBuf>,
    /// Metrics label: the adapter's name or the base model's.
    pub label: String,
    pub prompt: Prompt,
    /// `max_tokens` is replaced by the resolved limit.
    pub params: SamplingParams,
    /// `max_tokens` as the client gave it; `None` fills the context.
    pub max_tokens: Option<usize>,
    /// Request field holding the prompt, for error messages (`messages` or `prompt`).
    pub prompt_param: &'static str,
}

/// A generated token's log-probability, with token strings decoded.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// Why a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    Stop,
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What a request's stream carries.
#[derive(Clone, Debug)]
pub enum Event {
    /// The request passed every check (prompt, lengths, adapter loaded) and joined the batch.
    Accepted { prompt_tokens: usize },
    /// New output: text that can no longer change, and the tokens generated since the last delta.
    Delta { text: String, tokens: usize, logprobs: Vec<TokenLogprob> },
    /// The request finished.
    Done { finish: Finish, prompt_tokens: usize, completion_tokens: usize },
    /// The request failed (before or during generation).
    Error(ApiError),
}

/// The answer of a runtime adapter insert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InsertOutcome {
    /// Resident now.
    Resident,
    /// Known and validated; every slot is in use, so it becomes resident on first use.
    Registered,
}

pub(crate) enum Command {
    Submit { job: Box<Job>, events: tmpsc::UnboundedSender<Event>, arrival: Instant },
    Insert { model: Box<LoraModel>, seconds: f64, replace: bool, reply: oneshot::Sender<Result<InsertOutcome, ApiError>> },
    Unload { name: String, reply: oneshot::Sender<Result<(), ApiError>> },
    Loaded { name: String, result: Result<(Box<LoraModel>, f64), EngineError> },
    Drain { deadline: Instant },
}

/// One adapter as `/v1/models` shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterEntry {
    pub name: String,
    pub path: PathBuf,
    pub resident: bool,
    pub bytes: usize,
    pub active: usize,
}

/// State the loop publishes for handlers.
pub struct Shared {
    /// Known adapters, sorted by name.
    adapters: RwLock<Vec<AdapterEntry>>,
    draining: AtomicBool,
    alive: AtomicBool,
}

impl Shared {
    /// Every known adapter, sorted by name.
    pub fn adapters(&self) -> Vec<AdapterEntry> {
        self.adapters.read().map(|a| a.clone()).unwrap_or_default()
    }

    /// Whether an adapter of this name is known.
    pub fn has_adapter(&self, name: &str) -> bool {
        self.adapters
            .read()
            .map(|a| a.binary_search_by(|e| e.name.as_str().cmp(name)).is_ok())
            .unwrap_or(false)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

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
    pub vocab_size: usize,
    pub weight_bytes: usize,
    pub quantized: bool,
    pub has_chat_template: bool,
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
    tx: mpsc::Sender<Command>,
    pub shared: Arc<Shared>,
    pub info: Arc<EngineInfo>,
}

impl SchedulerHandle {
    /// Queues a request; its events arrive on the returned stream (dropping it cancels).
    pub fn submit(&self, job: Job) -> Result<tmpsc::UnboundedReceiver<Event>, ApiError> {
        if self.shared.is_draining() {
            return Err(ApiError::unavailable("the server is shutting down"));
        }
        let (tx, rx) = tmpsc::unbounded_channel();
        self.tx
            .send(Command::Submit { job: Box::new(job), events: tx, arrival: Instant::now() })
            .map_err(|_| ApiError::unavailable("the batch loop has stopped"))?;
        Ok(rx)
    }

    /// Makes a validated adapter known and, if a slot can be had, resident.
    pub async fn insert_adapter(&self, model: LoraModel, seconds: f64, replace: bool) -> Result<InsertOutcome, ApiError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Insert { model: Box::new(model), seconds, replace, reply })
            .map_err(|_| ApiError::unavailable("the batch loop has stopped"))?;
        rx.await.map_err(|_| ApiError::unavailable("the batch loop has stopped"))?
    }

    /// Forgets an adapter (at once, or when its running requests finish).
    pub async fn unload_adapter(&self, name: &str) -> Result<(), ApiError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Unload { name: name.to_string(), reply })
            .map_err(|_| ApiError::unavailable("the batch loop has stopped"))?;
        rx.await.map_err(|_| ApiError::unavailable("the batch loop has stopped"))?
    }

    /// Stops admitting new requests; in-flight ones run until `deadline`, then are cancelled.
    pub fn drain(&self, deadline: Instant) {
        self.shared.draining.store(true, Ordering::Relaxed);
        let _ = self.tx.send(Command::Drain { deadline });
    }
}

struct Waiting {
    job: Box<Job>,
    prompt_ids: Vec<u32>,
    events: tmpsc::UnboundedSender<Event>,
    arrival: Instant,
    /// When the request first found every adapter slot pinned.
    blocked_since: Option<Instant>,
}

struct Running {
    seq: Sequence,
    /// The adapter the request asked for (`seq.adapter` names the merged adapter for base
    /// requests on a `--merge-lora` server): what pins, unloads and metrics count.
    adapter: Option<String>,
    events: tmpsc::UnboundedSender<Event>,
    label: String,
    arrival: Instant,
    first_token: Option<Instant>,
    last_token: Instant,
    prompt_tokens: usize,
    sent_tokens: usize,
    sent_logprobs: usize,
    /// Cache dropped for lack of KV memory; recomputed when it fits again.
    preempted: bool,
}

enum AdapterState {
    Ready,
    Loading,
    Blocked,
    Failed(ApiError),
}

struct Limits {
    max_num_seqs: usize,
    max_batch_tokens: usize,
    max_waiting: usize,
    adapter_wait: Duration,
    budget_blocks: usize,
    block_bytes: usize,
    max_loras: usize,
    max_lora_bytes: usize,
    max_rank: usize,
}

struct Scheduler {
    engine: Engine,
    rx: mpsc::Receiver<Command>,
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    limits: Limits,
    base_name: String,
    waiting: VecDeque<Waiting>,
    running: Vec<Running>,
    /// Adapter paths by name (mirror of the manager's known set).
    paths: HashMap<String, PathBuf>,
    /// Resident adapters and their bytes (mirror of the manager's resident set).
    resident: HashMap<String, usize>,
    /// Running sequences per adapter.
    pins: HashMap<String, usize>,
    /// Adapters being read on loader threads.
    loading: HashSet<String>,
    /// Adapters read and validated, waiting for a slot.
    ready: HashMap<String, (Box<LoraModel>, f64)>,
    /// Unloaded while in use: removed when their last sequence ends.
    pending_unload: HashSet<String>,
    /// Names unloaded through the API and not loaded again since. A `--lora-dir` adapter
    /// is otherwise found on disk again by its next request; vLLM users expect an unload
    /// to stick until `load_lora_adapter` brings the name back.
    unloaded: HashSet<String>,
    /// Name of the adapter merged into the base weights (`--merge-lora`): the engine runs
    /// base requests as requests for it, with no LoRA applied.
    merged: Option<String>,
    drain_deadline: Option<Instant>,
    views_dirty: bool,
    lora_info: (String, String),
    last_loads: u64,
    last_evictions: u64,
    last_load_seconds: f64,
}

/// Starts the loop thread: loads the model and startup adapters there, then serves.
pub(crate) async fn spawn(
    location: ModelLocation,
    settings: &Settings,
    lora_dirs: Vec<PathBuf>,
    metrics: Arc<Metrics>,
) -> Result<(SchedulerHandle, JoinHandle<()>), ServerError> {
    let (tx, rx) = mpsc::channel();
    let shared = Arc::new(Shared {
        adapters: RwLock::new(Vec::new()),
        draining: AtomicBool::new(false),
        alive: AtomicBool::new(true),
    });
    let (ready_tx, ready_rx) = oneshot::channel();
    let settings = settings.clone();
    let thread_tx = tx.clone();
    let thread_shared = shared.clone();
    let join = std::thread::Builder::new()
        .name("loramux-batch".into())
        .spawn(move || {
            match Scheduler::start(location, &settings, &lora_dirs, rx, thread_tx, thread_shared, metrics) {
                Ok((mut sched, info)) => {
                    let _ = ready_tx.send(Ok(info));
                    sched.run();
                    sched.shared.alive.store(false, Ordering::Relaxed);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })
        .map_err(|e| ServerError::io("spawning the batch thread", e))?;
    match ready_rx.await {
        Ok(Ok(info)) => Ok((SchedulerHandle { tx, shared, info: Arc::new(info) }, join)),
        Ok(Err(e)) => {
            let _ = join.join();
            Err(e)
        }
        Err(_) => {
            let _ = join.join();
            Err(ServerError::Scheduler("the batch thread died while loading the model".into()))
        }
    }
}

fn blocks(tokens: usize) -> usize {
    KvCache::blocks_for(tokens)
}

fn cache_blocks(seq: &Sequence) -> usize {
    seq.cache().capacity_tokens() / KV_BLOCK_TOKENS
}

/// Folds the `--merge-lora` adapter into the base weights and returns the name the engine
/// knows it by. Its rank is not bounded by `--max-lora-rank`: merged, an adapter costs
/// nothing per token whatever its rank.
fn merge_startup_adapter(engine: &mut Engine, path: &Path) -> Result<String, ServerError> {
    if engine.model().is_quantized() {
        return Err(ServerError::Config(format!(
            "--merge-lora {} needs a float base model, but the model's weights are quantized: add --dequantize to \
             load the GGUF as float32",
            path.display()
        )));
    }
    let fail = |source| ServerError::MergeLora { path: path.to_path_buf(), source };
    let name = path.file_name().and_then(|n| n.to_str()).filter(|n| !n.is_empty()).unwrap_or("merged").to_string();
    let t = Instant::now();
    let adapter = LoraModel::load(&name, path, engine.loras().shapes(), usize::MAX).map_err(fail)?;
    engine.model_mut().merge_lora(&adapter, false).map_err(fail)?;
    tracing::info!(
        adapter = %name,
        path = %path.display(),
        rank = adapter.max_rank,
        ms = format!("{:.1}", t.elapsed().as_secs_f64() * 1e3),
        "adapter merged into the base weights: the served model name answers with the merged model"
    );
    Ok(name)
}

impl Scheduler {
    fn start(
        location: ModelLocation,
        settings: &Settings,
        lora_dirs: &[PathBuf],
        rx: mpsc::Receiver<Command>,
        tx: mpsc::Sender<Command>,
        shared: Arc<Shared>,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, EngineInfo), ServerError> {
        let t = Instant::now();
        let options = EngineOptions {
            dequantize: settings.dequantize,
            max_model_len: settings.max_model_len,
            lora: settings.lora.clone(),
            ..EngineOptions::default()
        };
        let mut engine = Engine::load(&location, &options)?;
        let load_seconds = t.elapsed().as_secs_f64();
        let merged = match &settings.merge_lora {
            Some(path) => Some(merge_startup_adapter(&mut engine, path)?),
            None => None,
        };
        let cfg = engine.model().config().clone();
        let kv_bytes_per_token = engine.kv_floats_per_token() * std::mem::size_of::<f32>();
        let block_bytes = kv_bytes_per_token * KV_BLOCK_TOKENS;
        let budget_blocks = settings.kv_cache_bytes / block_bytes.max(1);
        let max_model_len = engine.max_model_len();
        if budget_blocks < blocks(max_model_len) {
            return Err(ServerError::Config(format!(
                "the KV cache budget ({:.2} GiB) cannot hold one sequence of the maximum model length {max_model_len} \
                 ({:.2} GiB): raise --kv-cache-gib or lower --max-model-len",
                settings.kv_cache_bytes as f64 / (1u64 << 30) as f64,
                (blocks(max_model_len) * block_bytes) as f64 / (1u64 << 30) as f64
            )));
        }
        let mut paths: HashMap<String, PathBuf> = HashMap::new();
        let mut startup_adapters = Vec::new();
        // --lora-dir adapters: known by folder name, read on first use.
        for dir in lora_dirs {
            let found = crate::adapters::scan_lora_dir(dir)
                .map_err(|e| ServerError::io(format!("reading --lora-dir {}", dir.display()), e))?;
            let mut shown: Vec<&str> = found.iter().take(12).map(|(n, _)| n.as_str()).collect();
            if found.len() > shown.len() {
                shown.push("...");
            }
            tracing::info!(
                dir = %dir.display(),
                adapters = found.len(),
                names = %shown.join(","),
                "adapter directory: known by folder name, loaded on first use"
            );
            for (name, path) in found {
                if name == settings.served_model_name {
                    tracing::warn!(adapter = %name, "skipped: the name is the base model's");
                    continue;
                }
                if let Some(prev) = paths.get(&name) {
                    tracing::warn!(adapter = %name, kept = %prev.display(), skipped = %path.display(), "two adapters share a name");
                    continue;
                }
                engine.loras_mut().register(&name, &path);
                paths.insert(name, path);
            }
        }
        // --lora-modules: loaded now (the first --max-loras of them), so a broken one fails startup.
        for (i, (name, path)) in settings.lora_modules.iter().enumerate() {
            if i < settings.lora.max_loras {
                let t = Instant::now();
                engine.loras_mut().load(name, path)?;
                let bytes = engine.loras().get_by_name(name).map(|m| m.bytes).unwrap_or(0);
                tracing::info!(adapter = %name, path = %path.display(), bytes, ms = format!("{:.1}", t.elapsed().as_secs_f64() * 1e3), "adapter loaded");
                startup_adapters.push((name.clone(), bytes));
            } else {
                engine.loras_mut().register(name, path);
                tracing::info!(adapter = %name, path = %path.display(), "adapter registered (more --lora-modules than --max-loras: loaded on first use)");
            }
            paths.insert(name.clone(), path.clone());
        }
        let info = EngineInfo {
            location,
            architecture: format!("{:?}", cfg.architecture),
            max_model_len,
            vocab_size: cfg.vocab_size,
            weight_bytes: engine.model().size_in_bytes(),
            quantized: engine.model().is_quantized(),
            has_chat_template: engine.chat_template().is_some(),
            shapes: engine.loras().shapes().clone(),
            max_lora_rank: settings.lora.max_rank,
            kv_budget_bytes: budget_blocks * block_bytes,
            kv_bytes_per_token,
            load_seconds,
            startup_adapters,
            known_adapters: paths.len(),
            merged_lora: settings.merge_lora.clone(),
        };
        metrics.kv_capacity_bytes.set((budget_blocks * block_bytes) as i64);
        let mut sched = Self {
            engine,
            rx,
            tx,
            shared,
            metrics,
            limits: Limits {
                max_num_seqs: settings.max_num_seqs,
                max_batch_tokens: settings.max_num_batched_tokens,
                max_waiting: settings.max_waiting,
                adapter_wait: settings.adapter_wait,
                budget_blocks,
                block_bytes,
                max_loras: settings.lora.max_loras,
                max_lora_bytes: settings.lora.max_bytes,
                max_rank: settings.lora.max_rank,
            },
            base_name: settings.served_model_name.clone(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            paths,
            resident: HashMap::new(),
            pins: HashMap::new(),
            loading: HashSet::new(),
            ready: HashMap::new(),
            pending_unload: HashSet::new(),
            unloaded: HashSet::new(),
            merged,
            drain_deadline: None,
            views_dirty: true,
            lora_info: (String::new(), String::new()),
            last_loads: 0,
            last_evictions: 0,
            last_load_seconds: 0.0,
        };
        sched.refresh_views();
        sched.update_metrics();
        Ok((sched, info))
    }

    fn run(&mut self) {
        loop {
            let busy = self.running.iter().any(|r| !r.preempted);
            if !busy {
                if self.drain_deadline.is_some() && self.waiting.is_empty() && self.running.is_empty() {
                    break;
                }
                // Every handle is gone (the server was dropped without a shutdown): stop.
                if Arc::strong_count(&self.shared) == 1 {
                    break;
                }
                let wait = if self.waiting.is_empty() && self.running.is_empty() { 500 } else { 10 };
                match self.rx.recv_timeout(Duration::from_millis(wait)) {
                    Ok(cmd) => self.handle(cmd),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        if self.running.is_empty() && self.waiting.is_empty() {
                            self.abort_all("the server is stopping");
                            self.update_metrics();
                            return;
                        }
                        break;
                    }
                }
            }
            if let Some(deadline) = self.drain_deadline {
                if Instant::now() >= deadline {
                    self.abort_all("the server is shutting down: request cancelled");
                }
            }
            self.reap_cancelled();
            self.admit();
            self.step();
            self.update_metrics();
        }
        self.abort_all("the server is stopping");
        self.update_metrics();
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit { job, events, arrival } => self.on_submit(job, events, arrival),
            // The published adapter list is brought up to date before the reply, so a client
            // that lists models or sends a request right after sees the change.
            Command::Insert { model, seconds, replace, reply } => {
                let r = self.on_insert(model, seconds, replace);
                self.refresh_views();
                let _ = reply.send(r);
            }
            Command::Unload { name, reply } => {
                let r = self.on_unload(&name);
                self.refresh_views();
                let _ = reply.send(r);
            }
            Command::Loaded { name, result } => self.on_loaded(name, result),
            Command::Drain { deadline } => {
                tracing::info!(
                    running = self.running.len(),
                    waiting = self.waiting.len(),
                    "draining: no new requests; in-flight ones have until the shutdown timeout"
                );
                self.drain_deadline = Some(deadline);
            }
        }
    }

    /// Sends a request its error (the HTTP layer counts it in the metrics when it answers).
    fn reject(&self, events: &tmpsc::UnboundedSender<Event>, e: ApiError) {
        let _ = events.send(Event::Error(e));
    }

    fn on_submit(&mut self, mut job: Box<Job>, events: tmpsc::UnboundedSender<Event>, arrival: Instant) {
        if self.drain_deadline.is_some() {
            return self.reject(&events, ApiError::unavailable("the server is shutting down"));
        }
        if self.waiting.len() >= self.limits.max_waiting {
            return self.reject(&events, ApiError::unavailable(format!("too many queued requests ({}); retry later", self.waiting.len())));
        }
        if let Some(a) = &job.adapter {
            if self.pending_unload.contains(a) {
                return self.reject(&events, ApiError::model_not_found(a));
            }
            if !self.paths.contains_key(a) {
                match job.discovered_path.take() {
                    // Unloaded through the API: still on disk, but gone until loaded again.
                    Some(_) if self.unloaded.contains(a) => return self.reject(&events, ApiError::model_not_found(a)),
                    Some(p) => {
                        tracing::info!(adapter = %a, path = %p.display(), "adapter found in --lora-dir");
                        self.engine.loras_mut().register(a, &p);
                        self.paths.insert(a.clone(), p);
                        self.views_dirty = true;
                    }
                    None => return self.reject(&events, ApiError::model_not_found(a)),
                }
            }
        }
        let ids = match self.engine.tokenize(&job.prompt) {
            Ok(ids) => ids,
            Err(e) => return self.reject(&events, ApiError::from_engine(&e).with_param(job.prompt_param)),
        };
        let max_len = self.engine.max_model_len();
        if ids.is_empty() {
            return self.reject(&events, ApiError::invalid_param(job.prompt_param, "the prompt is empty"));
        }
        if ids.len() >= max_len {
            return self.reject(
                &events,
                ApiError::invalid_param(
                    job.prompt_param,
                    format!(
                        "This model's maximum context length is {max_len} tokens. However, your request has {} input tokens \
                         (at least one token must be left for the completion). Please reduce the length of the input.",
                        ids.len()
                    ),
                )
                .with_code("context_length_exceeded"),
            );
        }
        let vocab = self.engine.model().config().vocab_size;
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            return self.reject(&events, ApiError::invalid_param(job.prompt_param, format!("token id {bad} is outside the vocabulary (size {vocab})")));
        }
        let max_tokens = match job.max_tokens {
            Some(m) if ids.len() + m > max_len => {
                return self.reject(
                    &events,
                    ApiError::invalid_param(
                        "max_tokens",
                        format!(
                            "This model's maximum context length is {max_len} tokens. However, you requested {} tokens \
                             ({} in the {}, {m} in the completion). Please reduce the length of the {} or completion.",
                            ids.len() + m,
                            ids.len(),
                            job.prompt_param,
                            job.prompt_param
                        ),
                    )
                    .with_code("context_length_exceeded"),
                );
            }
            Some(m) => m,
            None => max_len - ids.len(),
        };
        job.params.max_tokens = max_tokens;
        if let Err(e) = job.params.validate() {
            return self.reject(&events, ApiError::from_engine(&e));
        }
        self.waiting.push_back(Waiting { job, prompt_ids: ids, events, arrival, blocked_since: None });
    }

    /// Whether the resident set can take an adapter of `bytes` now (evicting idle ones).
    fn can_insert(&self, name: &str, bytes: usize) -> bool {
        let replacing = self.resident.get(name).copied();
        if replacing.is_some() && self.pins.get(name).copied().unwrap_or(0) > 0 {
            return false;
        }
        let mut used: usize = self.resident.values().sum::<usize>() - replacing.unwrap_or(0);
        let mut slots = self.resident.len() - usize::from(replacing.is_some());
        let mut idle: Vec<usize> = self
            .resident
            .iter()
            .filter(|(n, _)| n.as_str() != name && self.pins.get(*n).copied().unwrap_or(0) == 0)
            .map(|(_, &b)| b)
            .collect();
        idle.sort_unstable_by(|a, b| b.cmp(a));
        let mut idle = idle.into_iter();
        while slots >= self.limits.max_loras || used + bytes > self.limits.max_lora_bytes {
            match idle.next() {
                Some(b) => {
                    used -= b;
                    slots -= 1;
                }
                None => return false,
            }
        }
        true
    }

    fn insert_model(&mut self, model: Box<LoraModel>, seconds: f64) -> Result<(), EngineError> {
        let name = model.name.clone();
        let path = model.path.clone();
        let r = self.engine.loras_mut().insert(*model, seconds);
        self.sync_resident();
        if r.is_ok() {
            self.paths.insert(name, path);
        }
        r.map(|_| ())
    }

    fn sync_resident(&mut self) {
        self.resident = self
            .engine
            .loras()
            .adapters()
            .into_iter()
            .filter(|a| a.resident.is_some())
            .map(|a| (a.name, a.bytes))
            .collect();
        self.views_dirty = true;
    }

    fn on_insert(&mut self, model: Box<LoraModel>, seconds: f64, replace: bool) -> Result<InsertOutcome, ApiError> {
        let name = model.name.clone();
        if name == self.base_name {
            return Err(ApiError::invalid_param("lora_name", format!("'{name}' is the base model's name")));
        }
        if self.pending_unload.contains(&name) {
            return Err(ApiError::conflict(format!(
                "adapter '{name}' is being unloaded and still serves running requests; retry when they finish"
            )));
        }
        if self.paths.contains_key(&name) && !replace {
            return Err(ApiError::invalid_param("lora_name", format!("The lora adapter '{name}' has already been loaded.")));
        }
        if model.bytes > self.limits.max_lora_bytes {
            return Err(ApiError::bad_request(format!(
                "adapter '{name}' needs {} bytes, above the adapter memory limit of {} bytes",
                model.bytes, self.limits.max_lora_bytes
            )));
        }
        if replace && self.pins.get(&name).copied().unwrap_or(0) > 0 && self.resident.contains_key(&name) {
            return Err(ApiError::conflict(format!("adapter '{name}' is in use by running requests and cannot be replaced now")));
        }
        self.ready.remove(&name);
        if self.can_insert(&name, model.bytes) {
            let bytes = model.bytes;
            self.insert_model(model, seconds).map_err(|e| ApiError::from_engine(&e))?;
            self.unloaded.remove(&name);
            tracing::info!(adapter = %name, bytes, ms = format!("{:.1}", seconds * 1e3), "adapter loaded at run time");
            Ok(InsertOutcome::Resident)
        } else {
            // Every slot is pinned by running requests: keep it validated and ready.
            if self.resident.contains_key(&name) {
                let _ = self.engine.loras_mut().remove(&name);
                self.sync_resident();
            }
            self.engine.loras_mut().register(&name, &model.path);
            self.paths.insert(name.clone(), model.path.clone());
            self.ready.insert(name.clone(), (model, seconds));
            self.unloaded.remove(&name);
            self.views_dirty = true;
            tracing::info!(adapter = %name, "adapter registered at run time; resident on first use (all slots busy)");
            Ok(InsertOutcome::Registered)
        }
    }

    fn on_unload(&mut self, name: &str) -> Result<(), ApiError> {
        if name == self.base_name {
            return Err(ApiError::invalid_param("lora_name", "the base model cannot be unloaded"));
        }
        if !self.paths.contains_key(name) || self.pending_unload.contains(name) {
            return Err(ApiError::not_found(format!("The lora adapter '{name}' cannot be found.")).with_param("lora_name"));
        }
        self.ready.remove(name);
        self.unloaded.insert(name.to_string());
        // Queued requests for it can no longer run.
        let mut i = 0;
        while i < self.waiting.len() {
            if self.waiting[i].job.adapter.as_deref() == Some(name) {
                let w = self.waiting.remove(i).expect("index in range");
                self.reject(&w.events, ApiError::model_not_found(name));
            } else {
                i += 1;
            }
        }
        if self.pins.get(name).copied().unwrap_or(0) > 0 {
            self.pending_unload.insert(name.to_string());
            tracing::info!(adapter = %name, "adapter unloaded; removed when its running requests finish");
        } else {
            self.remove_adapter(name);
            tracing::info!(adapter = %name, "adapter unloaded");
        }
        self.views_dirty = true;
        Ok(())
    }

    fn remove_adapter(&mut self, name: &str) {
        if let Err(e) = self.engine.loras_mut().remove(name) {
            tracing::warn!(adapter = %name, "remove: {e}");
        }
        self.paths.remove(name);
        self.pending_unload.remove(name);
        self.sync_resident();
    }

    fn on_loaded(&mut self, name: String, result: Result<(Box<LoraModel>, f64), EngineError>) {
        self.loading.remove(&name);
        match result {
            Ok((model, secs)) => {
                self.metrics.adapter_load_latency.observe(secs);
                if self.paths.contains_key(&name) && !self.pending_unload.contains(&name) {
                    self.ready.insert(name, (model, secs));
                }
            }
            Err(e) => {
                self.metrics.adapter_load_failures.inc();
                tracing::warn!(adapter = %name, "adapter failed to load: {e}");
                let err = ApiError::from_engine(&e).with_param("model");
                let mut i = 0;
                while i < self.waiting.len() {
                    if self.waiting[i].job.adapter.as_deref() == Some(name.as_str()) {
                        let w = self.waiting.remove(i).expect("index in range");
                        self.reject(&w.events, err.clone());
                    } else {
                        i += 1;
                    }
                }
            }
        }
    }

    fn start_load(&mut self, name: &str) {
        let Some(path) = self.paths.get(name).cloned() else { return };
        self.loading.insert(name.to_string());
        let shapes = self.engine.loras().shapes().clone();
        let max_rank = self.limits.max_rank;
        let tx = self.tx.clone();
        let name = name.to_string();
        let spawned = std::thread::Builder::new().name("loramux-lora-load".into()).spawn({
            let name = name.clone();
            move || {
                let t = Instant::now();
                let result = LoraModel::load(&name, &path, &shapes, max_rank).map(|m| (Box::new(m), t.elapsed().as_secs_f64()));
                let _ = tx.send(Command::Loaded { name, result });
            }
        });
        if let Err(e) = spawned {
            self.loading.remove(&name);
            tracing::error!("cannot start an adapter loader thread: {e}");
        }
    }

    fn adapter_state(&mut self, name: &str) -> AdapterState {
        if self.resident.contains_key(name) {
            return AdapterState::Ready;
        }
        if let Some((model, secs)) = self.ready.remove(name) {
            if self.can_insert(name, model.bytes) {
                return match self.insert_model(model, secs) {
                    Ok(()) => AdapterState::Ready,
                    Err(e) => AdapterState::Failed(ApiError::from_engine(&e)),
                };
            }
            self.ready.insert(name.to_string(), (model, secs));
            return AdapterState::Blocked;
        }
        if self.loading.contains(name) {
            return AdapterState::Loading;
        }
        // Read it now if a slot could take it; bound the adapters held outside the set.
        if self.loading.len() + self.ready.len() < self.limits.max_loras {
            self.start_load(name);
            return AdapterState::Loading;
        }
        AdapterState::Blocked
    }

    /// KV blocks the running (not preempted) sequences need to produce their next token.
    fn committed_blocks(&self) -> usize {
        self.running.iter().filter(|r| !r.preempted).map(|r| blocks(r.seq.len() + 1).max(cache_blocks(&r.seq))).sum()
    }

    fn admit(&mut self) {
        if self.drain_deadline.is_some_and(|d| Instant::now() >= d) {
            return;
        }
        let budget = self.limits.budget_blocks;
        let mut committed = self.committed_blocks();
        // Preempted sequences come back first, oldest first.
        let mut preempted: Vec<usize> = (0..self.running.len()).filter(|&i| self.running[i].preempted).collect();
        preempted.sort_by_key(|&i| self.running[i].seq.id);
        for i in preempted {
            let need = blocks(self.running[i].seq.len() + 1);
            if committed + need > budget {
                return;
            }
            self.running[i].preempted = false;
            committed += need;
        }
        // Adapters read for requests that have since gone away must not hold the slots of
        // the read-ahead bound.
        if !self.ready.is_empty() {
            let wanted: HashSet<&str> = self.waiting.iter().filter_map(|w| w.job.adapter.as_deref()).collect();
            self.ready.retain(|name, _| wanted.contains(name.as_str()));
        }
        let now = Instant::now();
        let mut starving = false;
        let mut i = 0;
        while i < self.waiting.len() && self.running.len() < self.limits.max_num_seqs {
            let adapter = self.waiting[i].job.adapter.clone();
            let state = match &adapter {
                None => AdapterState::Ready,
                Some(a) => self.adapter_state(a),
            };
            match state {
                AdapterState::Failed(e) => {
                    let w = self.waiting.remove(i).expect("index in range");
                    self.reject(&w.events, e);
                    continue;
                }
                AdapterState::Loading => {
                    i += 1;
                    continue;
                }
                AdapterState::Blocked => {
                    let since = *self.waiting[i].blocked_since.get_or_insert(now);
                    if now.duration_since(since) >= self.limits.adapter_wait {
                        // Bounded waiting: stop pinning adapters until a slot frees for it.
                        starving = true;
                    }
                    i += 1;
                    continue;
                }
                AdapterState::Ready if starving && adapter.is_some() => {
                    i += 1;
                    continue;
                }
                AdapterState::Ready => {}
            }
            let need = blocks(self.waiting[i].prompt_ids.len() + 1);
            if committed + need > budget {
                break; // first come, first served on memory
            }
            let w = self.waiting.remove(i).expect("index in range");
            // On a --merge-lora server the base model is the merged adapter to the engine.
            let engine_adapter = adapter.clone().or_else(|| self.merged.clone());
            let request = Request { adapter: engine_adapter, prompt: Prompt::Tokens(Vec::new()), params: w.job.params.clone() };
            let prompt_tokens = w.prompt_ids.len();
            match self.engine.start_sequence(&request, w.prompt_ids) {
                Ok(seq) => {
                    let _ = w.events.send(Event::Accepted { prompt_tokens });
                    committed += need;
                    if let Some(a) = &adapter {
                        *self.pins.entry(a.clone()).or_default() += 1;
                    }
                    let label = w.job.label.clone();
                    self.metrics.queue_time.with_label_values(&[&label]).observe(w.arrival.elapsed().as_secs_f64());
                    self.metrics.prompt_tokens.with_label_values(&[&label]).inc_by(prompt_tokens as u64);
                    self.metrics.vllm_prompt_tokens.inc_by(prompt_tokens as u64);
                    self.running.push(Running {
                        seq,
                        adapter,
                        events: w.events,
                        label,
                        arrival: w.arrival,
                        first_token: None,
                        last_token: now,
                        prompt_tokens,
                        sent_tokens: 0,
                        sent_logprobs: 0,
                        preempted: false,
                    });
                }
                Err(e) => self.reject(&w.events, ApiError::from_engine(&e)),
            }
        }
    }

    /// Blocks each active sequence holds after the next step, as `engine.step` will feed them.
    fn blocks_after_step(&self) -> usize {
        let mut take = vec![0usize; self.running.len()];
        let mut budget = self.limits.max_batch_tokens.max(1);
        let active: Vec<usize> =
            (0..self.running.len()).filter(|&i| !self.running[i].preempted && self.running[i].seq.finish.is_none()).collect();
        for &i in &active {
            if self.running[i].seq.pending_len() == 1 && budget > 0 {
                take[i] = 1;
                budget -= 1;
            }
        }
        let mut rest: Vec<usize> = active.iter().copied().filter(|&i| take[i] == 0).collect();
        rest.sort_by_key(|&i| self.running[i].seq.id);
        for i in rest {
            let n = self.running[i].seq.pending_len().min(budget);
            take[i] = n;
            budget -= n;
        }
        self.running
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.preempted)
            .map(|(i, r)| cache_blocks(&r.seq).max(blocks(r.seq.cached_len() + take[i])))
            .sum()
    }

    fn step(&mut self) {
        // Preempt the newest sequences while the step would overflow the KV budget.
        while self.blocks_after_step() > self.limits.budget_blocks {
            let victim = (0..self.running.len())
                .filter(|&i| !self.running[i].preempted)
                .max_by_key(|&i| self.running[i].seq.id);
            let Some(v) = victim else { break };
            if self.running.iter().filter(|r| !r.preempted).count() == 1 {
                break; // one sequence always fits (checked at startup)
            }
            let r = &mut self.running[v];
            tracing::debug!(seq = r.seq.id, "KV cache full: preempting the newest sequence (recomputed later)");
            r.seq.drop_cache();
            r.preempted = true;
            self.metrics.preemptions.inc();
        }
        let mut batch: Vec<&mut Sequence> =
            self.running.iter_mut().filter(|r| !r.preempted && r.seq.finish.is_none()).map(|r| &mut r.seq).collect();
        if batch.is_empty() {
            return;
        }
        let n = batch.len();
        let t = Instant::now();
        let engine = &mut self.engine;
        let max_tokens = self.limits.max_batch_tokens;
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| engine.step(&mut batch, max_tokens)));
        drop(batch);
        let failure = match result {
            Ok(Ok(rows)) => {
                self.metrics.batch_size.observe(n as f64);
                self.metrics.batch_tokens.observe(rows as f64);
                self.metrics.step_seconds.observe(t.elapsed().as_secs_f64());
                None
            }
            Ok(Err(e)) => Some(format!("forward pass failed: {e}")),
            Err(p) => Some(format!(
                "forward pass panicked: {}",
                p.downcast_ref::<String>().map(String::as_str).or_else(|| p.downcast_ref::<&str>().copied()).unwrap_or("?")
            )),
        };
        if let Some(msg) = failure {
            tracing::error!("{msg}; failing the sequences of this batch");
            let failed: Vec<usize> =
                (0..self.running.len()).filter(|&i| !self.running[i].preempted && self.running[i].seq.finish.is_none()).collect();
            for i in failed.into_iter().rev() {
                let r = self.remove_running(i, "error");
                self.reject(&r.events, ApiError::internal(msg.clone()));
            }
            return;
        }
        self.emit();
    }

    fn decode_token(&self, id: u32) -> String {
        self.engine.tokenizer().decode(&[id], false).unwrap_or_default()
    }

    fn token_logprob(&self, t: &SampledToken) -> TokenLogprob {
        TokenLogprob {
            token: self.decode_token(t.id),
            logprob: t.logprob,
            top: t.top.iter().map(|&(id, lp)| (self.decode_token(id), lp)).collect(),
        }
    }

    fn emit(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.running.len() {
            let r = &self.running[i];
            let produced = r.seq.output_ids.len() - r.sent_tokens;
            if produced > 0 {
                let logprobs: Vec<TokenLogprob> = r.seq.logprobs[r.sent_logprobs..].iter().map(|t| self.token_logprob(t)).collect();
                let r = &mut self.running[i];
                let label = [r.label.as_str()];
                match r.first_token {
                    None => {
                        let ttft = now.duration_since(r.arrival).as_secs_f64();
                        self.metrics.ttft.with_label_values(&label).observe(ttft);
                        self.metrics.vllm_ttft.observe(ttft);
                        r.first_token = Some(now);
                    }
                    Some(_) => {
                        let itl = now.duration_since(r.last_token).as_secs_f64();
                        self.metrics.itl.with_label_values(&label).observe(itl);
                        self.metrics.vllm_itl.observe(itl);
                    }
                }
                self.metrics.generation_tokens.with_label_values(&label).inc_by(produced as u64);
                self.metrics.vllm_generation_tokens.inc_by(produced as u64);
                r.last_token = now;
                r.sent_tokens = r.seq.output_ids.len();
                r.sent_logprobs = r.seq.logprobs.len();
                let text = r.seq.take_new_text();
                if !text.is_empty() || !logprobs.is_empty() {
                    let _ = r.events.send(Event::Delta { text, tokens: produced, logprobs });
                }
            }
            let r = &mut self.running[i];
            if let Some(reason) = r.seq.finish {
                let rest = r.seq.take_new_text();
                if !rest.is_empty() {
                    let _ = r.events.send(Event::Delta { text: rest, tokens: 0, logprobs: Vec::new() });
                }
                let finish = match reason {
                    FinishReason::Stop => Finish::Stop,
                    FinishReason::Length => Finish::Length,
                };
                let r = self.remove_running(i, finish.as_str());
                let e2e = now.duration_since(r.arrival).as_secs_f64();
                self.metrics.e2e.with_label_values(&[&r.label]).observe(e2e);
                self.metrics.vllm_e2e.observe(e2e);
                self.metrics.vllm_success.with_label_values(&[finish.as_str()]).inc();
                let _ = r.events.send(Event::Done {
                    finish,
                    prompt_tokens: r.prompt_tokens,
                    completion_tokens: r.seq.output_ids.len(),
                });
                continue;
            }
            i += 1;
        }
    }

    /// Takes a sequence out of the batch, releasing its adapter pin and KV cache.
    fn remove_running(&mut self, i: usize, reason: &str) -> Running {
        let mut r = self.running.swap_remove(i);
        self.engine.finish_sequence(&mut r.seq);
        self.metrics.requests.with_label_values(&[&r.label, reason]).inc();
        if let Some(a) = r.adapter.clone() {
            let left = {
                let p = self.pins.entry(a.clone()).or_default();
                *p = p.saturating_sub(1);
                *p
            };
            if left == 0 {
                self.pins.remove(&a);
                if self.pending_unload.contains(&a) {
                    self.remove_adapter(&a);
                    tracing::info!(adapter = %a, "adapter removed (unloaded while in use)");
                }
            }
        }
        r
    }

    /// Drops requests whose client disconnected.
    fn reap_cancelled(&mut self) {
        let before = self.waiting.len();
        let metrics = &self.metrics;
        self.waiting.retain(|w| {
            let gone = w.events.is_closed();
            if gone {
                metrics.requests.with_label_values(&[&w.job.label, "abort"]).inc();
            }
            !gone
        });
        let dropped_waiting = before - self.waiting.len();
        let mut i = 0;
        let mut dropped_running = 0;
        while i < self.running.len() {
            if self.running[i].events.is_closed() {
                self.remove_running(i, "abort");
                dropped_running += 1;
            } else {
                i += 1;
            }
        }
        if dropped_waiting + dropped_running > 0 {
            tracing::debug!(waiting = dropped_waiting, running = dropped_running, "cancelled requests of disconnected clients");
        }
    }

    fn abort_all(&mut self, why: &str) {
        while let Some(w) = self.waiting.pop_front() {
            self.reject(&w.events, ApiError::unavailable(why));
        }
        while !self.running.is_empty() {
            let r = self.remove_running(self.running.len() - 1, "abort");
            self.reject(&r.events, ApiError::unavailable(why));
        }
    }

    fn refresh_views(&mut self) {
        let list = self.engine.loras().adapters();
        let entries: Vec<AdapterEntry> = list
            .iter()
            .filter(|a| !self.pending_unload.contains(&a.name))
            .map(|a| AdapterEntry {
                name: a.name.clone(),
                path: a.path.clone(),
                resident: a.resident.is_some(),
                bytes: a.bytes,
                active: a.active,
            })
            .collect();
        let m = &self.metrics;
        m.adapter_resident.reset();
        m.adapter_bytes.reset();
        for a in list.iter().filter(|a| a.resident.is_some()) {
            m.adapter_resident.with_label_values(&[&a.name]).set(1.0);
            m.adapter_bytes.with_label_values(&[&a.name]).set(a.bytes as f64);
        }
        m.adapters_known.set(entries.len() as i64);
        m.adapters_resident.set(self.engine.loras().resident_count() as i64);
        m.adapters_resident_bytes.set(self.engine.loras().resident_bytes() as i64);
        if let Ok(mut v) = self.shared.adapters.write() {
            *v = entries;
        }
        self.views_dirty = false;
    }

    fn update_metrics(&mut self) {
        let stats = self.engine.loras().stats().clone();
        if stats.loads != self.last_loads || stats.evictions != self.last_evictions {
            self.views_dirty = true;
        }
        self.metrics.adapter_loads.inc_by(stats.loads - self.last_loads);
        self.metrics.adapter_evictions.inc_by(stats.evictions - self.last_evictions);
        self.metrics.adapter_load_seconds.inc_by((stats.load_seconds - self.last_load_seconds).max(0.0));
        self.last_loads = stats.loads;
        self.last_evictions = stats.evictions;
        self.last_load_seconds = stats.load_seconds;
        if self.views_dirty {
            self.refresh_views();
        }
        self.metrics.set_queue(self.running.len(), self.waiting.len());
        let used: usize = self.running.iter().map(|r| cache_blocks(&r.seq)).sum();
        self.metrics.set_kv(used * self.limits.block_bytes, self.limits.budget_blocks * self.limits.block_bytes);
        let names = |it: &mut dyn Iterator<Item = &String>| {
            let mut v: Vec<&str> = it.map(String::as_str).collect();
            v.sort_unstable();
            v.dedup();
            v.join(",")
        };
        let running = names(&mut self.running.iter().filter_map(|r| r.adapter.as_ref()));
        let waiting = names(&mut self.waiting.iter().filter_map(|w| w.job.adapter.as_ref()));
        if (running.as_str(), waiting.as_str()) != (self.lora_info.0.as_str(), self.lora_info.1.as_str()) {
            self.metrics.set_lora_info(self.limits.max_loras, &running, &waiting);
            self.lora_info = (running, waiting);
        }
    }
}
