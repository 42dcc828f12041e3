//! Starting the batch thread: the model, the `--merge-lora` adapter, the `--lora-dir`s,
//! `--lora-modules` and the tenants' uploaded adapters are loaded there (the engine never leaves that thread), then the loop
//! runs. The caller waits for the model to load and gets a [`SchedulerHandle`] back.

use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Instant;

use loramux_engine::lora::scan_lora_dir;
use loramux_engine::registry::{cache_dir, resolve_folder_model};
use loramux_engine::routing::{read_routing_file, BaseEmbedder, Embedder, Pooling, Router, RouterConfig, SentenceEmbedder};
use loramux_engine::{Engine, EngineError, EngineOptions, ModelLocation, Scheduler, SchedulerConfig};
use tokio::sync::oneshot;

use super::actor::BatchLoop;
use super::{EngineInfo, SchedulerHandle, Shared};
use crate::config::Settings;
use crate::error::ServerError;
use crate::metrics::Metrics;

/// Commands that may wait for the loop beyond the waiting queue (adapter loads, unloads).
const ADMIN_COMMANDS: usize = 64;

/// Starts the loop thread: loads the model and startup adapters there, then serves.
pub(crate) async fn spawn(
    location: ModelLocation,
    settings: &Settings,
    lora_dirs: Vec<PathBuf>,
    uploaded: Vec<(String, PathBuf)>,
    metrics: Arc<Metrics>,
) -> Result<(SchedulerHandle, JoinHandle<()>), ServerError> {
    let (tx, rx) = mpsc::sync_channel(settings.max_waiting + ADMIN_COMMANDS);
    let shared = Arc::new(Shared::new());
    let (ready_tx, ready_rx) = oneshot::channel();
    let settings = settings.clone();
    let thread_shared = shared.clone();
    let join = std::thread::Builder::new()
        .name("loramux-batch".into())
        .spawn(move || match load(location, &settings, &lora_dirs, &uploaded) {
            Ok((engine, scheduler, info, router)) => {
                let gate = scheduler.admission_gate().clone();
                let input = engine.input().clone();
                let reader = engine.loras().reader().clone();
                let mut batch_loop = BatchLoop::new(engine, scheduler, rx, thread_shared, metrics, &settings);
                // The adapter views are current before the first request or scrape can come.
                batch_loop.publish_adapters();
                let _ = ready_tx.send(Ok((info, gate, input, reader, router)));
                batch_loop.run();
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        })
        .map_err(|e| ServerError::io("spawning the batch thread", e))?;
    match ready_rx.await {
        Ok(Ok((info, gate, input, reader, router))) => {
            Ok((SchedulerHandle { tx, gate, shared, info: Arc::new(info), input, reader, router }, join))
        }
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

/// Loads the engine and the startup adapters and makes the scheduler, in order: the model
/// (with `--merge-lora`), the scheduler, `--lora-dir`s, `--lora-modules`, `--pin-lora`, then
/// the uploaded adapters, then the router over the startup adapters' routing files.
fn load(
    location: ModelLocation,
    settings: &Settings,
    lora_dirs: &[PathBuf],
    uploaded: &[(String, PathBuf)],
) -> Result<(Engine, Scheduler, EngineInfo, Arc<Router>), ServerError> {
    let (mut engine, load_seconds) = load_engine(&location, settings)?;
    let mut scheduler = Scheduler::new(
        SchedulerConfig {
            max_num_seqs: settings.max_num_seqs,
            max_num_batched_tokens: settings.max_num_batched_tokens,
            enable_chunked_prefill: settings.enable_chunked_prefill,
            kv_cache_bytes: settings.kv_cache_bytes,
            max_waiting: settings.max_waiting,
            max_queue_delay: settings.max_queue_delay,
            adapter_wait: settings.adapter_wait,
            auto_merge_after: settings.auto_merge_after,
            policy: settings.scheduling_policy,
            target_tpot: settings.target_tpot,
            target_ttft: settings.target_ttft,
        },
        &engine,
    )
    .map_err(|e| ServerError::Config(e.to_string()))?;
    scheduler.inject_admission_panic(settings.debug_faults.panic_on_admit.clone());
    engine.loras_mut().inject_reader_panic(settings.debug_faults.panic_on_adapter_read.clone());
    engine.inject_forward_panic(settings.debug_faults.panic_on_forward.clone());

    register_lora_dirs(&mut engine, settings, lora_dirs)?;
    let startup_adapters = load_lora_modules(&mut engine, settings)?;
    pin_loras(&mut engine, settings)?;
    register_uploads(&mut engine, uploaded);
    let cfg = engine.model().config();
    let (_, kv_budget_bytes) = scheduler.kv_usage_bytes();
    let info = EngineInfo {
        location,
        architecture: format!("{:?}", cfg.architecture),
        max_model_len: engine.max_model_len(),
        weight_bytes: engine.model().size_in_bytes(),
        quantized: engine.model().is_quantized(),
        shapes: engine.loras().shapes().clone(),
        max_lora_rank: settings.lora.max_rank,
        kv_budget_bytes,
        kv_bytes_per_token: engine.kv_floats_per_token() * std::mem::size_of::<f32>(),
        load_seconds,
        startup_adapters,
        known_adapters: engine.loras().adapters().len(),
        merged_lora: settings.merge_lora.clone(),
    };
    let router = make_router(&engine, &info.location, settings)?;
    Ok((engine, scheduler, info, router))
}

/// The semantic router: by default a base-only view of the model that shares the engine's
/// weights (no copy; see `loramux_engine::routing`), or the `--router-model` sentence model;
/// example embeddings cached on disk under `<cache>/routing`; and every startup adapter
/// (`--lora-dir`, `--lora-modules`) that has a routing file, routable without its weights
/// being loaded. A bad routing file fails startup, naming the file and the field.
fn make_router(engine: &Engine, location: &ModelLocation, settings: &Settings) -> Result<Arc<Router>, ServerError> {
    if let Some(f) = &settings.router.fallback {
        if !engine.loras().adapters().iter().any(|a| &a.name == f) {
            return Err(ServerError::Config(format!("--router-fallback {f}: no adapter of that name in --lora-modules or --lora-dir")));
        }
    }
    let embedder: Arc<dyn Embedder> = match &settings.router.model {
        Some(spec) => {
            let dir = resolve_folder_model(spec).map_err(|e| ServerError::Config(format!("--router-model: {e}")))?;
            Arc::new(SentenceEmbedder::load(&dir, engine.model().device()).map_err(|e| ServerError::Config(format!("--router-model {spec}: {e}")))?)
        }
        None => {
            let path = location.path();
            let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            let id = format!("{}-{bytes}", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default());
            let layers = engine.model().config().num_hidden_layers;
            if settings.router.layer > layers {
                return Err(ServerError::Config(format!("--router-layer {}: the model has {layers} layers", settings.router.layer)));
            }
            let view = Arc::new(engine.model().base_view());
            Arc::new(BaseEmbedder::with_layer(view, engine.input().clone(), &id, settings.router.layer, Pooling::MeanSkipFirst))
        }
    };
    let cfg = RouterConfig { min_confidence: settings.router.min_confidence, ..RouterConfig::default() };
    let router = Arc::new(Router::new(embedder, cfg, Some(&cache_dir().join("routing"))));
    let t = Instant::now();
    let mut routable = Vec::new();
    for (name, path) in engine.loras().adapters().into_iter().map(|a| (a.name, a.path)) {
        let Some(spec) = read_routing_file(&path).map_err(|e| ServerError::Config(format!("adapter '{name}': routing file refused: {e}")))?
        else {
            continue;
        };
        let route = router.prepare(&spec).map_err(|e| ServerError::Config(format!("adapter '{name}': embedding its routing examples: {e}")))?;
        router.insert(&name, route);
        routable.push(name);
    }
    if !routable.is_empty() {
        tracing::info!(adapters = %routable.join(","), ms = format!("{:.1}", t.elapsed().as_secs_f64() * 1e3), "semantic router: adapters routable");
    }
    Ok(router)
}

/// The model, with the `--merge-lora` adapter folded in; the seconds the model took to load.
fn load_engine(location: &ModelLocation, settings: &Settings) -> Result<(Engine, f64), ServerError> {
    let t = Instant::now();
    let options = EngineOptions {
        dequantize: settings.dequantize,
        max_model_len: settings.max_model_len,
        lora: settings.lora.clone(),
        prefix_cache_bytes: settings.prefix_cache_bytes,
        ..EngineOptions::default()
    };
    let mut engine = Engine::load(location, &options)?;
    let load_seconds = t.elapsed().as_secs_f64();
    if let Some(path) = &settings.merge_lora {
        engine.merge_adapter_dir(path).map_err(|source| ServerError::MergeLora { path: path.clone(), source })?;
    }
    if settings.auto_merge_after.is_some() && engine.model().is_quantized() {
        return Err(ServerError::Config(
            "--auto-merge folds adapters into float weights, but the model's weights are quantized: add --dequantize \
             (on a CPU the quantized kernels are faster than any merge saves; see BENCHMARKS.md \"Automatic merge and unmerge\")"
                .into(),
        ));
    }
    Ok((engine, load_seconds))
}

/// `--lora-dir` adapters: known by folder name, read on first use.
fn register_lora_dirs(engine: &mut Engine, settings: &Settings, lora_dirs: &[PathBuf]) -> Result<(), ServerError> {
    for dir in lora_dirs {
        let found = scan_lora_dir(dir).map_err(|e| ServerError::io(format!("reading --lora-dir {}", dir.display()), e))?;
        let mut shown: Vec<&str> = found.iter().take(12).map(|(n, _)| n.as_str()).collect();
        if found.len() > shown.len() {
            shown.push("...");
        }
        tracing::info!(dir = %dir.display(), adapters = found.len(), names = %shown.join(","), "adapter directory: known by folder name, loaded on first use");
        for (name, path) in found {
            if name == settings.served_model_name {
                tracing::warn!(adapter = %name, "skipped: the name is the base model's");
                continue;
            }
            if engine.loras_mut().resolve(&name).is_ok() {
                tracing::warn!(adapter = %name, skipped = %path.display(), "two adapters share a name");
                continue;
            }
            engine.loras_mut().register(&name, &path);
        }
        engine.loras_mut().add_lora_dir(dir.clone());
    }
    Ok(())
}

/// `--lora-modules`: loaded now (the first `--max-loras` of them), so a broken one fails
/// startup; the rest are registered. Returns the loaded ones with their sizes in bytes.
fn load_lora_modules(engine: &mut Engine, settings: &Settings) -> Result<Vec<(String, usize)>, ServerError> {
    let mut startup_adapters = Vec::new();
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
    }
    Ok(startup_adapters)
}

/// The adapter store's uploads (`<tenant>/<name>`, checked when uploaded): known, read on
/// first use. A name a startup adapter already has is skipped with a warning.
fn register_uploads(engine: &mut Engine, uploaded: &[(String, PathBuf)]) {
    for (name, path) in uploaded {
        if engine.loras_mut().resolve(name).is_ok() {
            tracing::warn!(adapter = %name, skipped = %path.display(), "an uploaded adapter has the name of a startup adapter");
            continue;
        }
        engine.loras_mut().register(name, path);
    }
}

/// `--pin-lora`: resident now (a broken or unknown one fails startup) and never evicted.
fn pin_loras(engine: &mut Engine, settings: &Settings) -> Result<(), ServerError> {
    for name in &settings.pinned_loras {
        engine.loras_mut().pin(name).map_err(|e| match e {
            EngineError::UnknownAdapter(_) => {
                ServerError::Config(format!("--pin-lora {name}: no adapter of that name in --lora-modules or --lora-dir"))
            }
            EngineError::AdapterCapacity(m) => ServerError::Config(format!("--pin-lora {name}: {m}")),
            e => e.into(),
        })?;
        tracing::info!(adapter = %name, "adapter pinned: resident, never evicted");
    }
    Ok(())
}
