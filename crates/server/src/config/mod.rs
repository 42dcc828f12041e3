//! Server settings: [`ServeConfig`] is what a TOML file or the command line gives (one
//! struct for both: every field optional, flags override the file with
//! [`ServeConfig::overridden_by`]); [`Settings`] is the resolved, validated set with defaults
//! filled in.
//!
//! - this file: [`defaults`], one constant per setting;
//! - `flags.rs`: [`ServeConfig`], the flag definitions (also the TOML keys), `--lora-modules`
//!   parsing, and reading and merging a config file;
//! - `settings.rs`: [`Settings`] and [`ServeConfig::resolve`], which fills in defaults and
//!   validates, one named step per group of settings.

mod flags;
mod settings;
#[cfg(test)]
mod tests;

pub use flags::{LoraModule, ServeConfig};
pub use settings::{DebugFaults, RouterSettings, Settings};

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
    pub const MAX_UPLOAD_BYTES: usize = 256 << 20;
    pub const LORA_CACHE_BYTES: u64 = 10 << 30;
    pub const LORA_FETCH_TIMEOUT_SECS: f64 = 300.0;
    pub const HTTP_READ_TIMEOUT_SECS: f64 = 30.0;
    pub const SHUTDOWN_TIMEOUT_SECS: f64 = 30.0;
    pub const MAX_WAITING: usize = scheduler::MAX_WAITING;
    pub const MAX_QUEUE_DELAY_SECS: f64 = scheduler::MAX_QUEUE_DELAY.as_secs_f64();
    pub const ADAPTER_WAIT_SECS: f64 = scheduler::ADAPTER_WAIT.as_secs_f64();
    pub const AUTO_MERGE_AFTER_SECS: f64 = 2.0;
    pub const MAX_N: usize = 16;
    pub const ROUTER_ALIAS: &str = "auto";
    pub const ROUTER_MIN_CONFIDENCE: f32 = loramux_engine::routing::RouterConfig::DEFAULT_MIN_CONFIDENCE;
}

/// Bytes per GiB, for help texts that show byte defaults in the unit people think in.
const GIB: f64 = (1u64 << 30) as f64;
