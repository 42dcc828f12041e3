//! `--lora-sync FILE`: the Gateway API Inference Extension's lora syncer, in-process. The
//! file is the syncer's ConfigMap data (mounted without `subPath`, so updates reach it):
//!
//! ```yaml
//! vLLMLoRAConfig:
//!   name: my-pool-adapters        # host, port, name, defaultBaseModel: accepted, unused
//!   ensureExist:
//!     models:
//!     - id: pirate
//!       source: s3://bucket/adapters/pirate
//!       base-model: smollm2-135m
//!   ensureNotExist:
//!     models:
//!     - id: old
//!       source: s3://bucket/adapters/old
//! ```
//!
//! It is re-read when its modification time or length changes (polled): each `ensureExist`
//! adapter is fetched and loaded (again, replacing it, when its source changed), each
//! `ensureNotExist` one unloaded. A `source` is a URI, a local path, or a bare `org/repo`
//! (the hub, as the syncer's vLLM would resolve it). Failed entries are retried.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;

use super::{AdapterUri, Sources};
use crate::scheduler::SchedulerHandle;

/// How often the file's modification time and length are checked.
const POLL: Duration = Duration::from_secs(2);
/// How soon entries that failed are tried again.
const RETRY: Duration = Duration::from_secs(10);

#[derive(Debug, Deserialize)]
struct SyncFile {
    #[serde(rename = "vLLMLoRAConfig")]
    config: SyncConfig,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SyncConfig {
    #[serde(default)]
    ensure_exist: Option<Models>,
    #[serde(default)]
    ensure_not_exist: Option<Models>,
}

#[derive(Debug, Default, Deserialize)]
struct Models {
    #[serde(default)]
    models: Vec<Model>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
struct Model {
    id: String,
    source: String,
    #[serde(rename = "base-model", default)]
    base_model: Option<String>,
}

/// Where a `source` is: a URI, or a local adapter.
#[derive(Debug, PartialEq)]
enum Source {
    Remote(AdapterUri),
    Local(PathBuf),
}

/// A `source` as this server reads it: a URI; a path that exists; else `org/repo` on the hub.
fn source(s: &str) -> Result<Source, String> {
    if let Some(uri) = AdapterUri::parse(s).map_err(|e| e.to_string())? {
        return Ok(Source::Remote(uri));
    }
    let p = Path::new(s);
    if p.exists() {
        return Ok(Source::Local(p.to_path_buf()));
    }
    match AdapterUri::parse(&format!("hf://{s}")) {
        Ok(Some(uri)) if s.split('/').count() == 2 => Ok(Source::Remote(uri)),
        _ => Err(format!("source {s}: not a URI, an existing path or a hub org/repo")),
    }
}

/// Parses the file's text: `(ensureExist, ensureNotExist)`.
fn parse(text: &str) -> Result<(Vec<Model>, Vec<Model>), String> {
    let f: SyncFile = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
    let take = |m: Option<Models>| m.map(|m| m.models).unwrap_or_default();
    Ok((take(f.config.ensure_exist), take(f.config.ensure_not_exist)))
}

/// Starts the reconciler of `file`; it runs until aborted (at shutdown).
pub fn spawn_sync(sources: Arc<Sources>, sched: SchedulerHandle, file: PathBuf, base_name: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut seen: Option<(SystemTime, u64)> = None;
        // id -> the source it was loaded from by this reconciler.
        let mut applied: HashMap<String, String> = HashMap::new();
        let mut retry_at: Option<Instant> = None;
        loop {
            let stamp = std::fs::metadata(&file).ok().map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
            let changed = stamp.is_some() && stamp != seen;
            if changed || retry_at.is_some_and(|t| Instant::now() >= t) {
                seen = stamp;
                let failed = reconcile(&sources, &sched, &file, &base_name, &mut applied).await;
                retry_at = failed.then(|| Instant::now() + RETRY);
            }
            tokio::time::sleep(POLL).await;
        }
    })
}

/// One pass over the file; returns whether anything failed (to be tried again).
async fn reconcile(sources: &Sources, sched: &SchedulerHandle, file: &Path, base_name: &str, applied: &mut HashMap<String, String>) -> bool {
    let parsed = std::fs::read_to_string(file).map_err(|e| e.to_string()).and_then(|t| parse(&t));
    let (exist, not_exist) = match parsed {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(file = %file.display(), "--lora-sync: file refused, nothing changed: {e}");
            return false;
        }
    };
    let mut failed = false;
    for m in &not_exist {
        if sched.shared.adapters().iter().any(|a| a.name == m.id) {
            match sched.unload_adapter(&m.id).await {
                Ok(()) => {
                    sched.router.remove(&m.id);
                    tracing::info!(adapter = %m.id, "--lora-sync: unloaded (ensureNotExist)");
                }
                Err(e) => tracing::warn!(adapter = %m.id, "--lora-sync: unload failed: {}", e.message),
            }
        }
        applied.remove(&m.id);
    }
    for m in &exist {
        if m.id.is_empty() || m.id == base_name || not_exist.iter().any(|n| n.id == m.id) {
            tracing::warn!(adapter = %m.id, "--lora-sync: skipped (empty, the base model's name, or also in ensureNotExist)");
            continue;
        }
        let known = sched.shared.adapters().iter().any(|a| a.name == m.id);
        if known && applied.get(&m.id) == Some(&m.source) {
            continue;
        }
        if let Some(b) = m.base_model.as_deref().filter(|b| *b != base_name) {
            tracing::debug!(adapter = %m.id, base_model = b, "--lora-sync: base-model differs from the served name; the adapter's shapes are checked against the base");
        }
        let result = match source(&m.source) {
            Ok(Source::Remote(uri)) => sources.serve(sched, &m.id, &uri, known).await,
            Ok(Source::Local(path)) => sources.serve_path(sched, &m.id, &path, &m.source, known).await,
            Err(e) => Err(crate::error::ApiError::bad_request(e)),
        };
        match result {
            Ok(_) => {
                tracing::info!(adapter = %m.id, source = %m.source, "--lora-sync: loaded (ensureExist)");
                applied.insert(m.id.clone(), m.source.clone());
            }
            Err(e) => {
                tracing::warn!(adapter = %m.id, source = %m.source, "--lora-sync: not loaded, retried later: {}", e.message);
                failed = true;
            }
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gie_format() {
        let text = "vLLMLoRAConfig:\n  name: pool\n  port: 8000\n  defaultBaseModel: x\n  ensureExist:\n    models:\n    - base-model: smollm2\n      id: a\n      source: s3://bucket/a\n  ensureNotExist:\n    models:\n    - id: b\n      source: hf://org/b\n";
        let (exist, not) = parse(text).unwrap();
        assert_eq!(exist, vec![Model { id: "a".into(), source: "s3://bucket/a".into(), base_model: Some("smollm2".into()) }]);
        assert_eq!(not[0].id, "b");
        assert_eq!(parse("vLLMLoRAConfig: {}\n").unwrap(), (vec![], vec![]));
        assert!(parse("other: 1\n").is_err());
        assert!(parse("vLLMLoRAConfig:\n  ensureExist:\n    models:\n    - id: a\n").is_err());
        assert!(matches!(source("org/repo").unwrap(), Source::Remote(u) if u.to_string() == "hf://org/repo@main"));
        assert!(source("a/b/c/d").is_err());
    }
}
