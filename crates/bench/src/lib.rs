//! `loramux bench`: measurements that answer how to deploy adapters. This crate holds the
//! scenarios; the `loramux` binary only parses flags.
//!
//! - [`switch`]: alternating two adapters against staying on one (the multiplexer experiment).
//! - [`deployment`]: unmerged LoRA against the same adapter merged, and 2/3-adapter deployments.
//! - [`swap`]: adapter load and switch cost, rank sweep, adapter-count sweep.
//! - [`load`]: open-loop Poisson load with adapter popularity, latency percentiles and goodput.
//! - [`engine_bench`]: the engine's own speed in-process.
//! - [`quality`]: task adapters' accuracy and likelihood against their speed, by rank, in-process.
//!
//! Every scenario writes a JSON result (raw samples included; schema in [`schema`]), a
//! Markdown summary and PNG/SVG plots; [`report`] re-renders them from a saved file.

pub mod client;
pub mod deployment;
pub mod engine_bench;
pub mod fairness;
pub mod launch;
pub mod load;
pub mod plot;
pub mod quality;
pub mod report;
pub mod route;
pub mod run;
pub mod schema;
pub mod stats;
pub mod swap;
pub mod switch;
pub mod synth;

use std::path::PathBuf;

/// Why a benchmark could not run or finish. Failed requests are not errors: they are
/// counted in the results.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("cannot reach {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("the server does not serve {missing} (it serves: {available})")]
    ModelNotFound { missing: String, available: String },
    #[error("server error: {0}")]
    Server(String),
    #[error("could not start a loramux server: {0}")]
    Launch(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
    #[error("plot: {0}")]
    Plot(#[from] plot::PlotError),
    #[error("statistics: {0}")]
    Stats(#[from] stats::StatsError),
}

/// Turns an engine error into the run's error, saying what was being done (`"{what}: {e}"`).
pub(crate) fn engine_error(what: &str) -> impl Fn(loramux_engine::EngineError) -> BenchError + '_ {
    move |e| BenchError::Invalid(format!("{what}: {e}"))
}
