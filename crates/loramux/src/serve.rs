//! `loramux serve`: reads flags and the optional TOML config (flags win), finds the model
//! and the example adapters, and runs `loramux_server` until SIGINT/SIGTERM.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use loramux_engine::registry::DEFAULT_MODEL;
use loramux_server::config::defaults;
use loramux_server::config::LoraModules;
use loramux_server::{ServeConfig, Server};

use crate::generate::locate_model;

/// Arguments of `loramux serve` (vLLM's names where vLLM has the setting).
#[derive(Args, Debug, Default)]
pub struct ServeArgs {
    /// TOML file with the same settings (keys are the flag names: `max-loras = 8`); flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Model: a GGUF file, a Hugging Face directory, a known name (pulled if missing), or a hub id in the local HF cache.
    #[arg(long, value_name = "PATH|NAME", long_help = format!("Model: a GGUF file, a Hugging Face directory, a known name (pulled if missing), or a hub id in the local HF cache [default: {DEFAULT_MODEL}]"))]
    model: Option<String>,
    /// Name clients use for the base model [default: the --model argument].
    #[arg(long)]
    served_model_name: Option<String>,
    /// Adapters loaded at startup, as NAME=PATH (PEFT directories). Repeatable, or several after one flag.
    #[arg(long = "lora-modules", value_name = "NAME=PATH", num_args = 1..)]
    lora_modules: Vec<String>,
    /// PEFT adapter folded into the base weights at startup: the served model name answers with the merged model (a GGUF needs --dequantize).
    #[arg(long, value_name = "PATH")]
    merge_lora: Option<PathBuf>,
    /// Directory whose adapter subfolders are served by folder name, loaded on first use. Repeatable.
    #[arg(long = "lora-dir", value_name = "DIR")]
    lora_dir: Vec<PathBuf>,
    /// Extra directory /v1/load_lora_adapter may read adapters from (besides --lora-dir). Repeatable.
    #[arg(long = "allowed-lora-root", value_name = "DIR")]
    allowed_lora_root: Vec<PathBuf>,
    /// Adapters resident at once; idle ones are evicted least recently used first.
    #[arg(long, value_name = "N", long_help = format!("Adapters resident at once; idle ones are evicted least recently used first [default: {}]", defaults::MAX_LORAS))]
    max_loras: Option<usize>,
    /// Largest adapter rank accepted [default: 64].
    #[arg(long, value_name = "R")]
    max_lora_rank: Option<usize>,
    /// Bytes all resident adapters may occupy [default: 2 GiB].
    #[arg(long, value_name = "BYTES")]
    max_lora_bytes: Option<usize>,
    /// Sequences in the running batch at once [default: 64].
    #[arg(long, value_name = "N")]
    max_num_seqs: Option<usize>,
    /// Tokens per forward pass: decode tokens plus prefill chunks [default: 512].
    #[arg(long, value_name = "N")]
    max_num_batched_tokens: Option<usize>,
    /// Longest prompt plus completion [default: the model's context, at most 8192].
    #[arg(long, value_name = "N")]
    max_model_len: Option<usize>,
    /// KV-cache memory budget in GiB; requests wait (or the newest is preempted) when it is full [default: 2].
    #[arg(long, value_name = "GIB")]
    kv_cache_gib: Option<f64>,
    /// Address to listen on [default: 127.0.0.1; 0.0.0.0 for all interfaces].
    #[arg(long)]
    host: Option<String>,
    /// Port to listen on [default: 8000].
    #[arg(long)]
    port: Option<u16>,
    /// Key every /v1 call must present as `Authorization: Bearer KEY`; KEY:ADAPTER gives the key's user that adapter by default. Repeatable.
    #[arg(long = "api-key", value_name = "KEY[:ADAPTER]")]
    api_key: Vec<String>,
    /// Key for /v1/load_lora_adapter and /v1/unload_lora_adapter.
    #[arg(long, value_name = "KEY", env = "LORAMUX_ADMIN_API_KEY", hide_env_values = true)]
    admin_api_key: Option<String>,
    /// Allow loading and unloading adapters at run time (needs --admin-api-key).
    #[arg(long)]
    enable_lora_updates: bool,
    /// Dequantize GGUF weights to float32.
    #[arg(long)]
    dequantize: bool,
    /// Largest request body in bytes [default: 4 MiB].
    #[arg(long, value_name = "BYTES")]
    max_request_bytes: Option<usize>,
    /// Seconds in-flight requests get to finish on SIGINT/SIGTERM before they are cancelled [default: 30].
    #[arg(long, value_name = "SECS")]
    shutdown_timeout_secs: Option<f64>,
}

impl ServeArgs {
    fn as_config(&self) -> ServeConfig {
        let list = |v: &Vec<PathBuf>| (!v.is_empty()).then(|| v.clone());
        ServeConfig {
            model: self.model.clone(),
            served_model_name: self.served_model_name.clone(),
            lora_modules: (!self.lora_modules.is_empty()).then(|| LoraModules::List(self.lora_modules.clone())),
            merge_lora: self.merge_lora.clone(),
            lora_dir: list(&self.lora_dir),
            allowed_lora_root: list(&self.allowed_lora_root),
            max_loras: self.max_loras,
            max_lora_rank: self.max_lora_rank,
            max_lora_bytes: self.max_lora_bytes,
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            max_model_len: self.max_model_len,
            kv_cache_gib: self.kv_cache_gib,
            host: self.host.clone(),
            port: self.port,
            api_key: (!self.api_key.is_empty()).then(|| self.api_key.clone()),
            admin_api_key: self.admin_api_key.clone(),
            enable_lora_updates: self.enable_lora_updates.then_some(true),
            dequantize: self.dequantize.then_some(true),
            max_request_bytes: self.max_request_bytes,
            shutdown_timeout_secs: self.shutdown_timeout_secs,
            max_waiting: None,
            adapter_wait_secs: None,
        }
    }
}

/// The example adapters shipped with loramux: `$LORAMUX_ADAPTERS`, else `adapters/` in the
/// current directory, else `adapters/` of the repository the binary was built in.
fn example_adapters() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("LORAMUX_ADAPTERS").filter(|d| !d.is_empty()) {
        let d = PathBuf::from(d);
        return d.is_dir().then_some(d);
    }
    let has_adapters = |d: &Path| {
        std::fs::read_dir(d)
            .map(|rd| rd.flatten().any(|e| e.path().join("adapter_config.json").is_file()))
            .unwrap_or(false)
    };
    let cwd = PathBuf::from("adapters");
    if has_adapters(&cwd) {
        return Some(cwd);
    }
    // target/release/loramux -> <repo>/adapters
    let exe = std::env::current_exe().ok()?;
    let repo = exe.parent()?.parent()?.parent()?;
    let d = repo.join("adapters");
    has_adapters(&d).then_some(d)
}

pub fn run(args: ServeArgs) -> Result<()> {
    let file = match &args.config {
        Some(p) => ServeConfig::from_file(p)?,
        None => ServeConfig::default(),
    };
    let mut config = file.overridden_by(args.as_config());
    let model_spec = config.model.clone().unwrap_or_else(|| DEFAULT_MODEL.to_string());
    let explicit_env = std::env::var_os("LORAMUX_ADAPTERS").is_some_and(|d| !d.is_empty());
    if config.lora_modules.is_none() && config.lora_dir.is_none() && (config.model.is_none() || explicit_env) {
        if let Some(dir) = example_adapters() {
            tracing::info!(dir = %dir.display(), "serving the example adapters");
            config.lora_dir = Some(vec![dir]);
        }
    }
    let settings = config.resolve(&model_spec)?;
    let location = locate_model(&model_spec)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("loramux-http")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let server = Server::start(location, settings).await?;
        server.run_until_signal().await
    })?;
    Ok(())
}
