//! Flags, TOML and their merge, defaults, and refusals.

use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, Parser};
use loramux_engine::LoraLimits;

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

#[test]
fn router_flags() {
    let s = parse(&[]).resolve("m").unwrap();
    assert_eq!(s.router, RouterSettings { aliases: vec!["auto".into()], min_confidence: defaults::ROUTER_MIN_CONFIDENCE, fallback: None, model: None, layer: loramux_engine::routing::BaseEmbedder::DEFAULT_LAYER });
    let s = parse(&["--router-aliases", "auto", "pick", "--router-min-confidence", "0.3", "--router-fallback", "sql"]).resolve("m").unwrap();
    assert_eq!(s.router.aliases, ["auto", "pick"]);
    assert_eq!(s.router.min_confidence, 0.3);
    assert_eq!(s.router.fallback.as_deref(), Some("sql"));
    // The base model's name as fallback is the default.
    assert_eq!(parse(&["--router-fallback", "m"]).resolve("m").unwrap().router.fallback, None);
    let toml = ServeConfig::from_toml("router-aliases = [\"x\"]\nrouter-min-confidence = 0.5\n").unwrap().resolve("m").unwrap();
    assert_eq!(toml.router.aliases, ["x"]);
    for bad in [&["--router-aliases", "m"][..], &["--router-fallback", "auto"], &["--router-min-confidence", "NaN"]] {
        assert!(parse(bad).resolve("m").is_err(), "{bad:?}");
    }
}

#[test]
fn tenants_file_from_toml_or_flag() {
    let file = ServeConfig::from_toml("tenants = \"/etc/loramux/tenants.toml\"\n").unwrap();
    assert_eq!(file.clone().resolve("m").unwrap().tenants_file, Some(PathBuf::from("/etc/loramux/tenants.toml")));
    let flags = parse(&["--tenants", "/tmp/t.toml", "--api-key", "k"]);
    let s = file.overridden_by(flags).resolve("m").unwrap();
    assert_eq!(s.tenants_file, Some(PathBuf::from("/tmp/t.toml")));
    assert_eq!(s.api_keys.len(), 1, "--api-key and --tenants together");
    assert_eq!(ServeConfig::default().resolve("m").unwrap().tenants_file, None);
}

#[test]
fn adapter_store_and_upload_cap_from_toml_and_flags() {
    let file = ServeConfig::from_toml("adapter_store = \"/srv/store\"\nmax-upload-bytes = 1000\n").unwrap();
    let s = file.clone().resolve("m").unwrap();
    assert_eq!((s.adapter_store, s.max_upload_bytes), (PathBuf::from("/srv/store"), 1000));
    let s = file.overridden_by(parse(&["--adapter-store", "/other", "--max-upload-bytes", "5"])).resolve("m").unwrap();
    assert_eq!((s.adapter_store, s.max_upload_bytes), (PathBuf::from("/other"), 5));
    let s = ServeConfig::default().resolve("m").unwrap();
    assert_eq!(s.adapter_store, loramux_engine::registry::cache_dir().join("adapter-store"));
    assert_eq!(s.max_upload_bytes, defaults::MAX_UPLOAD_BYTES);
    assert!(parse(&["--max-upload-bytes", "0"]).resolve("m").is_err());
}

#[test]
fn web_ui_is_on_unless_disabled() {
    assert!(ServeConfig::default().resolve("m").unwrap().web_ui);
    assert!(!parse(&["--disable-web-ui"]).resolve("m").unwrap().web_ui);
    assert!(parse(&["--disable-web-ui", "false"]).resolve("m").unwrap().web_ui);
    assert!(!ServeConfig::from_toml("disable-web-ui = true").unwrap().resolve("m").unwrap().web_ui);
}

#[test]
fn adapter_uris_where_paths_go() {
    let s = parse(&[
        "--lora-modules", "a=/x/a", "r=s3://bucket/adapters/r",
        "--lora-dir", "/l1", "--lora-dir", "s3://bucket/adapters/",
        "--merge-lora", "hf://org/repo@v1",
        "--lora-cache-dir", "/c", "--lora-cache-bytes", "1000", "--lora-fetch-timeout-secs", "5",
        "--lora-sync", "/etc/sync.yaml",
    ])
    .resolve("m")
    .unwrap();
    assert_eq!(s.lora_modules, vec![module("a", "/x/a")]);
    assert_eq!(s.remote_lora_modules.len(), 1);
    assert_eq!(s.remote_lora_modules[0].1.to_string(), "s3://bucket/adapters/r");
    assert_eq!(s.lora_dirs, vec![PathBuf::from("/l1")]);
    assert_eq!(s.lora_prefixes.iter().map(|u| u.to_string()).collect::<Vec<_>>(), ["s3://bucket/adapters"]);
    assert_eq!((s.merge_lora.clone(), s.merge_lora_uri.as_ref().map(|u| u.to_string())), (None, Some("hf://org/repo@v1".into())));
    assert_eq!((s.lora_cache_dir.clone(), s.lora_cache_bytes, s.lora_fetch_timeout), (PathBuf::from("/c"), 1000, Duration::from_secs(5)));
    assert_eq!(s.lora_sync, Some(PathBuf::from("/etc/sync.yaml")));
    let d = parse(&[]).resolve("m").unwrap();
    assert!(d.lora_cache_dir.ends_with("lora-cache") && d.lora_prefixes.is_empty() && d.lora_sync.is_none());
    let refusal = |args: &[&str]| parse(args).resolve("m").unwrap_err().to_string();
    assert!(refusal(&["--lora-modules", "r=s3://B/x"]).contains("--lora-modules"));
    assert!(refusal(&["--lora-dir", "s3://bucket/a.gguf"]).contains("--lora-dir"));
    assert!(refusal(&["--lora-dir", &format!("s3://bucket/p#sha256={}", "0".repeat(64))]).contains("pinned"));
    assert!(refusal(&["--merge-lora", "https://h/folder"]).contains("--merge-lora"));
    assert!(refusal(&["--lora-fetch-timeout-secs", "0"]).contains("--lora-fetch-timeout-secs"));
    assert!(refusal(&["--lora-modules", "m=s3://bucket/k"]).contains("base model"));
}
