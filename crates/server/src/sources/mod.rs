//! Adapters from object storage, the hub and URLs (issue #23), so that an adapter stored
//! once is served by every replica of a fleet with nothing copied by hand.
//!
//! - `uri.rs`: [`AdapterUri`], `s3://`, `hf://`, `https://` (and `http://`) with an optional
//!   `#sha256=` pin, parsed where it is given;
//! - `fetch.rs`: the clients (object_store for S3, reqwest for the hub and URLs), streaming
//!   to disk under the size cap;
//! - `aws_profile.rs`: the AWS shared credentials and config files, for S3 without `AWS_*` keys;
//! - `archive.rs`: a PEFT folder packed as `.tar.gz` / `.zip`, unpacked safely;
//! - `cache.rs`: [`LoraCache`], the content-addressed disk cache, atomic and verified;
//! - `sync.rs`: `--lora-sync`, the GIE lora syncer's ConfigMap file reconciled in-process;
//! - this file: [`Sources`], which ties them together: one fetch per URI at a time (single
//!   flight), the `--lora-dir URI` lookup of an unknown name, and making a fetched adapter
//!   served (read off the batch loop, inserted through the actor); and [`Readiness`].

mod archive;
mod aws_profile;
mod cache;
mod error;
mod fetch;
mod sync;
mod uri;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use loramux_engine::routing::read_routing_file;
use tokio::sync::OnceCell;

pub use aws_profile::AwsProfile;
pub use cache::LoraCache;
pub use error::SourceError;
pub use sync::spawn_sync;
pub use uri::{AdapterUri, Location, Shape, UriError};

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::scheduler::{InsertOutcome, SchedulerHandle};

/// Concurrent calls with the same key share one run of the work and its result.
struct SingleFlight<T>(Mutex<HashMap<String, Arc<OnceCell<T>>>>);

impl<T: Clone> SingleFlight<T> {
    fn new() -> Self {
        Self(Mutex::default())
    }

    /// Runs `work` unless a run for `key` is under way, then waits for that one instead.
    /// Once it is done the key is forgotten: a later call runs again (and finds the cache).
    async fn run<F: Future<Output = T>>(&self, key: &str, work: impl FnOnce() -> F) -> T {
        let cell = self.0.lock().unwrap_or_else(|e| e.into_inner()).entry(key.to_string()).or_default().clone();
        let out = cell.get_or_init(work).await.clone();
        let mut flights = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if flights.get(key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            flights.remove(key);
        }
        out
    }
}

/// What `/ready` waits for: the remote startup adapters (`--lora-modules` URIs and their
/// `--pin-lora`), each with the last error while it is retried.
#[derive(Default)]
pub struct Readiness(Mutex<BTreeMap<String, String>>);

impl Readiness {
    fn set(&self, name: &str, status: String) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), status);
    }

    fn done(&self, name: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
    }

    /// The adapters not loaded yet and why; empty when ready.
    pub fn pending(&self) -> Vec<(String, String)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// Settings of the sources, from the flags.
#[derive(Clone, Debug)]
pub struct SourceSettings {
    /// `--lora-cache-dir` (default `<cache>/lora-cache`).
    pub cache_dir: PathBuf,
    /// `--lora-cache-bytes`.
    pub cache_bytes: u64,
    /// `--max-lora-bytes`: the largest adapter a fetch may bring.
    pub max_bytes: u64,
    /// `--lora-fetch-timeout-secs`.
    pub timeout: Duration,
    /// `--lora-dir` URIs: an unknown adapter name is looked up under each, in order.
    pub prefixes: Vec<AdapterUri>,
    /// The local `--lora-dir`s, which the engine looks names up in first.
    pub local_dirs: Vec<PathBuf>,
}

/// The remote adapters of one server: clients, cache, flights in progress.
pub struct Sources {
    fetcher: fetch::Fetcher,
    cache: LoraCache,
    settings: SourceSettings,
    metrics: Arc<Metrics>,
    fetches: SingleFlight<Result<PathBuf, SourceError>>,
    lookups: SingleFlight<Result<(), ApiError>>,
    /// Adapters served from the cache, by name: what eviction must not pull from under a
    /// resident adapter, and what to unload when it does evict.
    served: Mutex<HashMap<String, PathBuf>>,
    pub readiness: Readiness,
}

/// Whether a requested name may be looked up under a `--lora-dir` URI: one path segment of
/// `[A-Za-z0-9_.-]`, not starting with `.` (so it cannot climb out of the prefix).
fn lookup_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

impl Sources {
    /// Opens the cache (removing what a killed fetch left) and makes the clients.
    pub fn new(settings: SourceSettings, metrics: Arc<Metrics>) -> Result<Self, SourceError> {
        let cache = LoraCache::open(settings.cache_dir.clone(), settings.cache_bytes)?;
        let fetcher =
            fetch::Fetcher::new(settings.max_bytes).map_err(|message| SourceError::Cache { path: String::new(), message })?;
        Ok(Self {
            fetcher,
            cache,
            settings,
            metrics,
            fetches: SingleFlight::new(),
            lookups: SingleFlight::new(),
            served: Mutex::default(),
            readiness: Readiness::default(),
        })
    }

    /// The local folder or file of `uri`: from the cache (verified), else fetched, checked
    /// against its pin, unpacked and cached. One fetch per URI at a time.
    pub async fn fetch(&self, uri: &AdapterUri) -> Result<PathBuf, SourceError> {
        let key = uri.to_string();
        self.fetches.run(&key, || self.fetch_uncached(uri, &key)).await
    }

    async fn fetch_uncached(&self, uri: &AdapterUri, key: &str) -> Result<PathBuf, SourceError> {
        if let Some(path) = tokio::task::block_in_place(|| self.cache.lookup(key)) {
            self.metrics.lora_cache_hits.inc();
            tracing::info!(source = %key, path = %path.display(), "adapter from the disk cache");
            return Ok(path);
        }
        let t = Instant::now();
        let staging = self.cache.staging()?;
        let result = match tokio::time::timeout(self.settings.timeout, self.fetcher.download(uri, &staging.dir)).await {
            Ok(r) => r,
            Err(_) => Err(SourceError::Timeout { uri: key.to_string(), secs: self.settings.timeout.as_secs() }),
        };
        let outcome = match &result {
            Ok(_) => "ok",
            Err(SourceError::NotFound { .. }) => "not_found",
            Err(SourceError::Denied { .. }) => "denied",
            Err(_) => "error",
        };
        self.metrics.lora_fetches.with_label_values(&[uri.kind(), outcome]).inc();
        let downloaded = result?;
        self.metrics.lora_fetch_bytes.inc_by(downloaded.bytes);
        if let Some(pin) = &uri.sha256 {
            if *pin != downloaded.digest {
                return Err(SourceError::Checksum { uri: key.to_string(), expected: pin.clone(), actual: downloaded.digest });
            }
        }
        if matches!(uri.shape(), Shape::TarGz | Shape::Zip) {
            let archive = staging.dir.join(fetch::ARCHIVE_FILE);
            tokio::task::block_in_place(|| archive::unpack(&archive, uri.shape(), &staging.dir, self.settings.max_bytes))
                .map_err(|message| SourceError::Invalid { uri: key.to_string(), message })?;
            std::fs::remove_file(&archive).map_err(|e| SourceError::Cache { path: archive.display().to_string(), message: e.to_string() })?;
        }
        let path = tokio::task::block_in_place(|| self.cache.commit(staging, key))?;
        let seconds = t.elapsed().as_secs_f64();
        self.metrics.lora_fetch_seconds.observe(seconds);
        tracing::info!(source = %key, bytes = downloaded.bytes, ms = format!("{:.1}", seconds * 1e3), path = %path.display(), "adapter fetched");
        Ok(path)
    }

    /// Fetches `uri` and serves it as `name` ([`Sources::serve_path`]).
    pub async fn serve(&self, sched: &SchedulerHandle, name: &str, uri: &AdapterUri, replace: bool) -> Result<InsertOutcome, ApiError> {
        let path = self.fetch(uri).await.map_err(|e| e.api_error("lora_path"))?;
        self.serve_path(sched, name, &path, &uri.to_string(), replace).await
    }

    /// Serves the adapter at `path` (`shown`: where it came from, for errors) as `name`: read
    /// and checked off the batch loop, its routing file (if any) made routable, inserted
    /// through the actor (`replace`: over an adapter of that name). Then the cache is brought
    /// under its cap.
    pub async fn serve_path(&self, sched: &SchedulerHandle, name: &str, path: &Path, shown: &str, replace: bool) -> Result<InsertOutcome, ApiError> {
        let routing = read_routing_file(path).map_err(|e| ApiError::invalid_param("lora_path", format!("{shown}: routing file refused: {e}")))?;
        let route = match routing {
            Some(spec) => {
                let router = sched.router.clone();
                let r = tokio::task::spawn_blocking(move || router.prepare(&spec)).await.map_err(|e| ApiError::internal(e.to_string()))?;
                Some(r.map_err(|e| ApiError::invalid_param("routing", format!("cannot embed the routing examples: {e}")))?)
            }
            None => None,
        };
        let reader = sched.reader.clone();
        let (read_name, read_path) = (name.to_string(), path.to_path_buf());
        let read = tokio::task::spawn_blocking(move || reader.read(&read_name, &read_path))
            .await
            .map_err(|e| ApiError::internal(format!("adapter reader failed: {e}")))?;
        let (model, seconds) = read.map_err(|e| {
            self.metrics.adapter_load_failures.inc();
            ApiError::invalid_param("lora_path", format!("{shown}: {}", ApiError::from_engine(&e).message))
        })?;
        self.metrics.adapter_load_latency.observe(seconds);
        let outcome = sched.insert_adapter(model, seconds, replace).await?;
        if let Some(route) = route {
            sched.router.insert(name, route);
        }
        self.note_served(sched, name, path).await;
        Ok(outcome)
    }

    /// Records that `name` is served from `path` in the cache, then evicts what is over the
    /// cap: adapters whose files are evicted are unloaded (a later request fetches them again).
    pub async fn note_served(&self, sched: &SchedulerHandle, name: &str, path: &Path) {
        if !path.starts_with(self.cache.root()) {
            return;
        }
        self.served.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), path.to_path_buf());
        let resident: HashSet<String> = sched.shared.adapters().into_iter().filter(|a| a.resident).map(|a| a.name).collect();
        let keep: HashSet<PathBuf> = {
            let served = self.served.lock().unwrap_or_else(|e| e.into_inner());
            served.iter().filter(|(n, _)| resident.contains(*n)).map(|(_, p)| p.clone()).collect()
        };
        let evicted = tokio::task::block_in_place(|| self.cache.evict(&keep));
        if evicted.is_empty() {
            return;
        }
        let names: Vec<String> = {
            let mut served = self.served.lock().unwrap_or_else(|e| e.into_inner());
            let names: Vec<String> = served.iter().filter(|(_, p)| evicted.contains(p)).map(|(n, _)| n.clone()).collect();
            served.retain(|_, p| !evicted.contains(p));
            names
        };
        for n in names {
            let _ = sched.unload_adapter(&n).await;
            sched.router.remove(&n);
        }
    }

    /// The `--lora-dir URI` lookup: a requested adapter nobody knows is fetched from the
    /// first prefix that has it (a PEFT folder `<prefix>/<name>/`, else `<prefix>/<name>.gguf`;
    /// for an https prefix `<name>.gguf`, else `<name>.tar.gz`) and served. Concurrent requests
    /// for it wait for one fetch; requests for other adapters are not held. A name no prefix
    /// has is left to the batch loop, which answers 404 like any unknown adapter.
    pub async fn resolve_unknown(&self, sched: &SchedulerHandle, name: &str) -> Result<(), ApiError> {
        if self.settings.prefixes.is_empty() || !lookup_name(name) || sched.shared.adapters().iter().any(|a| a.name == name) {
            return Ok(());
        }
        if self.settings.local_dirs.iter().any(|d| d.join(name).is_dir() || d.join(format!("{name}.gguf")).is_file()) {
            return Ok(());
        }
        self.lookups.run(name, || self.lookup(sched, name)).await
    }

    async fn lookup(&self, sched: &SchedulerHandle, name: &str) -> Result<(), ApiError> {
        if sched.shared.adapters().iter().any(|a| a.name == name) {
            return Ok(());
        }
        for prefix in &self.settings.prefixes {
            let candidates = match prefix.location {
                Location::Http { .. } => [prefix.join(&format!("{name}.gguf")), prefix.join(&format!("{name}.tar.gz"))],
                _ => [prefix.join(name), prefix.join(&format!("{name}.gguf"))],
            };
            for uri in candidates {
                match self.fetch(&uri).await {
                    Ok(path) => {
                        return match self.serve_path(sched, name, &path, &uri.to_string(), false).await {
                            Err(e) if e.code == Some("adapter_exists") => Ok(()),
                            Err(e) => Err(e.with_param("model")),
                            Ok(_) => {
                                tracing::info!(adapter = %name, source = %uri, "unknown adapter found under --lora-dir and loaded");
                                Ok(())
                            }
                        };
                    }
                    Err(SourceError::NotFound { .. }) => continue,
                    Err(e) => return Err(e.api_error("model")),
                }
            }
        }
        Ok(())
    }

    /// Serves the remote `--lora-modules` (and pins the `--pin-lora` ones among them), one
    /// after the other, retrying each with backoff until it is loaded; `/ready` answers 503
    /// until all are. Runs until done or aborted (at shutdown).
    pub fn spawn_startup(self: &Arc<Self>, sched: SchedulerHandle, modules: Vec<(String, AdapterUri)>, pins: HashSet<String>) -> tokio::task::JoinHandle<()> {
        for (name, uri) in &modules {
            self.readiness.set(name, format!("{uri}: not fetched yet"));
        }
        let sources = self.clone();
        tokio::spawn(async move {
            for (name, uri) in modules {
                let mut backoff = Duration::from_millis(500);
                loop {
                    let result = match sources.serve(&sched, &name, &uri, false).await {
                        Ok(_) if pins.contains(&name) => sched.pin_adapter(&name).await,
                        Ok(_) => Ok(()),
                        Err(e) => Err(e),
                    };
                    match result {
                        Ok(()) => {
                            tracing::info!(adapter = %name, source = %uri, pinned = pins.contains(&name), "startup adapter fetched and loaded");
                            sources.readiness.done(&name);
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(adapter = %name, source = %uri, retry_in_ms = backoff.as_millis() as u64, "startup adapter not loaded: {}", e.message);
                            sources.readiness.set(&name, e.message);
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(30));
                        }
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn single_flight_runs_once() {
        let flights: Arc<SingleFlight<u32>> = Arc::new(SingleFlight::new());
        let runs = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (f, r) = (flights.clone(), runs.clone());
            tasks.push(tokio::spawn(async move {
                f.run("k", || async {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    r.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 7
                })
                .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), 7);
        }
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(flights.run("k", || async { 9 }).await, 9);
    }

    #[test]
    fn lookup_names() {
        assert!(lookup_name("pirate") && lookup_name("a.b-c_1"));
        assert!(!lookup_name("../x") && !lookup_name(".x") && !lookup_name("a/b") && !lookup_name(""));
    }
}
