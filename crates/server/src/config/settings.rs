//! [`Settings`], the resolved and validated settings, and [`ServeConfig::resolve`], which
//! makes them: defaults filled in, every value checked, one named step per group of settings.

use std::path::PathBuf;
use std::time::Duration;

use loramux_engine::LoraLimits;

use super::{defaults, ServeConfig, GIB};
use crate::auth::ApiKey;
use crate::error::ServerError;
use crate::sources::AdapterUri;

/// Everything the server needs, resolved.
#[derive(Clone, Debug)]
pub struct Settings {
    pub served_model_name: String,
    /// Adapters loaded at startup (`--lora-modules` with a local path).
    pub lora_modules: Vec<(String, PathBuf)>,
    /// `--lora-modules` with a URI: fetched and loaded after the server listens; `/ready`
    /// waits for them.
    pub remote_lora_modules: Vec<(String, AdapterUri)>,
    /// Adapter merged into the base weights at startup (`--merge-lora`): the served model
    /// name then answers with the merged model, the "fully fine-tuned" deployment that
    /// unmerged LoRA serving is compared against. Other adapters still apply on top.
    pub merge_lora: Option<PathBuf>,
    /// `--merge-lora` given as a URI: fetched before the model loads, then `merge_lora`.
    pub merge_lora_uri: Option<AdapterUri>,
    /// Directories whose adapter subdirectories are known by folder name and loaded lazily.
    pub lora_dirs: Vec<PathBuf>,
    /// `--lora-dir` URIs: prefixes an unknown adapter name is fetched from.
    pub lora_prefixes: Vec<AdapterUri>,
    /// `--lora-cache-dir`, `--lora-cache-bytes`: the disk cache of fetched adapters.
    pub lora_cache_dir: PathBuf,
    pub lora_cache_bytes: u64,
    /// `--lora-fetch-timeout-secs`.
    pub lora_fetch_timeout: Duration,
    /// `--lora-sync`: the lora syncer's ConfigMap file.
    pub lora_sync: Option<PathBuf>,
    /// Extra directories `load_lora_adapter` may read from (besides `lora_dirs`).
    pub allowed_lora_roots: Vec<PathBuf>,
    /// Adapters resident from startup and never evicted (`--pin-lora`).
    pub pinned_loras: Vec<String>,
    pub lora: LoraLimits,
    pub max_num_seqs: usize,
    /// `--scheduling-policy`.
    pub scheduling_policy: loramux_engine::SchedulingPolicy,
    /// `--target-tpot-ms`.
    pub target_tpot: Option<Duration>,
    /// `--target-ttft-ms` (also the admission queue's delay bound).
    pub target_ttft: Option<Duration>,
    /// Token budget of one forward pass (chunked prefill).
    pub max_num_batched_tokens: usize,
    /// Whether a prompt's prefill may be split across steps (`--enable-chunked-prefill`). When
    /// false, a prompt is prefilled in one step, so it must fit `max_num_batched_tokens` (vLLM
    /// requires `max_num_batched_tokens >= max_model_len` then; the model length is only known
    /// once the model is loaded, so that check belongs to the scheduler).
    pub enable_chunked_prefill: bool,
    pub max_model_len: Option<usize>,
    pub kv_cache_bytes: usize,
    /// Memory for cached prompt prefixes; 0: prefix caching off.
    pub prefix_cache_bytes: usize,
    pub host: String,
    pub port: u16,
    pub api_keys: Vec<ApiKey>,
    /// `--tenants`: the tenants file, read at startup and on reload.
    pub tenants_file: Option<PathBuf>,
    pub admin_api_key: Option<String>,
    pub enable_lora_updates: bool,
    pub dequantize: bool,
    pub max_request_bytes: usize,
    /// `--adapter-store`: where uploaded adapters are kept.
    pub adapter_store: PathBuf,
    /// `--max-upload-bytes`: the largest upload body.
    pub max_upload_bytes: usize,
    /// How long a client may take to send its request headers and body (slowloris protection).
    pub http_read_timeout: Duration,
    /// Deadline of one request from arrival to its last token, queueing included; `None`: no deadline.
    pub request_timeout: Option<Duration>,
    pub shutdown_timeout: Duration,
    /// Requests waiting for a place in the batch beyond this are refused with 429 (bounded admission queue).
    pub max_waiting: usize,
    /// Requests expected to wait longer than this for a place in the batch are refused with 429.
    pub max_queue_delay: Option<Duration>,
    /// How long a request blocked on adapter capacity lets later requests overtake it.
    pub adapter_wait: Duration,
    /// `--auto-merge` with its hysteresis; `None`: off.
    pub auto_merge_after: Option<Duration>,
    /// Semantic routing (`model: "auto"`).
    pub router: RouterSettings,
    /// Whether `/` serves the web page (`--disable-web-ui` turns it off).
    pub web_ui: bool,
    /// Faults injected on purpose (tests only).
    pub debug_faults: DebugFaults,
}

/// `--router-*`: which names route, how sure the router must be, where it falls back to.
#[derive(Clone, Debug, PartialEq)]
pub struct RouterSettings {
    pub aliases: Vec<String>,
    pub min_confidence: f32,
    /// `None`: the base model.
    pub fallback: Option<String>,
    /// `--router-model`; `None`: the base model embeds.
    pub model: Option<String>,
    /// `--router-layer`: the base model's layer pooled.
    pub layer: usize,
}

impl Settings {
    /// Defaults for a model, as if no flag were given (used by tests and embedders).
    pub fn for_model(served_model_name: &str) -> Self {
        ServeConfig::default().resolve(served_model_name).expect("defaults are valid")
    }
}

/// Faults injected on purpose (`--debug-fault KIND=ADAPTER`, hidden): each makes one code
/// path panic for requests on one adapter, so tests can check what the server does then.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DebugFaults {
    /// `admit=NAME`: the batch loop panics admitting a request on NAME (outside the forward pass).
    pub panic_on_admit: Option<String>,
    /// `adapter-read=NAME`: the off-loop reader of NAME panics.
    pub panic_on_adapter_read: Option<String>,
    /// `forward=NAME`: every forward pass with a row of NAME panics.
    pub panic_on_forward: Option<String>,
}

impl DebugFaults {
    fn parse(specs: &[String]) -> Result<Self, ServerError> {
        let mut faults = Self::default();
        for spec in specs {
            let (kind, name) = spec.split_once('=').ok_or_else(|| ServerError::Config(format!("--debug-fault '{spec}': expected KIND=ADAPTER")))?;
            let slot = match kind {
                "admit" => &mut faults.panic_on_admit,
                "adapter-read" => &mut faults.panic_on_adapter_read,
                "forward" => &mut faults.panic_on_forward,
                _ => return Err(ServerError::Config(format!("--debug-fault '{spec}': KIND is admit, adapter-read or forward"))),
            };
            *slot = Some(name.to_string());
        }
        Ok(faults)
    }
}

/// `secs` as a duration; `flag` names the setting in the error.
fn seconds(flag: &str, secs: f64) -> Result<Duration, ServerError> {
    Duration::try_from_secs_f64(secs).map_err(|_| ServerError::Config(format!("{flag} must be a number of seconds >= 0, got {secs}")))
}

/// `secs` as a duration that must not be zero (a zero timeout would refuse everything).
fn positive_seconds(flag: &str, secs: f64) -> Result<Duration, ServerError> {
    match seconds(flag, secs)? {
        d if d.is_zero() => Err(ServerError::Config(format!("{flag} must be > 0, got {secs}"))),
        d => Ok(d),
    }
}

/// A refusal of the configuration.
fn bad<T>(message: String) -> Result<T, ServerError> {
    Err(ServerError::Config(message))
}

/// A path argument that may be a URI: `Some` for a URI, `None` for a path; a malformed URI
/// (or an empty path) is refused naming the flag.
fn uri_arg(flag: &str, p: &std::path::Path) -> Result<Option<AdapterUri>, ServerError> {
    if p.as_os_str().is_empty() {
        return bad(format!("{flag}: an empty path"));
    }
    match p.to_str() {
        Some(s) => AdapterUri::parse(s).map_err(|e| ServerError::Config(format!("{flag}: {e}"))),
        None => Ok(None),
    }
}

/// What [`ServeConfig::sources`] resolves.
struct SourceFlags {
    merge_lora: Option<PathBuf>,
    merge_lora_uri: Option<AdapterUri>,
    lora_dirs: Vec<PathBuf>,
    lora_prefixes: Vec<AdapterUri>,
    cache_dir: PathBuf,
    cache_bytes: u64,
    fetch_timeout: Duration,
}

/// The request, read and shutdown deadlines, and the adapter-capacity wait.
struct Timeouts {
    request: Option<Duration>,
    http_read: Duration,
    shutdown: Duration,
    adapter_wait: Duration,
}

impl ServeConfig {
    /// Fills defaults and checks the values. `model_spec` is the model argument as resolved.
    /// The steps run in a fixed order, so a configuration with several faults is always
    /// refused for the same one.
    pub fn resolve(mut self, model_spec: &str) -> Result<Settings, ServerError> {
        let (lora_modules, remote_lora_modules) = self.lora_modules()?;
        let sources = self.sources()?;
        let lora = self.lora_limits()?;
        let (max_num_seqs, max_num_batched_tokens) = self.batch_limits()?;
        let (kv_cache_bytes, prefix_cache_bytes) = self.cache_bytes()?;
        let (api_keys, admin_api_key, enable_lora_updates) = self.keys()?;
        let (max_waiting, max_queue_delay) = self.admission()?;
        let timeouts = self.timeouts()?;
        let auto_merge_after = self.auto_merge_after()?;
        let module_names: Vec<&str> = lora_modules.iter().map(|(n, _)| n.as_str()).chain(remote_lora_modules.iter().map(|(n, _)| n.as_str())).collect();
        let served_model_name = self.names(model_spec, &module_names)?;
        let router = self.router(&served_model_name, &module_names)?;
        let max_upload_bytes = match self.max_upload_bytes {
            Some(0) => return bad("--max-upload-bytes: must be at least 1".into()),
            b => b.unwrap_or(defaults::MAX_UPLOAD_BYTES),
        };
        Ok(Settings {
            router,
            served_model_name,
            lora_modules,
            remote_lora_modules,
            merge_lora: sources.merge_lora,
            merge_lora_uri: sources.merge_lora_uri,
            lora_dirs: sources.lora_dirs,
            lora_prefixes: sources.lora_prefixes,
            lora_cache_dir: sources.cache_dir,
            lora_cache_bytes: sources.cache_bytes,
            lora_fetch_timeout: sources.fetch_timeout,
            lora_sync: self.lora_sync.take().filter(|p| !p.as_os_str().is_empty()),
            allowed_lora_roots: self.allowed_lora_root.unwrap_or_default(),
            pinned_loras: self.pin_lora.unwrap_or_default(),
            lora,
            max_num_seqs,
            scheduling_policy: match self.scheduling_policy.as_deref() {
                None => loramux_engine::SchedulingPolicy::default(),
                Some(p) => p.parse().map_err(|e: String| ServerError::Config(format!("--scheduling-policy: {e}")))?,
            },
            target_tpot: self.target_tpot_ms.map(|ms| positive_seconds("--target-tpot-ms", ms / 1e3)).transpose()?,
            target_ttft: self.target_ttft_ms.map(|ms| positive_seconds("--target-ttft-ms", ms / 1e3)).transpose()?,
            max_num_batched_tokens,
            enable_chunked_prefill: self.enable_chunked_prefill.unwrap_or(defaults::ENABLE_CHUNKED_PREFILL),
            max_model_len: self.max_model_len,
            kv_cache_bytes,
            prefix_cache_bytes,
            host: self.host.unwrap_or_else(|| defaults::HOST.to_string()),
            port: self.port.unwrap_or(defaults::PORT),
            api_keys,
            tenants_file: self.tenants.take().filter(|p| !p.as_os_str().is_empty()),
            admin_api_key,
            enable_lora_updates,
            dequantize: self.dequantize.unwrap_or(false),
            max_request_bytes: self.max_request_bytes.unwrap_or(defaults::MAX_REQUEST_BYTES),
            adapter_store: self.adapter_store.take().unwrap_or_else(|| loramux_engine::registry::cache_dir().join("adapter-store")),
            max_upload_bytes,
            http_read_timeout: timeouts.http_read,
            request_timeout: timeouts.request,
            shutdown_timeout: timeouts.shutdown,
            max_waiting,
            max_queue_delay,
            adapter_wait: timeouts.adapter_wait,
            auto_merge_after,
            web_ui: !self.disable_web_ui.unwrap_or(false),
            debug_faults: DebugFaults::parse(&self.debug_fault.unwrap_or_default())?,
        })
    }

    /// `--router-aliases`, `--router-min-confidence`, `--router-fallback`, `--router-model`, `--router-layer`.
    fn router(&mut self, served_model_name: &str, lora_modules: &[&str]) -> Result<RouterSettings, ServerError> {
        let aliases = self.router_aliases.take().unwrap_or_else(|| vec![defaults::ROUTER_ALIAS.to_string()]);
        for a in &aliases {
            if a.is_empty() {
                return bad("--router-aliases: an alias is empty".into());
            }
            if a == served_model_name || lora_modules.contains(&a.as_str()) {
                return bad(format!("--router-aliases: '{a}' is already the name of the base model or an adapter"));
            }
        }
        let min_confidence = self.router_min_confidence.unwrap_or(defaults::ROUTER_MIN_CONFIDENCE);
        if !min_confidence.is_finite() {
            return bad(format!("--router-min-confidence must be a number, got {min_confidence}"));
        }
        let fallback = self.router_fallback.take().filter(|f| f != served_model_name);
        if let Some(f) = &fallback {
            if aliases.contains(f) {
                return bad(format!("--router-fallback '{f}' is a router alias"));
            }
        }
        let model = self.router_model.take();
        let layer = self.router_layer.unwrap_or(loramux_engine::routing::BaseEmbedder::DEFAULT_LAYER);
        if model.is_some() && self.router_layer.is_some() {
            return bad("--router-layer picks the base model's layer; it does not apply with --router-model".into());
        }
        Ok(RouterSettings { aliases, min_confidence, fallback, model, layer })
    }

    /// `--lora-modules` as (name, path) pairs and (name, URI) pairs, each name checked.
    #[allow(clippy::type_complexity)]
    fn lora_modules(&mut self) -> Result<(Vec<(String, PathBuf)>, Vec<(String, AdapterUri)>), ServerError> {
        let (mut local, mut remote) = (Vec::new(), Vec::new());
        for m in self.lora_modules.take().unwrap_or_default() {
            crate::adapters::check_adapter_name(&m.name).map_err(|e| ServerError::Config(format!("--lora-modules {}: {}", m.name, e.message)))?;
            match uri_arg("--lora-modules", &m.path)? {
                Some(uri) => remote.push((m.name, uri)),
                None => local.push((m.name, m.path)),
            }
        }
        Ok((local, remote))
    }

    /// `--merge-lora`, `--lora-dir` (paths or URIs), `--lora-cache-dir`, `--lora-cache-bytes`,
    /// `--lora-fetch-timeout-secs`.
    fn sources(&mut self) -> Result<SourceFlags, ServerError> {
        let (mut merge_lora, mut merge_lora_uri) = (None, None);
        if let Some(p) = self.merge_lora.clone() {
            if p.as_os_str().is_empty() {
                return bad("--merge-lora needs an adapter directory".into());
            }
            match uri_arg("--merge-lora", &p)? {
                Some(uri) => merge_lora_uri = Some(uri),
                None => merge_lora = Some(p),
            }
        }
        let (mut lora_dirs, mut lora_prefixes) = (Vec::new(), Vec::new());
        for d in self.lora_dir.take().unwrap_or_default() {
            match uri_arg("--lora-dir", &d)? {
                Some(uri) if uri.sha256.is_some() => return bad(format!("--lora-dir {uri}: a prefix cannot be pinned with #sha256=")),
                Some(uri) if uri.shape() != crate::sources::Shape::Folder && !matches!(uri.location, crate::sources::Location::Http { .. }) => {
                    return bad(format!("--lora-dir {uri}: a prefix (a folder), not one adapter file"))
                }
                Some(uri) => lora_prefixes.push(uri),
                None => lora_dirs.push(d),
            }
        }
        let cache_bytes = self.lora_cache_bytes.unwrap_or(defaults::LORA_CACHE_BYTES);
        let fetch_timeout = positive_seconds("--lora-fetch-timeout-secs", self.lora_fetch_timeout_secs.unwrap_or(defaults::LORA_FETCH_TIMEOUT_SECS))?;
        let cache_dir = self.lora_cache_dir.take().unwrap_or_else(|| loramux_engine::registry::cache_dir().join("lora-cache"));
        Ok(SourceFlags { merge_lora, merge_lora_uri, lora_dirs, lora_prefixes, cache_dir, cache_bytes, fetch_timeout })
    }

    /// `--max-loras`, `--max-lora-rank`, `--max-lora-bytes`.
    fn lora_limits(&self) -> Result<LoraLimits, ServerError> {
        let max_loras = self.max_loras.unwrap_or(defaults::MAX_LORAS);
        if max_loras == 0 {
            return bad("--max-loras must be at least 1".into());
        }
        let max_lora_rank = self.max_lora_rank.unwrap_or(defaults::MAX_LORA_RANK);
        if max_lora_rank == 0 || max_lora_rank > 256 {
            return bad(format!("--max-lora-rank must be in 1..=256, got {max_lora_rank}"));
        }
        Ok(LoraLimits { max_loras, max_rank: max_lora_rank, max_bytes: self.max_lora_bytes.unwrap_or(defaults::MAX_LORA_BYTES) })
    }

    /// `--max-num-seqs` and `--max-num-batched-tokens`; `--max-model-len` is checked too.
    fn batch_limits(&self) -> Result<(usize, usize), ServerError> {
        let max_num_seqs = self.max_num_seqs.unwrap_or(defaults::MAX_NUM_SEQS);
        if max_num_seqs == 0 {
            return bad("--max-num-seqs must be at least 1".into());
        }
        let max_num_batched_tokens = self.max_num_batched_tokens.unwrap_or(defaults::MAX_NUM_BATCHED_TOKENS);
        if max_num_batched_tokens == 0 {
            return bad("--max-num-batched-tokens must be at least 1".into());
        }
        if self.max_model_len.is_some_and(|l| l < 2) {
            return bad("--max-model-len must be at least 2".into());
        }
        Ok((max_num_seqs, max_num_batched_tokens))
    }

    /// The KV-cache and prefix-cache budgets in bytes (the latter 0 when prefix caching is off).
    fn cache_bytes(&self) -> Result<(usize, usize), ServerError> {
        let kv_gib = self.kv_cache_gib.unwrap_or(defaults::KV_CACHE_GIB);
        if !(kv_gib.is_finite() && kv_gib > 0.0) {
            return bad(format!("--kv-cache-gib must be positive, got {kv_gib}"));
        }
        let prefix_gib = self.prefix_cache_gib.unwrap_or(defaults::PREFIX_CACHE_GIB);
        if !(prefix_gib.is_finite() && prefix_gib >= 0.0) {
            return bad(format!("--prefix-cache-gib must be zero or positive, got {prefix_gib}"));
        }
        let prefix_cache_bytes =
            if self.enable_prefix_caching.unwrap_or(defaults::ENABLE_PREFIX_CACHING) { (prefix_gib * GIB) as usize } else { 0 };
        Ok(((kv_gib * GIB) as usize, prefix_cache_bytes))
    }

    /// The API keys, the admin key, and whether runtime adapter updates are on (they need the admin key).
    fn keys(&mut self) -> Result<(Vec<ApiKey>, Option<String>, bool), ServerError> {
        let api_keys = self
            .api_key
            .take()
            .unwrap_or_default()
            .iter()
            .map(|s| ApiKey::parse(s).map_err(ServerError::Config))
            .collect::<Result<Vec<_>, _>>()?;
        let admin_api_key = self.admin_api_key.take().filter(|k| !k.is_empty());
        let enable_lora_updates = self.enable_lora_updates.unwrap_or(false);
        if enable_lora_updates && admin_api_key.is_none() {
            return bad("--enable-lora-updates needs --admin-api-key: loading adapters at run time is an admin operation".into());
        }
        Ok((api_keys, admin_api_key, enable_lora_updates))
    }

    /// The admission queue's bounds: `--max-waiting` and `--max-queue-delay-secs` (0: off), or
    /// `--target-ttft-ms` in its place.
    fn admission(&self) -> Result<(usize, Option<Duration>), ServerError> {
        let max_waiting = self.max_waiting.unwrap_or(defaults::MAX_WAITING);
        if max_waiting == 0 {
            return bad("--max-waiting must be at least 1".into());
        }
        let max_queue_delay = match (self.target_ttft_ms, self.max_queue_delay_secs.unwrap_or(defaults::MAX_QUEUE_DELAY_SECS)) {
            (Some(ms), _) => Some(positive_seconds("--target-ttft-ms", ms / 1e3)?),
            (None, 0.0) => None,
            (None, secs) => Some(positive_seconds("--max-queue-delay-secs", secs)?),
        };
        Ok((max_waiting, max_queue_delay))
    }

    /// `--request-timeout-secs` (none by default), `--http-read-timeout-secs`,
    /// `--shutdown-timeout-secs` and `--adapter-wait-secs`.
    fn timeouts(&self) -> Result<Timeouts, ServerError> {
        let request = self.request_timeout_secs.map(|secs| positive_seconds("--request-timeout-secs", secs)).transpose()?;
        let http_read = positive_seconds(
            "--http-read-timeout-secs",
            self.http_read_timeout_secs.unwrap_or(defaults::HTTP_READ_TIMEOUT_SECS),
        )?;
        let shutdown = seconds("--shutdown-timeout-secs", self.shutdown_timeout_secs.unwrap_or(defaults::SHUTDOWN_TIMEOUT_SECS))?;
        let adapter_wait = seconds("--adapter-wait-secs", self.adapter_wait_secs.unwrap_or(defaults::ADAPTER_WAIT_SECS))?;
        Ok(Timeouts { request, http_read, shutdown, adapter_wait })
    }

    /// `--auto-merge` with its hysteresis, which excludes `--merge-lora`.
    fn auto_merge_after(&self) -> Result<Option<Duration>, ServerError> {
        let auto_merge_after = match self.auto_merge.unwrap_or(false) {
            true => Some(seconds("--auto-merge-after-secs", self.auto_merge_after_secs.unwrap_or(defaults::AUTO_MERGE_AFTER_SECS))?),
            false => None,
        };
        if auto_merge_after.is_some() && self.merge_lora.is_some() {
            return bad("--auto-merge and --merge-lora both change the base weights; use one".into());
        }
        Ok(auto_merge_after)
    }

    /// The last checks: the served model name (not empty, and no adapter's) and `--merge-lora`
    /// (not empty). Returns the served model name.
    fn names(&mut self, model_spec: &str, lora_modules: &[&str]) -> Result<String, ServerError> {
        let served_model_name = self.served_model_name.take().unwrap_or_else(|| model_spec.to_string());
        if served_model_name.is_empty() {
            return bad("--served-model-name must not be empty".into());
        }
        if lora_modules.contains(&served_model_name.as_str()) {
            return bad(format!("adapter name '{served_model_name}' is the base model's name"));
        }
        Ok(served_model_name)
    }
}
