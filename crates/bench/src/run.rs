//! What every scenario shares: where the server is (a URL, or a loramux server the run
//! starts), the metadata recorded with each result, the closed-loop request runner, and
//! writing the JSON, Markdown and plots.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::client::{ChatRequest, Endpoint, Sample};
use crate::launch::LaunchedServer;
use crate::BenchError;

/// Version of the result files' layout (bumped on incompatible changes).
pub const SCHEMA_VERSION: u32 = 1;

/// Where requests go: an existing OpenAI-compatible server, or one loramux starts.
#[derive(Args, Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
pub struct TargetArgs {
    /// An OpenAI-compatible server to measure (e.g. http://127.0.0.1:8000); without it the
    /// benchmark starts its own loramux server.
    #[arg(long)]
    pub url: Option<String>,
    /// Bearer key for --url.
    #[arg(long, env = "LORAMUX_BENCH_API_KEY", hide_env_values = true)]
    #[serde(skip)]
    pub api_key: Option<String>,
    /// Model of the server the benchmark starts [default: smollm2-135m with the example adapters].
    #[arg(long)]
    pub model: Option<String>,
    /// Adapter for the server the benchmark starts, as NAME=PATH (its --lora-modules). Repeatable.
    #[arg(long = "lora", value_name = "NAME=PATH")]
    pub loras: Vec<String>,
    /// Extra flag for the server the benchmark starts, e.g. --server-arg=--max-num-seqs=16. Repeatable.
    #[arg(long = "server-arg", value_name = "FLAG", allow_hyphen_values = true)]
    pub server_args: Vec<String>,
}

impl TargetArgs {
    /// `loramux serve` flags for a server this run starts, before scenario-specific ones.
    pub fn serve_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(m) = &self.model {
            args.extend(["--model".to_string(), m.clone()]);
        }
        if !self.loras.is_empty() {
            args.push("--lora-modules".into());
            args.extend(self.loras.iter().cloned());
        }
        args.extend(self.server_args.iter().cloned());
        args
    }
}

/// What a run needs from the `loramux` binary: its own path (to start servers), where to
/// write, and the command line (recorded).
#[derive(Clone, Debug)]
pub struct BenchContext {
    pub exe: PathBuf,
    /// The model a started server serves (resolved, pulled if needed), for making adapters
    /// that fit it; `None` when measuring a server given by URL.
    pub model: Option<loramux_engine::ModelLocation>,
    pub out_dir: PathBuf,
    pub command: Vec<String>,
}

impl BenchContext {
    /// Starts `loramux serve` with `args`, logging to `<out>/<label>.server.log`.
    pub async fn launch(&self, label: &str, args: &[String]) -> Result<LaunchedServer, BenchError> {
        let log = self.out_dir.join(format!("{label}.server.log"));
        eprintln!("starting: loramux serve {}", args.join(" "));
        std::fs::create_dir_all(&self.out_dir).map_err(|e| BenchError::Io { path: self.out_dir.clone(), source: e })?;
        LaunchedServer::start(&self.exe, args, &log).await
    }
}

/// The machine a result was measured on.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
pub struct Machine {
    pub hostname: String,
    pub os: String,
    pub arch: String,
    pub cpu_model: String,
    pub logical_cores: usize,
    pub memory_gib: f64,
    /// Accelerator, or "none (CPU)".
    pub gpu_name: String,
}

impl Machine {
    /// Reads this machine's description (Linux /proc; fields default where unknown).
    pub fn current() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: f64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        Self {
            hostname: std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default(),
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
            cpu_model,
            logical_cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            memory_gib: (mem_kib / (1024.0 * 1024.0) * 10.0).round() / 10.0,
            gpu_name: "none (CPU)".into(),
        }
    }
}

/// Recorded with every result: when, where, what, how.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
pub struct Metadata {
    /// `switch`, `deployment`, `swap`, `load` or `quality`.
    pub scenario: String,
    pub schema_version: u32,
    /// RFC 3339 start time.
    pub timestamp: String,
    pub loramux_version: String,
    /// The command line that produced the result.
    pub command: Vec<String>,
    pub machine: Machine,
    /// Same as `machine.gpu_name` (the field the LoRA-vs-merged study's notebook reads).
    pub gpu_name: String,
    /// The served base model.
    pub base_model: String,
    /// The server measured: a URL given with --url, or "loramux (started by the benchmark)".
    pub server: String,
}

impl Metadata {
    /// Metadata for a run starting now.
    pub fn new(scenario: &str, ctx: &BenchContext, base_model: &str, server: &str) -> Self {
        let machine = Machine::current();
        Self {
            scenario: scenario.into(),
            schema_version: SCHEMA_VERSION,
            timestamp: chrono::Local::now().to_rfc3339(),
            loramux_version: env!("CARGO_PKG_VERSION").into(),
            command: ctx.command.clone(),
            gpu_name: machine.gpu_name.clone(),
            machine,
            base_model: base_model.into(),
            server: server.into(),
        }
    }
}

/// A progress bar on stderr for `len` steps (drawn only on a terminal).
pub fn progress(len: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {elapsed_precise} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    bar
}

/// Sends `requests` with `concurrency` clients in a closed loop (each client sends its next
/// request when the previous one finishes). Returns the samples in request order and the
/// run's wall time in seconds.
pub async fn run_closed_loop(
    endpoint: &Endpoint,
    requests: &[ChatRequest],
    concurrency: usize,
    bar: &ProgressBar,
) -> (Vec<Sample>, f64) {
    let next = Arc::new(AtomicUsize::new(0));
    let requests: Arc<Vec<ChatRequest>> = Arc::new(requests.to_vec());
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (next, requests, endpoint, bar) = (next.clone(), requests.clone(), endpoint.clone(), bar.clone());
        workers.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(req) = requests.get(i) else { break };
                out.push(endpoint.chat(req, i, start).await);
                bar.inc(1);
            }
            out
        }));
    }
    let mut samples = Vec::with_capacity(requests.len());
    for w in workers {
        samples.extend(w.await.unwrap_or_default());
    }
    let wall = start.elapsed().as_secs_f64();
    samples.sort_by_key(|s| s.index);
    (samples, wall)
}

/// Latencies (ms) of the successful samples.
pub fn ok_latencies(samples: &[Sample]) -> Vec<f64> {
    samples.iter().filter(|s| s.ok).map(|s| s.latency_ms).collect()
}

/// Renders a scenario result: its Markdown summary and plots.
pub trait Report {
    /// The Markdown summary.
    fn markdown(&self) -> String;
    /// Writes the plots (PNG and SVG) into `dir`, named after `stem`; returns their paths.
    fn plots(&self, dir: &Path, stem: &str) -> Result<Vec<PathBuf>, BenchError>;
}

/// Appends a report's "Notes" section (what was left out, and why); nothing when there are none.
pub fn notes_section(out: &mut String, notes: &[String]) {
    if notes.is_empty() {
        return;
    }
    out.push_str("\n## Notes\n\n");
    for n in notes {
        out.push_str(&format!("- {n}\n"));
    }
}

/// Writes `result` as JSON to `json_path`, then its Markdown (same name, `.md`) and plots
/// next to it. Returns every path written.
pub fn write_outputs<R: Serialize + Report>(result: &R, json_path: &Path) -> Result<Vec<PathBuf>, BenchError> {
    let dir = json_path.parent().unwrap_or(Path::new(".")).to_path_buf();
    std::fs::create_dir_all(&dir).map_err(|e| BenchError::Io { path: dir.clone(), source: e })?;
    let json = serde_json::to_vec_pretty(result).map_err(|e| BenchError::Invalid(e.to_string()))?;
    write_atomic(json_path, &json).map_err(|e| BenchError::Io { path: json_path.to_path_buf(), source: e })?;
    let mut written = vec![json_path.to_path_buf()];
    written.extend(render_outputs(result, json_path)?);
    Ok(written)
}

/// Writes `bytes` to `path` whole or not at all: into a temporary file beside it, renamed
/// over `path` once complete, so a full disk or a crash never leaves a truncated result
/// (an earlier result at `path` stays as it was).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("result");
    let tmp = path.with_file_name(format!(".{name}.partial"));
    let r = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// Writes the Markdown and plots of `result` next to `json_path` (what `bench report` does).
pub fn render_outputs<R: Report + ?Sized>(result: &R, json_path: &Path) -> Result<Vec<PathBuf>, BenchError> {
    let dir = json_path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let stem = json_path.file_stem().and_then(|s| s.to_str()).unwrap_or("result").to_string();
    let md_path = json_path.with_extension("md");
    std::fs::write(&md_path, result.markdown()).map_err(|e| BenchError::Io { path: md_path.clone(), source: e })?;
    let mut written = vec![md_path];
    written.extend(result.plots(&dir, &stem)?);
    Ok(written)
}

/// Formats an optional number with `digits` decimals, or "n/a".
pub fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "n/a".to_string(), |x| format!("{x:.digits$}"))
}

/// The server a scenario talks to, and the one it started (kept alive until dropped).
pub struct Connected {
    pub endpoint: Endpoint,
    pub launched: Option<LaunchedServer>,
    pub base_model: String,
    /// For the metadata: the URL given, or the flags of the server started.
    pub server: String,
}

/// Connects to `--url`, or starts loramux with the target's flags plus `extra` flags.
pub async fn connect(ctx: &BenchContext, target: &TargetArgs, label: &str, extra: &[String]) -> Result<Connected, BenchError> {
    let (endpoint, launched, server) = match &target.url {
        Some(url) => (Endpoint::new(url, target.api_key.clone()), None, url.clone()),
        None => {
            let mut args = target.serve_args();
            args.extend(extra.iter().cloned());
            let launched = ctx.launch(label, &args).await?;
            let endpoint = Endpoint::new(launched.url(), target.api_key.clone());
            (endpoint, Some(launched), format!("loramux serve {} (started by the benchmark)", args.join(" ")))
        }
    };
    let base_model = endpoint.base_model().await?;
    Ok(Connected { endpoint, launched, base_model, server })
}

impl BenchContext {
    /// Projection shapes of the model a started server serves (to synthesize adapters).
    pub fn module_shapes(&self) -> Result<loramux_engine::lora::ModuleShapes, BenchError> {
        let location = self
            .model
            .as_ref()
            .ok_or_else(|| BenchError::Invalid("this scenario starts its own servers; --url is not supported".into()))?;
        let cfg = loramux_engine::read_model_config(location)
            .map_err(|e| BenchError::Invalid(format!("reading the model's configuration: {e}")))?;
        Ok(loramux_engine::lora::ModuleShapes::from_config(&cfg))
    }

    /// Folder for adapters a scenario synthesizes (removed by the caller when done).
    pub fn scratch_dir(&self, name: &str) -> PathBuf {
        self.out_dir.join(format!(".{name}-adapters"))
    }
}

/// The model name to record: `--url` servers report theirs; a started server serves
/// `--model` or the default.
pub fn model_label(target: &TargetArgs) -> String {
    target.model.clone().unwrap_or_else(|| loramux_engine::registry::DEFAULT_MODEL.to_string())
}

/// Picks adapter indices for `n` requests: round-robin, or Zipf(`alpha`) popularity
/// (index k chosen with weight 1/(k+1)^alpha), seeded for repeatability.
pub fn popularity(n: usize, adapters: usize, zipf_alpha: Option<f64>, seed: u64) -> Vec<usize> {
    use rand::distr::weighted::WeightedIndex;
    use rand::distr::Distribution;
    use rand::SeedableRng;
    match zipf_alpha {
        None => (0..n).map(|i| i % adapters.max(1)).collect(),
        Some(alpha) => {
            let weights: Vec<f64> = (0..adapters.max(1)).map(|k| 1.0 / ((k + 1) as f64).powf(alpha)).collect();
            let dist = WeightedIndex::new(&weights).expect("positive weights");
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            (0..n).map(|_| dist.sample(&mut rng)).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::write_atomic;

    #[test]
    fn write_atomic_replaces_whole_files_and_leaves_nothing_behind_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.json");
        write_atomic(&p, b"{\"a\":1}").unwrap();
        write_atomic(&p, b"{\"a\":2}").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"{\"a\":2}");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("r.json")], "no temporary file left");
        // A write that cannot complete (here: its directory is missing; scripts/faults.sh
        // disk_full_bench checks a full filesystem) creates nothing.
        let missing = dir.path().join("gone").join("r.json");
        assert!(write_atomic(&missing, b"{}").is_err());
        assert!(!missing.exists());
    }
}
