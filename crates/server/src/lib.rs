//! loramux's server: one base model, many LoRA adapters, OpenAI/vLLM-compatible HTTP.
//!
//! - [`scheduler`]: the batch loop on its own thread, a thin actor over the engine's
//!   scheduler (continuous mixed-adapter batching, chunked prefill, KV-cache budget with
//!   preemption, adapter-aware FCFS admission with lazy loading off the loop); a bounded
//!   waiting queue refuses excess requests with 429 at once.
//! - [`routes`]: `/v1/chat/completions`, `/v1/completions` (JSON and SSE), `/v1/models`,
//!   `/v1/load_lora_adapter`, `/v1/unload_lora_adapter`, `/health`, `/metrics`; one file per
//!   endpoint group, and [`routes::router`] lists them all: **an endpoint is added there**.
//! - [`openai`]: request parsing; [`protocol`]: the typed responses, stream chunks,
//!   logprobs and model cards; [`error`]: OpenAI-style errors.
//! - [`tenants`]: keys bound to adapters, per-tenant limits, reload of `--tenants FILE`.
//! - [`uploads`]: tenants' adapter uploads (multipart parsing, the durable adapter store).
//! - [`sources`]: adapters from `s3://`, `hf://` and `https://` (fetch, disk cache,
//!   `--lora-dir URI` lookups on a miss, `--lora-sync`, what `/ready` waits for).
//! - [`auth`], [`adapters`] (adapter roots and `--lora-dir`), [`metrics`], [`config`].
//!
//! [`Server::start`] binds and serves; [`Server::shutdown`] drains gracefully. The server
//! does no model math: it reaches the engine only through `loramux_engine`'s public API and
//! the scheduler actor. `crates/server/README.md` has the file map.

pub mod adapters;
pub mod auth;
pub mod config;
mod durable;
pub mod error;
mod http;
pub mod metrics;
pub mod openai;
pub mod protocol;
pub mod routes;
pub mod scheduler;
pub mod sources;
pub mod tenants;
pub mod uploads;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use loramux_engine::ModelLocation;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use config::{ServeConfig, Settings};
pub use error::{ApiError, ServerError};
pub use scheduler::EngineInfo;

use crate::auth::Auth;
use crate::metrics::Metrics;
use crate::routes::AppState;
use crate::tenants::TenantStore;

/// How often the tenants file's modification time and length are checked.
const TENANTS_POLL: Duration = Duration::from_secs(1);

/// A running server.
pub struct Server {
    addr: SocketAddr,
    state: Arc<AppState>,
    stop: watch::Sender<bool>,
    http: JoinHandle<std::io::Result<()>>,
    batch_thread: Option<std::thread::JoinHandle<()>>,
    /// Re-reads the tenants file (on SIGHUP and when it changes), if there is one.
    tenants_reloader: Option<JoinHandle<()>>,
    /// Fetches the remote startup adapters; reconciles `--lora-sync` (stopped at shutdown).
    adapter_tasks: Vec<JoinHandle<()>>,
    shutdown_timeout: Duration,
}

fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

impl Server {
    /// Loads the model and adapters, binds `settings.host:settings.port` (port 0 picks a free
    /// one) and starts serving. Must be called inside a multi-threaded Tokio runtime.
    pub async fn start(location: ModelLocation, mut settings: Settings) -> Result<Self, ServerError> {
        let metrics = Arc::new(Metrics::new(&settings.served_model_name, settings.lora.max_loras));
        let sources = Arc::new(open_sources(&settings, metrics.clone())?);
        if let Some(uri) = settings.merge_lora_uri.take() {
            let path = sources.fetch(&uri).await.map_err(|e| ServerError::Config(format!("--merge-lora: {e}")))?;
            settings.merge_lora = Some(path);
        }
        // Remote startup adapters are pinned once fetched, after the server listens.
        let remote_pins: std::collections::HashSet<String> =
            settings.pinned_loras.iter().filter(|p| settings.remote_lora_modules.iter().any(|(n, _)| n == *p)).cloned().collect();
        settings.pinned_loras.retain(|p| !remote_pins.contains(p));
        // Checked before the model loads, which can take a while (the engine refuses a
        // quantized base too, later).
        check_merge_lora(&location, &settings)?;
        let tenant_store = Arc::new(
            TenantStore::new(&settings.api_keys, settings.tenants_file.clone()).map_err(|e| ServerError::Config(e.to_string()))?,
        );
        let (lora_dirs, roots) = adapter_dirs(&settings)?;
        let uploads = open_adapter_store(&settings, &tenant_store)?;
        let uploaded: Vec<(String, PathBuf)> =
            uploads.iter().flat_map(|s| s.entries().into_iter().map(|e| (e.id(), s.adapter_path(&e.sha256, e.format)))).collect();

        let t = Instant::now();
        tracing::info!(model = %location.path().display(), "loading model");
        let (sched, batch_thread) = scheduler::spawn(location, &settings, lora_dirs.clone(), uploaded.clone(), metrics.clone()).await?;
        log_loaded(&settings, &sched.info, &roots);

        let auth = Auth::new(tenant_store.clone(), settings.admin_api_key.clone());
        for (id, _) in uploaded {
            auth.uploaded().insert(id);
        }
        let state = Arc::new(AppState {
            sched,
            auth,
            metrics,
            base_name: settings.served_model_name.clone(),
            adapter_roots: roots,
            request_timeout: settings.request_timeout,
            http_read_timeout: settings.http_read_timeout,
            lora_updates: settings.enable_lora_updates,
            max_body: settings.max_request_bytes,
            uploads,
            max_upload_bytes: settings.max_upload_bytes,
            created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            routing: settings.router.clone(),
            web_ui: settings.web_ui,
            sources,
        });
        let bind = format!("{}:{}", settings.host, settings.port);
        let listener = match tokio::net::TcpListener::bind(&bind).await {
            Ok(l) => l,
            Err(e) => {
                state.sched.drain(Instant::now());
                return Err(ServerError::io(format!("cannot listen on {bind}"), e));
            }
        };
        let addr = listener.local_addr().map_err(|e| ServerError::io("local address", e))?;
        let (stop, stop_rx) = watch::channel(false);
        let app = routes::router(state.clone());
        let http = tokio::spawn(http::serve(listener, app, settings.http_read_timeout, stop_rx));
        if let Some(m) = crate::metrics::process_memory() {
            tracing::info!(
                rss = %mib(m.resident_bytes as usize),
                peak_rss = %mib(m.peak_resident_bytes as usize),
                startup_seconds = format!("{:.2}", t.elapsed().as_secs_f64()),
                "process memory"
            );
        }
        if state.auth.enabled() {
            let file = settings.tenants_file.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
            tracing::info!(tenants = tenant_store.current().len(), file = %file, "API keys required on /v1");
        }
        let tenants_reloader = tenants::spawn_reloader(tenant_store, TENANTS_POLL);
        let mut adapter_tasks = vec![state.sources.spawn_startup(state.sched.clone(), settings.remote_lora_modules.clone(), remote_pins)];
        if let Some(file) = &settings.lora_sync {
            adapter_tasks.push(sources::spawn_sync(state.sources.clone(), state.sched.clone(), file.clone(), settings.served_model_name.clone()));
        }
        tracing::info!("serving {} at http://{addr}/v1 (OpenAI API; /health, /metrics)", settings.served_model_name);
        Ok(Self {
            addr,
            state,
            stop,
            http,
            batch_thread: Some(batch_thread),
            tenants_reloader,
            adapter_tasks,
            shutdown_timeout: settings.shutdown_timeout,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The loaded model.
    pub fn info(&self) -> &EngineInfo {
        &self.state.sched.info
    }

    /// Stops accepting connections, lets in-flight requests finish for up to the shutdown
    /// timeout, cancels what is left, and waits for the batch loop to end.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        if let Some(r) = self.tenants_reloader.take() {
            r.abort();
        }
        for t in self.adapter_tasks.drain(..) {
            t.abort();
        }
        let deadline = Instant::now() + self.shutdown_timeout;
        self.state.sched.drain(deadline);
        let _ = self.stop.send(true);
        let grace = self.shutdown_timeout + Duration::from_secs(2);
        match tokio::time::timeout(grace, &mut self.http).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!("HTTP server: {e}"),
            Ok(Err(e)) => tracing::warn!("HTTP task: {e}"),
            Err(_) => {
                tracing::warn!("connections still open after the shutdown timeout: closing them");
                self.http.abort();
            }
        }
        drop(self.state);
        if let Some(t) = self.batch_thread.take() {
            let joined = tokio::task::spawn_blocking(move || t.join());
            match tokio::time::timeout(Duration::from_secs(10), joined).await {
                Ok(Ok(Ok(()))) => {}
                Ok(_) => return Err(ServerError::Scheduler("the batch thread panicked".into())),
                Err(_) => return Err(ServerError::Scheduler("the batch thread did not stop".into())),
            }
        }
        tracing::info!("server stopped");
        Ok(())
    }

    /// Serves until SIGINT or SIGTERM, then shuts down gracefully. A second signal exits at
    /// once. If the batch loop dies, returns an error (the process should exit non-zero so
    /// an orchestrator restarts it; `/health` already answers 503).
    pub async fn run_until_signal(self) -> Result<(), ServerError> {
        let which = tokio::select! {
            s = shutdown_signal() => s,
            stopped = self.watch() => {
                let _ = self.stop.send(true);
                return Err(ServerError::Scheduler(stopped.into()));
            }
        };
        tracing::info!("{which} received: shutting down (up to {:.0}s for in-flight requests; signal again to exit now)", self.shutdown_timeout.as_secs_f64());
        tokio::spawn(async {
            let s = shutdown_signal().await;
            tracing::warn!("second {s}: exiting now");
            std::process::exit(130);
        });
        self.shutdown().await
    }

    /// Resolves when the HTTP server or the batch loop stopped on its own, saying which.
    async fn watch(&self) -> &'static str {
        loop {
            if self.http.is_finished() {
                return "the HTTP server stopped unexpectedly";
            }
            if !self.state.sched.shared.is_alive() {
                return "the batch loop stopped (see the error above)";
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// `--merge-lora` needs a float base and an adapter that exists.
fn check_merge_lora(location: &ModelLocation, settings: &Settings) -> Result<(), ServerError> {
    if let Some(merge) = &settings.merge_lora {
        if matches!(location, ModelLocation::Gguf(_)) && !settings.dequantize {
            return Err(ServerError::Config(format!(
                "--merge-lora {} needs a float base model, but {} is a quantized GGUF: add --dequantize to load \
                 it as float32, or serve a Hugging Face safetensors directory",
                merge.display(),
                location.path().display()
            )));
        }
        if !merge.exists() {
            return Err(ServerError::Config(format!(
                "--merge-lora {} does not exist (a PEFT adapter folder or a llama.cpp GGUF adapter file)",
                merge.display()
            )));
        }
    }
    Ok(())
}

/// The remote sources: the disk cache (cleaned of what a killed fetch left) and the clients.
fn open_sources(settings: &Settings, metrics: Arc<Metrics>) -> Result<sources::Sources, ServerError> {
    let source_settings = sources::SourceSettings {
        cache_dir: settings.lora_cache_dir.clone(),
        cache_bytes: settings.lora_cache_bytes,
        max_bytes: settings.lora.max_bytes as u64,
        timeout: settings.lora_fetch_timeout,
        prefixes: settings.lora_prefixes.clone(),
        local_dirs: settings.lora_dirs.clone(),
    };
    let s = sources::Sources::new(source_settings, metrics).map_err(|e| ServerError::Config(e.to_string()))?;
    for p in &settings.lora_prefixes {
        tracing::info!(prefix = %p, "adapter prefix: an unknown adapter name is fetched from here on its first request");
    }
    Ok(s)
}

/// The adapter store, when there are tenants to upload (cleaned of what a crash left).
fn open_adapter_store(settings: &Settings, tenants: &TenantStore) -> Result<Option<Arc<uploads::AdapterStore>>, ServerError> {
    if !tenants.required() {
        return Ok(None);
    }
    let store = uploads::AdapterStore::open(settings.adapter_store.clone()).map_err(|e| ServerError::Config(e.to_string()))?;
    tracing::info!(dir = %settings.adapter_store.display(), adapters = store.entries().len(), "adapter store: uploads re-registered");
    Ok(Some(Arc::new(store)))
}

/// The `--lora-dir`s, canonical and deduplicated, and the roots `load_lora_adapter` may read
/// from: those plus the `--allowed-lora-root`s.
fn adapter_dirs(settings: &Settings) -> Result<(Vec<PathBuf>, Vec<PathBuf>), ServerError> {
    let mut lora_dirs = Vec::new();
    for d in &settings.lora_dirs {
        let c = d.canonicalize().map_err(|e| ServerError::io(format!("--lora-dir {}", d.display()), e))?;
        if !c.is_dir() {
            return Err(ServerError::Config(format!("--lora-dir {} is not a directory", d.display())));
        }
        if !lora_dirs.contains(&c) {
            lora_dirs.push(c);
        }
    }
    let mut roots = lora_dirs.clone();
    for r in adapters::canonical_roots(&settings.allowed_lora_roots) {
        if !roots.contains(&r) {
            roots.push(r);
        }
    }
    Ok((lora_dirs, roots))
}

/// What was loaded: the model, the KV-cache budget, the adapters and where runtime loads may read.
fn log_loaded(settings: &Settings, info: &EngineInfo, roots: &[PathBuf]) {
    tracing::info!(
        name = %settings.served_model_name,
        path = %info.location.path().display(),
        architecture = %info.architecture,
        weights = %mib(info.weight_bytes),
        quantized = info.quantized,
        max_model_len = info.max_model_len,
        seconds = format!("{:.2}", info.load_seconds),
        "model loaded"
    );
    if let Some(p) = &info.merged_lora {
        tracing::info!(
            name = %settings.served_model_name,
            adapter = %p.display(),
            "serving the base model with this adapter merged into its weights (--merge-lora)"
        );
    }
    tracing::info!(
        budget = %mib(info.kv_budget_bytes),
        tokens = info.kv_budget_bytes / info.kv_bytes_per_token.max(1),
        bytes_per_token = info.kv_bytes_per_token,
        max_num_seqs = settings.max_num_seqs,
        max_num_batched_tokens = settings.max_num_batched_tokens,
        "KV cache"
    );
    let startup_bytes: usize = info.startup_adapters.iter().map(|a| a.1).sum();
    tracing::info!(
        known = info.known_adapters,
        loaded = info.startup_adapters.len(),
        loaded_bytes = %mib(startup_bytes),
        max_loras = settings.lora.max_loras,
        max_lora_rank = settings.lora.max_rank,
        runtime_updates = settings.enable_lora_updates,
        "adapters"
    );
    if settings.enable_lora_updates {
        for r in roots {
            tracing::info!(root = %r.display(), "load_lora_adapter may read from");
        }
        if roots.is_empty() {
            tracing::warn!("--enable-lora-updates without --lora-dir or --allowed-lora-root: no adapter can be loaded at run time");
        }
    }
}

async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return "SIGINT";
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }
}
