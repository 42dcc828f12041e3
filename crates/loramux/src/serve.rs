//! `loramux serve`: reads flags and the optional TOML config (flags win), finds the model
//! and the example adapters, and runs `loramux_server` until SIGINT/SIGTERM.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use loramux_engine::registry::DEFAULT_MODEL;
use loramux_server::{ServeConfig, Server};

use crate::generate::locate_model;

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

/// Serves with `flags` over the `--config` file until SIGINT/SIGTERM.
pub fn run(flags: ServeConfig) -> Result<()> {
    let mut config = flags.over_config_file()?;
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
