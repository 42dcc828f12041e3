//! `loramux generate`: one prompt, or a JSONL file of requests run as one mixed batch.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use loramux_engine::registry::{known_model, resolve_model, ResolveError, DEFAULT_MODEL};
use loramux_engine::{ChatMessage, Engine, EngineOptions, LoraLimits, LoraRequest, ModelLocation, Prompt, Request, SamplingParams};
use loramux_server::config::LoraModule;
use serde::Deserialize;

use crate::pull;

/// Arguments of `loramux generate`.
#[derive(Args)]
pub struct GenerateArgs {
    /// Model: a GGUF file, a Hugging Face directory, a known name, or a hub id in the local HF cache.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    /// Adapter to make available, as NAME=PATH (PEFT directory or llama.cpp GGUF adapter file). Repeatable.
    #[arg(long = "lora", value_name = "NAME=PATH")]
    loras: Vec<LoraModule>,
    /// Adapter to use for --prompt/--chat (default: the base model).
    #[arg(long)]
    adapter: Option<String>,
    /// Fold the --adapter into the base weights instead of applying it unmerged (float bases only).
    #[arg(long, requires = "adapter")]
    merged: bool,
    /// Raw text to continue.
    #[arg(long, conflicts_with_all = ["chat", "requests"])]
    prompt: Option<String>,
    /// A user message, rendered with the model's chat template.
    #[arg(long, conflicts_with = "requests")]
    chat: Option<String>,
    /// JSONL file: one {"adapter": NAME|null, "chat"|"prompt": TEXT} per line, run as one batch.
    #[arg(long)]
    requests: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop string. Repeatable.
    #[arg(long)]
    stop: Vec<String>,
    /// Dequantize GGUF weights to float32 (slower; needed for --merged).
    #[arg(long)]
    dequantize: bool,
    /// Largest adapter rank accepted.
    #[arg(long, default_value_t = 64)]
    max_lora_rank: usize,
    /// Print JSON (one line per request) instead of plain text.
    #[arg(long)]
    json: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestLine {
    #[serde(default)]
    adapter: Option<String>,
    #[serde(default)]
    chat: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    max_tokens: Option<usize>,
}

/// Resolves a model argument, pulling known models that are not cached yet.
pub fn locate_model(spec: &str) -> Result<ModelLocation> {
    match resolve_model(spec) {
        Ok(loc) => Ok(loc),
        Err(ResolveError::NotPulled { name, .. }) => {
            let model = known_model(&name).expect("known name");
            eprintln!("{name} is not cached yet: pulling it");
            Ok(ModelLocation::Gguf(pull::pull(model, false)?))
        }
        Err(e) => Err(e.into()),
    }
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let params = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        max_tokens: Some(args.max_tokens),
        stop: args.stop.clone(),
        ..SamplingParams::default()
    };
    params.validate()?;
    let requests: Vec<Request> = if let Some(file) = &args.requests {
        let f = std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
        let mut out = Vec::new();
        for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let r: RequestLine = serde_json::from_str(&line)
                .with_context(|| format!("{}:{}: invalid request line", file.display(), i + 1))?;
            let prompt = match (r.chat, r.prompt) {
                (Some(c), None) => Prompt::Chat(vec![ChatMessage::user(c)]),
                (None, Some(p)) => Prompt::Text(p),
                _ => bail!("{}:{}: give exactly one of \"chat\" or \"prompt\"", file.display(), i + 1),
            };
            let mut p = params.clone();
            if let Some(m) = r.max_tokens {
                p.max_tokens = Some(m);
            }
            out.push(Request { lora: r.adapter.map(LoraRequest::new), prompt, params: p });
        }
        if out.is_empty() {
            bail!("{}: no requests", file.display());
        }
        out
    } else {
        let prompt = match (&args.prompt, &args.chat) {
            (Some(p), None) => Prompt::Text(p.clone()),
            (None, Some(c)) => Prompt::Chat(vec![ChatMessage::user(c.clone())]),
            _ => bail!("give one of --prompt, --chat or --requests"),
        };
        vec![Request { lora: args.adapter.clone().map(LoraRequest::new), prompt, params: params.clone() }]
    };
    let loras = &args.loras;
    for r in &requests {
        if let Some(a) = r.lora.as_ref().map(|l| &l.lora_name) {
            if !loras.iter().any(|m| &m.name == a) {
                bail!("request uses adapter '{a}', which no --lora NAME=PATH provides");
            }
        }
    }

    let location = locate_model(&args.model)?;
    let options = EngineOptions {
        dequantize: args.dequantize,
        lora: LoraLimits { max_rank: args.max_lora_rank, max_loras: loras.len().max(1), ..LoraLimits::default() },
        ..EngineOptions::default()
    };
    let mut engine = Engine::load(&location, &options).with_context(|| format!("loading {}", location.path().display()))?;
    for LoraModule { name, path } in loras {
        engine.loras_mut().load(name, path)?;
    }
    if args.merged {
        engine.merge_adapter(args.adapter.as_deref().expect("clap requires --adapter"))?;
    }
    let completions = engine.generate(&requests)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for c in completions {
        if args.json || args.requests.is_some() {
            serde_json::to_writer(&mut out, &c)?;
            writeln!(out)?;
        } else {
            writeln!(out, "{}", c.text)?;
        }
    }
    Ok(())
}
