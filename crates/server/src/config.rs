//! Server settings: [`ServeConfig`] is what a TOML file or the command line gives (one
//! struct for both: every field optional, flags override the file with
//! [`ServeConfig::overridden_by`]); [`Settings`] is the resolved, validated set with defaults
//! filled in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::Args;
use loramux_engine::registry::DEFAULT_MODEL;
use loramux_engine::LoraLimits;
use serde::{Deserialize, Deserializer};

use crate::auth::ApiKey;
use crate::error::ServerError;

/// Defaults, one constant each: [`ServeConfig::resolve`] fills them in and the flags' help shows them.
pub mod defaults {
    use loramux_engine::lora::manager;
    use loramux_engine::scheduler::defaults as scheduler;

    pub const HOST: &str = "127.0.0.1";
    pub const PORT: u16 = 8000;
    pub const MAX_LORAS: usize = manager::DEFAULT_MAX_LORAS;
    pub const MAX_LORA_RANK: usize = manager::DEFAULT_MAX_LORA_RANK;
    pub const MAX_LORA_BYTES: usize = manager::DEFAULT_MAX_LORA_BYTES;
    pub const MAX_NUM_SEQS: usize = scheduler::MAX_NUM_SEQS;
    pub const MAX_NUM_BATCHED_TOKENS: usize = scheduler::MAX_NUM_BATCHED_TOKENS;
    pub const ENABLE_CHUNKED_PREFILL: bool = scheduler::ENABLE_CHUNKED_PREFILL;
    pub const KV_CACHE_GIB: f64 = (scheduler::KV_CACHE_BYTES >> 30) as f64;
    pub const ENABLE_PREFIX_CACHING: bool = true;
    pub const PREFIX_CACHE_GIB: f64 = loramux_engine::prefix_cache::DEFAULT_PREFIX_CACHE_BYTES as f64 / super::GIB;
    pub const MAX_REQUEST_BYTES: usize = 4 << 20;
    pub const HTTP_READ_TIMEOUT_SECS: f64 = 30.0;
    pub const SHUTDOWN_TIMEOUT_SECS: f64 = 30.0;
    pub const MAX_WAITING: usize = scheduler::MAX_WAITING;
    pub const MAX_QUEUE_DELAY_SECS: f64 = scheduler::MAX_QUEUE_DELAY.as_secs_f64();
    pub const ADAPTER_WAIT_SECS: f64 = scheduler::ADAPTER_WAIT.as_secs_f64();
    pub const AUTO_MERGE_AFTER_SECS: f64 = 2.0;
    pub const MAX_N: usize = 16;
}

/// Bytes per GiB, for help texts that show byte defaults in the unit people think in.
const GIB: f64 = (1u64 << 30) as f64;

/// Settings of `loramux serve`, from a TOML file (`--config`) or the command line: vLLM's
/// names where vLLM has the setting. TOML keys are the flag names, `max-loras` (or
/// `max_loras`) for `--max-loras`. Every field is optional so that flags can override the
/// file field by field; [`ServeConfig::resolve`] fills in the defaults and checks the values.
#[derive(Args, Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServeConfig {
    /// TOML file with these settings; the command line overrides it (not a TOML key itself).
    #[arg(long, value_name = "FILE", help = "TOML file with the same settings (keys are the flag names: `max-loras = 8`); flags override it")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Model file, directory or known name.
    #[arg(long, value_name = "PATH|NAME", help = format!("Model: a GGUF file, a Hugging Face directory, a known name (pulled if missing), or a hub id in the local HF cache [default: {DEFAULT_MODEL}]"))]
    pub model: Option<String>,
    /// Name clients use for the base model [default: the --model argument].
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,
    /// Adapters loaded at startup, as NAME=PATH (PEFT directories or llama.cpp GGUF adapter files). Repeatable, or several after one flag.
    #[arg(long, value_name = "NAME=PATH", num_args = 1..)]
    #[serde(default, deserialize_with = "deserialize_lora_modules")]
    pub lora_modules: Option<Vec<LoraModule>>,
    /// Adapter (PEFT folder or GGUF adapter file) folded into the base weights at startup: the served model name answers with the merged model (a GGUF base needs --dequantize).
    #[arg(long, value_name = "PATH")]
    pub merge_lora: Option<PathBuf>,
    /// Directory whose adapters (PEFT subfolders, or NAME.gguf files) are served by name, loaded on first use. Repeatable.
    #[arg(long, value_name = "DIR")]
    pub lora_dir: Option<Vec<PathBuf>>,
    /// Extra directory /v1/load_lora_adapter may read adapters from (besides --lora-dir). Repeatable.
    #[arg(long, value_name = "DIR")]
    pub allowed_lora_root: Option<Vec<PathBuf>>,
    /// Adapters that must answer without a cold read: made resident at startup and never evicted.
    #[arg(long, value_name = "NAME", help = "Adapter kept resident, never evicted (a --lora-modules or --lora-dir name); one slot of --max-loras must stay unpinned. Repeatable")]
    pub pin_lora: Option<Vec<String>>,
    /// Bounds the adapters resident at once, so their memory stays bounded.
    #[arg(long, value_name = "N", help = format!("Adapters resident at once; idle ones are evicted least recently used first [default: {}]", defaults::MAX_LORAS))]
    pub max_loras: Option<usize>,
    /// Bounds adapter rank, which sizes the batched LoRA kernels' work.
    #[arg(long, value_name = "R", help = format!("Largest adapter rank accepted [default: {}]", defaults::MAX_LORA_RANK))]
    pub max_lora_rank: Option<usize>,
    /// Bounds the memory of the resident adapters together.
    #[arg(long, value_name = "BYTES", help = format!("Bytes all resident adapters may occupy [default: {} = {} GiB]", defaults::MAX_LORA_BYTES, defaults::MAX_LORA_BYTES as f64 / GIB))]
    pub max_lora_bytes: Option<usize>,
    /// Bounds the running batch.
    #[arg(long, value_name = "N", help = format!("Sequences in the running batch at once [default: {}]", defaults::MAX_NUM_SEQS))]
    pub max_num_seqs: Option<usize>,
    /// Token budget of one forward pass, which bounds a step's latency.
    #[arg(long, value_name = "N", help = format!("Tokens per forward pass: decode tokens plus prefill chunks [default: {}]", defaults::MAX_NUM_BATCHED_TOKENS))]
    pub max_num_batched_tokens: Option<usize>,
    /// Whether a long prompt may be prefilled in pieces across steps, so decodes keep running beside it.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", help = format!("Split long prompts' prefill across steps so running decodes are not stalled; `false` prefills each prompt in one step [default: {}]", defaults::ENABLE_CHUNKED_PREFILL))]
    pub enable_chunked_prefill: Option<bool>,
    /// Longest prompt plus completion [default: the model's context, at most 8192].
    #[arg(long, value_name = "N")]
    pub max_model_len: Option<usize>,
    /// KV-cache memory budget in GiB.
    #[arg(long, value_name = "GIB", help = format!("KV-cache memory budget in GiB; requests wait (or the newest is preempted) when it is full [default: {}]", defaults::KV_CACHE_GIB))]
    pub kv_cache_gib: Option<f64>,
    /// Whether a prompt prefix seen before on the same adapter skips its prefill (vLLM's automatic prefix caching).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", help = format!("Reuse the KV of prompt prefixes seen before on the same adapter (whole 64-token blocks; never across adapters) [default: {}]", defaults::ENABLE_PREFIX_CACHING))]
    pub enable_prefix_caching: Option<bool>,
    /// Bounds the memory of cached prefixes, apart from the running sequences' KV budget.
    #[arg(long, value_name = "GIB", help = format!("Memory for cached prompt prefixes in GiB, least recently used evicted first [default: {}]", defaults::PREFIX_CACHE_GIB))]
    pub prefix_cache_gib: Option<f64>,
    /// Address to listen on.
    #[arg(long, value_name = "ADDR", help = format!("Address to listen on; 0.0.0.0 for all interfaces [default: {}]", defaults::HOST))]
    pub host: Option<String>,
    /// Port to listen on.
    #[arg(long, help = format!("Port to listen on [default: {}]", defaults::PORT))]
    pub port: Option<u16>,
    /// Key every /v1 call must present as `Authorization: Bearer KEY`; KEY:ADAPTER gives the key's user that adapter by default. Repeatable.
    #[arg(long, value_name = "KEY[:ADAPTER]")]
    pub api_key: Option<Vec<String>>,
    /// Key for /v1/load_lora_adapter and /v1/unload_lora_adapter.
    #[arg(long, value_name = "KEY", env = "LORAMUX_ADMIN_API_KEY", hide_env_values = true)]
    pub admin_api_key: Option<String>,
    /// Allow loading and unloading adapters at run time (needs --admin-api-key) [default: false].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub enable_lora_updates: Option<bool>,
    /// Dequantize GGUF weights to float32 [default: false].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub dequantize: Option<bool>,
    /// Bounds the memory one request body can take.
    #[arg(long, value_name = "BYTES", help = format!("Largest request body in bytes [default: {} = {} MiB]", defaults::MAX_REQUEST_BYTES, defaults::MAX_REQUEST_BYTES >> 20))]
    pub max_request_bytes: Option<usize>,
    /// Slowloris protection: a client that trickles its request in cannot hold a connection for long.
    #[arg(long, value_name = "SECS", help = format!("Seconds a client may take to send its request headers and body [default: {}]", defaults::HTTP_READ_TIMEOUT_SECS))]
    pub http_read_timeout_secs: Option<f64>,
    /// Per-request deadline, so a client is answered even when the server is overloaded.
    #[arg(long, value_name = "SECS", help = "Seconds a request may take from arrival to its last token, queueing included; later it is cancelled [default: no deadline]")]
    pub request_timeout_secs: Option<f64>,
    /// Bounds the admission queue, so an overloaded server refuses work early instead of queueing without end.
    #[arg(long, value_name = "N", help = format!("Requests that may wait for a place in the batch; more are refused with HTTP 429 [default: {}]", defaults::MAX_WAITING))]
    pub max_waiting: Option<usize>,
    /// Bounds the expected queueing time, so past saturation clients get a fast 429 rather than a slow answer.
    #[arg(long, value_name = "SECS", help = format!("Refuse (429) requests that would wait longer than this for a place in the batch, judged from the rate requests start while others wait; 0 turns the bound off [default: {}]", defaults::MAX_QUEUE_DELAY_SECS))]
    pub max_queue_delay_secs: Option<f64>,
    /// How long a request blocked on adapter capacity lets later requests overtake it.
    #[arg(long, value_name = "SECS", help = format!("Seconds a request waiting for an adapter slot lets later requests (for resident adapters) overtake it [default: {}]", defaults::ADAPTER_WAIT_SECS))]
    pub adapter_wait_secs: Option<f64>,
    /// One adapter holding all the traffic then costs what the base costs (needs a float base).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", help = "Fold an adapter into the base weights while it alone holds every request, unfold it when a request for the base or another adapter arrives; needs a float base (a GGUF with --dequantize) [default: false]")]
    pub auto_merge: Option<bool>,
    /// Hysteresis of --auto-merge, so alternating traffic does not fold and unfold at every step.
    #[arg(long, value_name = "SECS", help = format!("How long one adapter must hold every request before --auto-merge folds it [default: {}]", defaults::AUTO_MERGE_AFTER_SECS))]
    pub auto_merge_after_secs: Option<f64>,
    /// Drain time, so a restart does not cut off answers in flight.
    #[arg(long, value_name = "SECS", help = format!("Seconds in-flight requests get to finish on SIGINT/SIGTERM before they are cancelled [default: {}]", defaults::SHUTDOWN_TIMEOUT_SECS))]
    pub shutdown_timeout_secs: Option<f64>,
    /// Faults injected on purpose, so tests can check the server survives them (hidden).
    #[arg(long = "debug-fault", value_name = "KIND=ADAPTER", hide = true)]
    pub debug_fault: Option<Vec<String>>,
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

/// One `--lora-modules` entry: the adapter at `path` served under `name`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraModule {
    /// What clients put in `model` to get this adapter.
    pub name: String,
    /// The adapter: a PEFT directory or a llama.cpp GGUF adapter file.
    pub path: PathBuf,
}

impl FromStr for LoraModule {
    type Err = String;

    /// Parses `NAME=PATH`, or vLLM's JSON form `{"name": NAME, "path": PATH}`.
    fn from_str(s: &str) -> Result<Self, String> {
        let module = |name: &str, path: &str| LoraModule { name: name.to_string(), path: PathBuf::from(path) };
        if s.trim_start().starts_with('{') {
            let v: serde_json::Value = serde_json::from_str(s).map_err(|e| format!("invalid JSON: {e}"))?;
            return match (v.get("name").and_then(|n| n.as_str()), v.get("path").and_then(|p| p.as_str())) {
                (Some(n), Some(p)) if !n.is_empty() && !p.is_empty() => Ok(module(n, p)),
                _ => Err(r#"expected {"name": NAME, "path": PATH}"#.to_string()),
            };
        }
        match s.split_once('=') {
            Some((name, path)) if !name.is_empty() && !path.is_empty() => Ok(module(name, path)),
            _ => Err("expected NAME=PATH".to_string()),
        }
    }
}

/// `lora-modules` in a config file: a list of `"NAME=PATH"` strings (as on the command line)
/// or, more readably, a `{NAME = PATH}` table.
#[derive(Deserialize)]
#[serde(untagged)]
enum LoraModules {
    List(Vec<String>),
    Table(BTreeMap<String, PathBuf>),
}

/// Reads [`ServeConfig::lora_modules`] from either TOML form of [`LoraModules`].
fn deserialize_lora_modules<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Vec<LoraModule>>, D::Error> {
    let modules = match LoraModules::deserialize(deserializer)? {
        LoraModules::List(list) => list
            .iter()
            .map(|s| s.parse().map_err(|e| serde::de::Error::custom(format!("lora-modules '{s}': {e}"))))
            .collect::<Result<_, _>>()?,
        LoraModules::Table(table) => table.into_iter().map(|(name, path)| LoraModule { name, path }).collect(),
    };
    Ok(Some(modules))
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

impl ServeConfig {
    /// Reads a TOML file; keys may use `-` or `_`.
    pub fn from_file(path: &Path) -> Result<Self, ServerError> {
        let text = std::fs::read_to_string(path).map_err(|e| ServerError::ConfigFile {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::from_toml(&text).map_err(|message| ServerError::ConfigFile { path: path.to_path_buf(), message })
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        let normalized: toml::Table = table.into_iter().map(|(k, v)| (k.replace('_', "-"), v)).collect();
        normalized.try_into().map_err(|e: toml::de::Error| e.to_string())
    }

    /// The file that `--config` names overridden by these settings (the command line's), or
    /// these settings alone when there is no file.
    pub fn over_config_file(self) -> Result<ServeConfig, ServerError> {
        match &self.config {
            Some(path) => Ok(Self::from_file(path)?.overridden_by(self)),
            None => Ok(self),
        }
    }

    /// `self` with every setting that `flags` gives replaced by the flag's value.
    pub fn overridden_by(self, flags: ServeConfig) -> ServeConfig {
        macro_rules! pick {
            ($($f:ident),*) => { ServeConfig { $($f: flags.$f.or(self.$f)),* } };
        }
        pick!(
            config, model, served_model_name, lora_modules, merge_lora, lora_dir, allowed_lora_root, pin_lora, max_loras,
            max_lora_rank, max_lora_bytes, max_num_seqs, max_num_batched_tokens, enable_chunked_prefill,
            max_model_len, kv_cache_gib, enable_prefix_caching, prefix_cache_gib, host, port, api_key, admin_api_key, enable_lora_updates, dequantize,
            max_request_bytes, http_read_timeout_secs, request_timeout_secs, max_waiting, max_queue_delay_secs, adapter_wait_secs,
            auto_merge, auto_merge_after_secs,
            shutdown_timeout_secs, debug_fault
        )
    }

    /// Fills defaults and checks the values. `model_spec` is the model argument as resolved.
    pub fn resolve(self, model_spec: &str) -> Result<Settings, ServerError> {
        let bad = |m: String| Err(ServerError::Config(m));
        let lora_modules: Vec<(String, PathBuf)> =
            self.lora_modules.unwrap_or_default().into_iter().map(|m| (m.name, m.path)).collect();
        for (name, _) in &lora_modules {
            crate::adapters::check_adapter_name(name).map_err(|e| ServerError::Config(format!("--lora-modules {name}: {}", e.message)))?;
        }
        let max_loras = self.max_loras.unwrap_or(defaults::MAX_LORAS);
        if max_loras == 0 {
            return bad("--max-loras must be at least 1".into());
        }
        let max_lora_rank = self.max_lora_rank.unwrap_or(defaults::MAX_LORA_RANK);
        if max_lora_rank == 0 || max_lora_rank > 256 {
            return bad(format!("--max-lora-rank must be in 1..=256, got {max_lora_rank}"));
        }
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
        let api_keys = self
            .api_key
            .unwrap_or_default()
            .iter()
            .map(|s| ApiKey::parse(s).map_err(ServerError::Config))
            .collect::<Result<Vec<_>, _>>()?;
        let admin_api_key = self.admin_api_key.filter(|k| !k.is_empty());
        let enable_lora_updates = self.enable_lora_updates.unwrap_or(false);
        if enable_lora_updates && admin_api_key.is_none() {
            return bad("--enable-lora-updates needs --admin-api-key: loading adapters at run time is an admin operation".into());
        }
        let max_waiting = self.max_waiting.unwrap_or(defaults::MAX_WAITING);
        if max_waiting == 0 {
            return bad("--max-waiting must be at least 1".into());
        }
        let max_queue_delay = match self.max_queue_delay_secs.unwrap_or(defaults::MAX_QUEUE_DELAY_SECS) {
            0.0 => None,
            secs => Some(positive_seconds("--max-queue-delay-secs", secs)?),
        };
        let request_timeout =
            self.request_timeout_secs.map(|secs| positive_seconds("--request-timeout-secs", secs)).transpose()?;
        let http_read_timeout = positive_seconds(
            "--http-read-timeout-secs",
            self.http_read_timeout_secs.unwrap_or(defaults::HTTP_READ_TIMEOUT_SECS),
        )?;
        let shutdown_timeout =
            seconds("--shutdown-timeout-secs", self.shutdown_timeout_secs.unwrap_or(defaults::SHUTDOWN_TIMEOUT_SECS))?;
        let adapter_wait = seconds("--adapter-wait-secs", self.adapter_wait_secs.unwrap_or(defaults::ADAPTER_WAIT_SECS))?;
        let auto_merge_after = match self.auto_merge.unwrap_or(false) {
            true => Some(seconds("--auto-merge-after-secs", self.auto_merge_after_secs.unwrap_or(defaults::AUTO_MERGE_AFTER_SECS))?),
            false => None,
        };
        if auto_merge_after.is_some() && self.merge_lora.is_some() {
            return bad("--auto-merge and --merge-lora both change the base weights; use one".into());
        }
        let served_model_name = self.served_model_name.unwrap_or_else(|| model_spec.to_string());
        if served_model_name.is_empty() {
            return bad("--served-model-name must not be empty".into());
        }
        if self.merge_lora.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            return bad("--merge-lora needs an adapter directory".into());
        }
        if lora_modules.iter().any(|(n, _)| *n == served_model_name) {
            return bad(format!("adapter name '{served_model_name}' is the base model's name"));
        }
        Ok(Settings {
            served_model_name,
            lora_modules,
            merge_lora: self.merge_lora,
            lora_dirs: self.lora_dir.unwrap_or_default(),
            allowed_lora_roots: self.allowed_lora_root.unwrap_or_default(),
            pinned_loras: self.pin_lora.unwrap_or_default(),
            lora: LoraLimits {
                max_loras,
                max_rank: max_lora_rank,
                max_bytes: self.max_lora_bytes.unwrap_or(defaults::MAX_LORA_BYTES),
            },
            max_num_seqs,
            max_num_batched_tokens,
            enable_chunked_prefill: self.enable_chunked_prefill.unwrap_or(defaults::ENABLE_CHUNKED_PREFILL),
            max_model_len: self.max_model_len,
            kv_cache_bytes: (kv_gib * GIB) as usize,
            prefix_cache_bytes,
            host: self.host.unwrap_or_else(|| defaults::HOST.to_string()),
            port: self.port.unwrap_or(defaults::PORT),
            api_keys,
            admin_api_key,
            enable_lora_updates,
            dequantize: self.dequantize.unwrap_or(false),
            max_request_bytes: self.max_request_bytes.unwrap_or(defaults::MAX_REQUEST_BYTES),
            http_read_timeout,
            request_timeout,
            shutdown_timeout,
            max_waiting,
            max_queue_delay,
            adapter_wait,
            auto_merge_after,
            debug_faults: DebugFaults::parse(&self.debug_fault.unwrap_or_default())?,
        })
    }
}

/// Everything the server needs, resolved.
#[derive(Clone, Debug)]
pub struct Settings {
    pub served_model_name: String,
    /// Adapters loaded at startup (`--lora-modules`).
    pub lora_modules: Vec<(String, PathBuf)>,
    /// Adapter merged into the base weights at startup (`--merge-lora`): the served model
    /// name then answers with the merged model, the "fully fine-tuned" deployment that
    /// unmerged LoRA serving is compared against. Other adapters still apply on top.
    pub merge_lora: Option<PathBuf>,
    /// Directories whose adapter subdirectories are known by folder name and loaded lazily.
    pub lora_dirs: Vec<PathBuf>,
    /// Extra directories `load_lora_adapter` may read from (besides `lora_dirs`).
    pub allowed_lora_roots: Vec<PathBuf>,
    /// Adapters resident from startup and never evicted (`--pin-lora`).
    pub pinned_loras: Vec<String>,
    pub lora: LoraLimits,
    pub max_num_seqs: usize,
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
    pub admin_api_key: Option<String>,
    pub enable_lora_updates: bool,
    pub dequantize: bool,
    pub max_request_bytes: usize,
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
    /// Faults injected on purpose (tests only).
    pub debug_faults: DebugFaults,
}

impl Settings {
    /// Defaults for a model, as if no flag were given (used by tests and embedders).
    pub fn for_model(served_model_name: &str) -> Self {
        ServeConfig::default().resolve(served_model_name).expect("defaults are valid")
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    /// `loramux serve`'s command line, as the binary flattens it.
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeConfig,
    }

    fn parse(args: &[&str]) -> ServeConfig {
        Cli::try_parse_from(std::iter::once("serve").chain(args.iter().copied())).unwrap().serve
    }

    fn module(name: &str, path: &str) -> (String, PathBuf) {
        (name.to_string(), PathBuf::from(path))
    }

    #[test]
    fn toml_keys_accept_both_spellings_and_flags_override() {
        let file = ServeConfig::from_toml(
            "model = \"m\"\nmax_loras = 3\nmax-num-seqs = 5\nlora-modules = { a = \"/x/a\" }\napi-key = [\"k1:a\", \"k2\"]\nmerge_lora = \"/x/m\"\n",
        )
        .unwrap();
        assert_eq!(file.max_loras, Some(3));
        assert_eq!(file.max_num_seqs, Some(5));
        let flags = ServeConfig { max_loras: Some(4), ..Default::default() };
        let s = file.overridden_by(flags).resolve("m").unwrap();
        assert_eq!(s.lora.max_loras, 4);
        assert_eq!(s.max_num_seqs, 5);
        assert_eq!(s.lora_modules, vec![module("a", "/x/a")]);
        assert_eq!(s.api_keys.len(), 2);
        assert_eq!(s.api_keys[0].adapter.as_deref(), Some("a"));
        assert_eq!(s.merge_lora, Some(PathBuf::from("/x/m")));
    }

    #[test]
    fn command_line_overrides_the_config_file() {
        Cli::command().debug_assert();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serve.toml");
        let toml = "max-loras = 3\nmax_num_seqs = 5\nlora-modules = [\"a=/x/a\"]\nenable-chunked-prefill = true\nrequest-timeout-secs = 9.5\nhttp-read-timeout-secs = 7\n";
        std::fs::write(&path, toml).unwrap();
        let flags = parse(&[
            "--config", path.to_str().unwrap(),
            "--max-loras", "4",
            "--lora-modules", "b=/x/b", r#"{"name": "c", "path": "/x/c"}"#,
            "--lora-modules", "d=/x/d",
            "--enable-chunked-prefill", "false",
            "--dequantize",
            "--max-waiting", "10",
            "--lora-dir", "/l1", "--lora-dir", "/l2",
        ]);
        let s = flags.over_config_file().unwrap().resolve("m").unwrap();
        assert_eq!(s.lora.max_loras, 4);
        assert_eq!(s.max_num_seqs, 5);
        assert_eq!(s.lora_modules, vec![module("b", "/x/b"), module("c", "/x/c"), module("d", "/x/d")]);
        assert!(!s.enable_chunked_prefill);
        assert!(s.dequantize);
        assert_eq!(s.max_waiting, 10);
        assert_eq!(s.request_timeout, Some(Duration::from_secs_f64(9.5)));
        assert_eq!(s.http_read_timeout, Duration::from_secs(7));
        assert_eq!(s.lora_dirs, vec![PathBuf::from("/l1"), PathBuf::from("/l2")]);
    }

    #[test]
    fn defaults_are_filled_in_and_shown_in_help() {
        let s = parse(&[]).resolve("m").unwrap();
        assert_eq!(s.lora.max_loras, defaults::MAX_LORAS);
        assert_eq!(s.lora.max_loras, LoraLimits::default().max_loras);
        assert_eq!(s.max_waiting, defaults::MAX_WAITING);
        assert!(s.enable_chunked_prefill);
        assert_eq!(s.request_timeout, None);
        assert_eq!(s.http_read_timeout, Duration::from_secs_f64(defaults::HTTP_READ_TIMEOUT_SECS));
        assert!(parse(&["--enable-chunked-prefill"]).resolve("m").unwrap().enable_chunked_prefill);
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains(&format!("[default: {}]", defaults::MAX_LORAS)), "{help}");
        assert!(help.contains(&format!("[default: {}]", defaults::MAX_WAITING)), "{help}");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(ServeConfig::from_toml("max-lora = 3").unwrap_err().contains("unknown field"));
        assert!(ServeConfig::from_toml("config = \"other.toml\"").unwrap_err().contains("unknown field"));
        assert!(ServeConfig::from_toml("lora-modules = [\"noequals\"]").unwrap_err().contains("NAME=PATH"));
        let refusal = |args: &[&str]| parse(args).resolve("m").unwrap_err().to_string();
        assert!(refusal(&["--max-loras", "0"]).contains("--max-loras"));
        assert!(refusal(&["--enable-lora-updates"]).contains("--admin-api-key"));
        assert!(refusal(&["--max-waiting", "0"]).contains("--max-waiting"));
        assert!(refusal(&["--request-timeout-secs", "0"]).contains("--request-timeout-secs"));
        assert!(refusal(&["--request-timeout-secs", "inf"]).contains("--request-timeout-secs"));
        assert!(refusal(&["--http-read-timeout-secs", "0"]).contains("--http-read-timeout-secs"));
        assert!(refusal(&["--shutdown-timeout-secs=-1"]).contains("--shutdown-timeout-secs"));
        assert!(Cli::try_parse_from(["serve", "--lora-modules", "noequals"]).is_err());
        assert!(Cli::try_parse_from(["serve", "--enable-chunked-prefill", "maybe"]).is_err());
        assert_eq!(
            r#"{"name": "x", "path": "/p", "base_model_name": "m"}"#.parse::<LoraModule>().unwrap(),
            LoraModule { name: "x".into(), path: PathBuf::from("/p") }
        );
    }
}
