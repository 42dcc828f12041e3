//! Server settings: [`ServeConfig`] is what a TOML file or the command line gives (every
//! field optional, flags override the file with [`ServeConfig::overridden_by`]);
//! [`Settings`] is the resolved, validated set with defaults filled in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use loramux_engine::LoraLimits;
use serde::Deserialize;

use crate::auth::ApiKey;
use crate::error::ServerError;

/// Defaults, shared with the CLI's help text.
pub mod defaults {
    pub const HOST: &str = "127.0.0.1";
    pub const PORT: u16 = 8000;
    pub const MAX_LORAS: usize = 8;
    pub const MAX_LORA_RANK: usize = 64;
    pub const MAX_NUM_SEQS: usize = 64;
    pub const MAX_NUM_BATCHED_TOKENS: usize = 512;
    pub const KV_CACHE_GIB: f64 = 2.0;
    pub const MAX_REQUEST_BYTES: usize = 4 << 20;
    pub const SHUTDOWN_TIMEOUT_SECS: f64 = 30.0;
    pub const MAX_WAITING: usize = 4096;
    pub const ADAPTER_WAIT_SECS: f64 = 2.0;
    pub const MAX_N: usize = 16;
}

/// `--lora-modules` in a config file: a list of `"NAME=PATH"` strings or a `{NAME = PATH}` table.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum LoraModules {
    List(Vec<String>),
    Table(BTreeMap<String, PathBuf>),
}

/// Settings as given (config file or flags). Keys are the flag names: `max-loras` (or
/// `max_loras`) in TOML is `--max-loras` on the command line.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServeConfig {
    /// Model file, directory or known name.
    pub model: Option<String>,
    /// Name clients use for the base model (default: the `model` argument).
    pub served_model_name: Option<String>,
    pub lora_modules: Option<LoraModules>,
    /// PEFT adapter folded into the base weights at startup (needs a float base).
    pub merge_lora: Option<PathBuf>,
    pub lora_dir: Option<Vec<PathBuf>>,
    pub allowed_lora_root: Option<Vec<PathBuf>>,
    pub max_loras: Option<usize>,
    pub max_lora_rank: Option<usize>,
    /// Bytes all resident adapters may occupy.
    pub max_lora_bytes: Option<usize>,
    pub max_num_seqs: Option<usize>,
    pub max_num_batched_tokens: Option<usize>,
    pub max_model_len: Option<usize>,
    /// KV-cache memory budget in GiB.
    pub kv_cache_gib: Option<f64>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub api_key: Option<Vec<String>>,
    pub admin_api_key: Option<String>,
    pub enable_lora_updates: Option<bool>,
    pub dequantize: Option<bool>,
    pub max_request_bytes: Option<usize>,
    pub shutdown_timeout_secs: Option<f64>,
    pub max_waiting: Option<usize>,
    /// How long a request blocked on adapter capacity lets later requests overtake it.
    pub adapter_wait_secs: Option<f64>,
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

    /// `self` with every setting that `flags` gives replaced by the flag's value.
    pub fn overridden_by(self, flags: ServeConfig) -> ServeConfig {
        macro_rules! pick {
            ($($f:ident),*) => { ServeConfig { $($f: flags.$f.or(self.$f)),* } };
        }
        pick!(
            model, served_model_name, lora_modules, merge_lora, lora_dir, allowed_lora_root, max_loras, max_lora_rank,
            max_lora_bytes, max_num_seqs, max_num_batched_tokens, max_model_len, kv_cache_gib, host, port,
            api_key, admin_api_key, enable_lora_updates, dequantize, max_request_bytes, shutdown_timeout_secs,
            max_waiting, adapter_wait_secs
        )
    }

    /// Fills defaults and checks the values. `model_spec` is the model argument as resolved.
    pub fn resolve(self, model_spec: &str) -> Result<Settings, ServerError> {
        let bad = |m: String| Err(ServerError::Config(m));
        let lora_modules = match self.lora_modules {
            None => Vec::new(),
            Some(LoraModules::Table(t)) => t.into_iter().collect(),
            Some(LoraModules::List(list)) => list.iter().map(|s| parse_lora_module(s)).collect::<Result<_, _>>()?,
        };
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
        if self.max_model_len == Some(0) || self.max_model_len.is_some_and(|l| l < 2) {
            return bad("--max-model-len must be at least 2".into());
        }
        let kv_gib = self.kv_cache_gib.unwrap_or(defaults::KV_CACHE_GIB);
        if !(kv_gib.is_finite() && kv_gib > 0.0) {
            return bad(format!("--kv-cache-gib must be positive, got {kv_gib}"));
        }
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
        let shutdown = self.shutdown_timeout_secs.unwrap_or(defaults::SHUTDOWN_TIMEOUT_SECS);
        if !(shutdown.is_finite() && shutdown >= 0.0) {
            return bad(format!("--shutdown-timeout-secs must be >= 0, got {shutdown}"));
        }
        let adapter_wait = self.adapter_wait_secs.unwrap_or(defaults::ADAPTER_WAIT_SECS);
        if !(adapter_wait.is_finite() && adapter_wait >= 0.0) {
            return bad(format!("--adapter-wait-secs must be >= 0, got {adapter_wait}"));
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
            lora: LoraLimits {
                max_loras,
                max_rank: max_lora_rank,
                max_bytes: self.max_lora_bytes.unwrap_or(LoraLimits::default().max_bytes),
            },
            max_num_seqs,
            max_num_batched_tokens,
            max_model_len: self.max_model_len,
            kv_cache_bytes: (kv_gib * (1u64 << 30) as f64) as usize,
            host: self.host.unwrap_or_else(|| defaults::HOST.to_string()),
            port: self.port.unwrap_or(defaults::PORT),
            api_keys,
            admin_api_key,
            enable_lora_updates,
            dequantize: self.dequantize.unwrap_or(false),
            max_request_bytes: self.max_request_bytes.unwrap_or(defaults::MAX_REQUEST_BYTES),
            shutdown_timeout: Duration::from_secs_f64(shutdown),
            max_waiting: self.max_waiting.unwrap_or(defaults::MAX_WAITING),
            adapter_wait: Duration::from_secs_f64(adapter_wait),
        })
    }
}

/// Parses `NAME=PATH`, or vLLM's JSON form `{"name": NAME, "path": PATH}`.
pub fn parse_lora_module(s: &str) -> Result<(String, PathBuf), ServerError> {
    if s.trim_start().starts_with('{') {
        let v: serde_json::Value =
            serde_json::from_str(s).map_err(|e| ServerError::Config(format!("--lora-modules '{s}': invalid JSON: {e}")))?;
        return match (v.get("name").and_then(|n| n.as_str()), v.get("path").and_then(|p| p.as_str())) {
            (Some(n), Some(p)) if !n.is_empty() && !p.is_empty() => Ok((n.to_string(), PathBuf::from(p))),
            _ => Err(ServerError::Config(format!("--lora-modules '{s}': expected {{\"name\": NAME, \"path\": PATH}}"))),
        };
    }
    match s.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => Ok((name.to_string(), PathBuf::from(path))),
        _ => Err(ServerError::Config(format!("--lora-modules '{s}': expected NAME=PATH"))),
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
    pub lora: LoraLimits,
    pub max_num_seqs: usize,
    /// Token budget of one forward pass (chunked prefill).
    pub max_num_batched_tokens: usize,
    pub max_model_len: Option<usize>,
    pub kv_cache_bytes: usize,
    pub host: String,
    pub port: u16,
    pub api_keys: Vec<ApiKey>,
    pub admin_api_key: Option<String>,
    pub enable_lora_updates: bool,
    pub dequantize: bool,
    pub max_request_bytes: usize,
    pub shutdown_timeout: Duration,
    /// Requests queued beyond this are refused with 503.
    pub max_waiting: usize,
    pub adapter_wait: Duration,
}

impl Settings {
    /// Defaults for a model, as if no flag were given (used by tests and embedders).
    pub fn for_model(served_model_name: &str) -> Self {
        ServeConfig::default().resolve(served_model_name).expect("defaults are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(s.lora_modules, vec![("a".to_string(), PathBuf::from("/x/a"))]);
        assert_eq!(s.api_keys.len(), 2);
        assert_eq!(s.api_keys[0].adapter.as_deref(), Some("a"));
        assert_eq!(s.merge_lora, Some(PathBuf::from("/x/m")));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(ServeConfig::from_toml("max-lora = 3").unwrap_err().contains("unknown field"));
        let c = ServeConfig { max_loras: Some(0), ..Default::default() };
        assert!(c.resolve("m").is_err());
        let c = ServeConfig { enable_lora_updates: Some(true), ..Default::default() };
        assert!(c.resolve("m").unwrap_err().to_string().contains("admin-api-key"));
        assert!(parse_lora_module("noequals").is_err());
        assert_eq!(
            parse_lora_module(r#"{"name": "x", "path": "/p", "base_model_name": "m"}"#).unwrap(),
            ("x".to_string(), PathBuf::from("/p"))
        );
    }
}
