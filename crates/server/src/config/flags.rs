//! [`ServeConfig`]: the flags of `loramux serve`, which are also the TOML keys of
//! `--config`, with `--lora-modules` parsing and the file-then-flags merge.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use clap::Args;
use loramux_engine::registry::DEFAULT_MODEL;
use serde::{Deserialize, Deserializer};

use super::{defaults, GIB};
use crate::error::ServerError;

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
    /// Adapters loaded at startup, as NAME=PATH (PEFT directories or llama.cpp GGUF adapter files) or NAME=URI (s3://, hf://, https://, fetched before /ready). Repeatable, or several after one flag.
    #[arg(long, value_name = "NAME=PATH|URI", num_args = 1..)]
    #[serde(default, deserialize_with = "deserialize_lora_modules")]
    pub lora_modules: Option<Vec<LoraModule>>,
    /// Adapter (PEFT folder or GGUF adapter file, or a URI fetched first) folded into the base weights at startup: the served model name answers with the merged model (a GGUF base needs --dequantize).
    #[arg(long, value_name = "PATH|URI")]
    pub merge_lora: Option<PathBuf>,
    /// Directory whose adapters (PEFT subfolders, or NAME.gguf files) are served by name, loaded on first use; or a URI prefix (s3://bucket/adapters/, hf://org/repo, https://host/dir) under which an unknown name is fetched on its first request. Repeatable.
    #[arg(long, value_name = "DIR|URI")]
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
    /// Where fetched adapters are kept, so a restart does not fetch them again.
    #[arg(long, value_name = "DIR", help = "Disk cache of adapters fetched from s3://, hf:// and https:// sources [default: <cache>/lora-cache]")]
    pub lora_cache_dir: Option<PathBuf>,
    /// Bounds the disk the cache of fetched adapters takes.
    #[arg(long, value_name = "BYTES", help = format!("Bytes the disk cache of fetched adapters may hold; least recently used adapters that are not resident are evicted [default: {} = {} GiB]", defaults::LORA_CACHE_BYTES, defaults::LORA_CACHE_BYTES >> 30))]
    pub lora_cache_bytes: Option<u64>,
    /// A store that hangs must not hold requests (or readiness) forever.
    #[arg(long, value_name = "SECS", help = format!("Seconds one adapter fetch may take [default: {}]", defaults::LORA_FETCH_TIMEOUT_SECS))]
    pub lora_fetch_timeout_secs: Option<f64>,
    /// The GIE lora syncer's ConfigMap, reconciled in-process.
    #[arg(long, value_name = "FILE", help = "YAML file in the Gateway API Inference Extension lora syncer's format (vLLMLoRAConfig: ensureExist / ensureNotExist models with id and source); re-read when it changes: ensureExist adapters are fetched and loaded, ensureNotExist ones unloaded")]
    pub lora_sync: Option<PathBuf>,
    /// Bounds the running batch.
    #[arg(long, value_name = "N", help = format!("Sequences in the running batch at once [default: {}]", defaults::MAX_NUM_SEQS))]
    pub max_num_seqs: Option<usize>,
    /// Time per output token to keep: the batch size and each step's prefill follow from it.
    #[arg(long, value_name = "MS", help = "Keep time per output token under this: the batch grows, and each step takes prefill, only as far as the engine's fitted step time allows (off by default: only --max-num-seqs and --max-num-batched-tokens bound a step)")]
    pub target_tpot_ms: Option<f64>,
    /// Time to first token to keep: requests that would wait longer are refused at once.
    #[arg(long, value_name = "MS", help = "Refuse at once (429, with Retry-After) a request whose first token would come later than this, as the engine's fitted step time estimates from the work ahead of it, its prompt and its max_tokens, instead of serving it late; replaces --max-queue-delay-secs (off by default)")]
    pub target_ttft_ms: Option<f64>,
    /// Who is admitted next when the batch has room.
    #[arg(long, value_name = "POLICY", help = "Admission order: `fair` (each tenant's weighted share of tokens, VTC; arrival order among requests without a tenant) or `fcfs` (arrival order, whoever sent it) [default: fair]")]
    pub scheduling_policy: Option<String>,
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
    /// Tenants: keys bound to adapters, with rate limits (TOML; re-read on SIGHUP and when it changes).
    #[arg(long, value_name = "FILE", help = "TOML file of [[tenants]]: each with api_keys (sha256:<hex> or plain), the adapters it may use (names or globs), optional default_adapter and limits (requests_per_minute, tokens_per_minute, max_concurrency); re-read on SIGHUP and when it changes")]
    pub tenants: Option<PathBuf>,
    /// Key for /v1/load_lora_adapter and /v1/unload_lora_adapter.
    #[arg(long, value_name = "KEY", env = "LORAMUX_ADMIN_API_KEY", hide_env_values = true)]
    pub admin_api_key: Option<String>,
    /// Allow loading and unloading adapters at run time (needs --admin-api-key) [default: false].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub enable_lora_updates: Option<bool>,
    /// Dequantize GGUF weights to float32 [default: false].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub dequantize: Option<bool>,
    /// Where uploaded adapters are kept (`POST /v1/adapters`).
    #[arg(long, value_name = "DIR", help = "Directory of the adapter store: tenants' uploaded adapters, content-addressed, re-registered at startup [default: <cache>/adapter-store]")]
    pub adapter_store: Option<PathBuf>,
    /// Bounds the memory one upload can take (it is read whole before it is checked).
    #[arg(long, value_name = "BYTES", help = format!("Largest adapter upload body in bytes (413 above) [default: {} = {} MiB]", defaults::MAX_UPLOAD_BYTES, defaults::MAX_UPLOAD_BYTES >> 20))]
    pub max_upload_bytes: Option<usize>,
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
    /// Names of `model` that ask the router to pick the adapter from the prompt.
    #[arg(long, value_name = "NAME", num_args = 1.., help = format!("Model names that route the request to the adapter whose routing examples it is most like (issue #20) [default: {}]", defaults::ROUTER_ALIAS))]
    pub router_aliases: Option<Vec<String>>,
    /// Below this margin between the best and second adapter a routed request goes to --router-fallback.
    #[arg(long, value_name = "MARGIN", help = format!("Least margin (best minus second cosine score) for the router to trust its pick; below it the request goes to --router-fallback [default: {}]", defaults::ROUTER_MIN_CONFIDENCE))]
    pub router_min_confidence: Option<f32>,
    /// Where an unsure routed request goes.
    #[arg(long, value_name = "MODEL", help = "Model (the base model's name or an adapter) that serves routed requests the router is unsure of [default: the base model]")]
    pub router_fallback: Option<String>,
    /// A dedicated sentence-embedding model for the router instead of the base model's own states.
    #[arg(long, value_name = "MODEL", help = "Route with a sentence-embedding model (a folder, `all-minilm-l6-v2` after `loramux models pull all-minilm-l6-v2`, or a hub id in the local HF cache) instead of the base model's hidden states [default: the base model]")]
    pub router_model: Option<String>,
    /// Which decoder layer of the base model the router pools.
    #[arg(long, value_name = "LAYER", help = format!("Decoder layer of the base model whose states the router pools: deeper is slower and, on the task adapters, 100 % instead of 97.5 % right at layer 15 (BENCHMARKS.md) [default: {}]", loramux_engine::routing::BaseEmbedder::DEFAULT_LAYER))]
    pub router_layer: Option<usize>,
    /// The comparison and monitoring page at `/` (static files; its data calls use the API's keys).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", help = "Do not serve the web page at / (compare adapters side by side, watch the server); its data calls go through the API and its keys either way [default: false]")]
    pub disable_web_ui: Option<bool>,
    /// Drain time, so a restart does not cut off answers in flight.
    #[arg(long, value_name = "SECS", help = format!("Seconds in-flight requests get to finish on SIGINT/SIGTERM before they are cancelled [default: {}]", defaults::SHUTDOWN_TIMEOUT_SECS))]
    pub shutdown_timeout_secs: Option<f64>,
    /// Faults injected on purpose, so tests can check the server survives them (hidden).
    #[arg(long = "debug-fault", value_name = "KIND=ADAPTER", hide = true)]
    pub debug_fault: Option<Vec<String>>,
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
            max_lora_rank, max_lora_bytes, lora_cache_dir, lora_cache_bytes, lora_fetch_timeout_secs, lora_sync, max_num_seqs, scheduling_policy, target_tpot_ms, target_ttft_ms, max_num_batched_tokens, enable_chunked_prefill,
            max_model_len, kv_cache_gib, enable_prefix_caching, prefix_cache_gib, host, port, api_key, tenants, admin_api_key, enable_lora_updates, dequantize,
            adapter_store, max_upload_bytes, max_request_bytes, http_read_timeout_secs, request_timeout_secs, max_waiting, max_queue_delay_secs, adapter_wait_secs,
            auto_merge, auto_merge_after_secs, router_aliases, router_min_confidence, router_fallback, router_model, router_layer,
            disable_web_ui, shutdown_timeout_secs, debug_fault
        )
    }
}
