//! [`LoraCache`]: fetched adapters on disk, so a restart (or a second request) does not
//! fetch again.
//!
//! ```text
//! <cache>/blobs/<sha256>/         an adapter's files: adapter_config.json +
//!                                 adapter_model.safetensors (+ routing.json), or adapter.gguf
//! <cache>/sources/<sha256(uri)>.json   the index: the URI (pin included) -> blob, bytes;
//!                                 its modification time is when it was last used
//! <cache>/tmp/<random>/           a fetch in progress (removed at open)
//! ```
//!
//! A blob is named by the content hash of its files (as the upload store names them), written
//! under `tmp/`, fsynced, and renamed into place; its index entry is written after it, the
//! same way ([`crate::durable`]). A fetch killed at any point leaves a temporary or an
//! unreferenced blob, both removed by [`LoraCache::open`]; never an entry for half an
//! adapter. A hit is hashed again before use: a blob that changed on disk is dropped and
//! fetched anew. Past `--lora-cache-bytes` the least recently used entries are evicted, the
//! ones whose adapters are resident excepted.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::fetch::GGUF_FILE;
use super::SourceError;
use crate::durable::{self, hex, ContentHash};

/// One index entry.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Entry {
    /// The URI as given, pin included: what the entry is looked up by.
    source: String,
    /// The blob: the content hash of its files.
    sha256: String,
    bytes: u64,
}

/// A fetch being written under `tmp/`; removed when dropped before it is committed.
pub(crate) struct Staging {
    pub dir: PathBuf,
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The cache: its root and byte cap. Its lock serialises changes to the index, so an
/// eviction never removes a blob an entry being written points to.
pub struct LoraCache {
    root: PathBuf,
    max_bytes: u64,
    lock: Mutex<()>,
}

fn cache_err(path: &Path) -> impl Fn(std::io::Error) -> SourceError + '_ {
    move |e| SourceError::Cache { path: path.display().to_string(), message: e.to_string() }
}

/// What the engine reads in a blob: `adapter.gguf`, or the folder.
fn adapter_path(blob: &Path) -> PathBuf {
    let gguf = blob.join(GGUF_FILE);
    if gguf.is_file() {
        gguf
    } else {
        blob.to_path_buf()
    }
}

/// The content hash of a folder's files (plain files only, in name order) and their bytes.
fn hash_dir(dir: &Path) -> std::io::Result<(String, u64)> {
    let mut names: Vec<String> = fs::read_dir(dir)?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut hash = ContentHash::default();
    let mut bytes = 0;
    for n in names {
        let data = fs::read(dir.join(&n))?;
        bytes += data.len() as u64;
        hash.file(&n, &data);
    }
    Ok((hash.finish(), bytes))
}

impl LoraCache {
    /// Opens (creates) the cache at `root`: removes temporaries, entries whose blob is gone
    /// and blobs no entry points to.
    /// Nothing is created until the first fetch. A temporary is named after the process that
    /// writes it, so servers sharing a cache do not remove each other's fetches in progress.
    pub fn open(root: PathBuf, max_bytes: u64) -> Result<Self, SourceError> {
        if let Ok(tmp) = fs::read_dir(root.join("tmp")) {
            for t in tmp.flatten() {
                let name = t.file_name().to_string_lossy().into_owned();
                let pid = name.split('-').next().unwrap_or("");
                if pid.is_empty() || !Path::new("/proc").join(pid).exists() {
                    let _ = fs::remove_dir_all(t.path());
                }
            }
        }
        let cache = Self { root, max_bytes, lock: Mutex::new(()) };
        let entries = cache.entries();
        let referenced: HashSet<&str> = entries.iter().map(|(_, e, _)| e.sha256.as_str()).collect();
        let Ok(blobs) = fs::read_dir(cache.root.join("blobs")) else { return Ok(cache) };
        for b in blobs.flatten() {
            if !referenced.contains(b.file_name().to_string_lossy().as_ref()) {
                tracing::info!(blob = %b.path().display(), "adapter cache: removing a blob no entry points to");
                let _ = fs::remove_dir_all(b.path());
            }
        }
        Ok(cache)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn entry_path(&self, source: &str) -> PathBuf {
        self.root.join("sources").join(format!("{}.json", hex(&Sha256::digest(source.as_bytes()))))
    }

    fn blob_dir(&self, sha256: &str) -> PathBuf {
        self.root.join("blobs").join(sha256)
    }

    /// Every readable entry with its file and last use; unreadable ones and entries whose blob
    /// is missing are removed.
    fn entries(&self) -> Vec<(PathBuf, Entry, SystemTime)> {
        let mut out = Vec::new();
        let Ok(dir) = fs::read_dir(self.root.join("sources")) else { return out };
        for f in dir.flatten() {
            let path = f.path();
            let entry = fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Entry>(&b).ok());
            let used = f.metadata().and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
            match entry {
                Some(e) if path == self.entry_path(&e.source) && self.blob_dir(&e.sha256).is_dir() => out.push((path, e, used)),
                _ => {
                    let _ = fs::remove_file(&path);
                }
            }
        }
        out
    }

    /// The cached adapter of `source`, verified (its files hash to its name) and marked used;
    /// `None` when there is none or it was damaged (then it is dropped).
    pub(crate) fn lookup(&self, source: &str) -> Option<PathBuf> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let path = self.entry_path(source);
        let entry: Entry = serde_json::from_slice(&fs::read(&path).ok()?).ok()?;
        let blob = self.blob_dir(&entry.sha256);
        match hash_dir(&blob) {
            Ok((h, _)) if h == entry.sha256 && entry.source == source => {
                let _ = fs::File::options().write(true).open(&path).and_then(|f| f.set_modified(SystemTime::now()));
                Some(adapter_path(&blob))
            }
            _ => {
                tracing::warn!(source, blob = %blob.display(), "adapter cache: the cached files do not match their hash; fetching again");
                let _ = fs::remove_file(&path);
                let _ = fs::remove_dir_all(&blob);
                None
            }
        }
    }

    /// A new folder under `tmp/` for a fetch.
    pub(crate) fn staging(&self) -> Result<Staging, SourceError> {
        let tmp = self.root.join("tmp");
        fs::create_dir_all(&tmp).map_err(cache_err(&tmp))?;
        let dir = tmp.join(format!("{}-{}", std::process::id(), durable::random_suffix()));
        fs::create_dir(&dir).map_err(cache_err(&dir))?;
        Ok(Staging { dir })
    }

    /// Moves a complete staged fetch into its blob and writes the entry for `source`;
    /// returns what the engine reads. The staged files are hashed here, from disk.
    pub(crate) fn commit(&self, staged: Staging, source: &str) -> Result<PathBuf, SourceError> {
        durable::sync_dir(&staged.dir).map_err(cache_err(&staged.dir))?;
        let (sha256, bytes) = hash_dir(&staged.dir).map_err(cache_err(&staged.dir))?;
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let blobs = self.root.join("blobs");
        let sources = self.root.join("sources");
        for d in [&blobs, &sources] {
            fs::create_dir_all(d).map_err(cache_err(d))?;
        }
        let blob = self.blob_dir(&sha256);
        if !blob.is_dir() {
            fs::rename(&staged.dir, &blob).map_err(cache_err(&blob))?;
            durable::sync_dir(&blobs).map_err(cache_err(&blobs))?;
        }
        let path = self.entry_path(source);
        let tmp = sources.join(format!(".{}", durable::random_suffix()));
        let json = serde_json::to_vec_pretty(&Entry { source: source.to_string(), sha256, bytes }).unwrap_or_default();
        durable::write_synced(&tmp, &json).map_err(cache_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(cache_err(&path))?;
        durable::sync_dir(&sources).map_err(cache_err(&sources))?;
        Ok(adapter_path(&blob))
    }

    /// Evicts least recently used entries (and their blobs, once unreferenced) until the
    /// cache holds at most `--lora-cache-bytes`; adapters at a path in `keep` (resident)
    /// are not evicted. Returns the adapter paths removed from disk.
    pub(crate) fn evict(&self, keep: &HashSet<PathBuf>) -> Vec<PathBuf> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut entries = self.entries();
        let mut blobs: Vec<(String, u64)> = entries.iter().map(|(_, e, _)| (e.sha256.clone(), e.bytes)).collect();
        blobs.sort();
        blobs.dedup_by(|a, b| a.0 == b.0);
        let mut total: u64 = blobs.iter().map(|b| b.1).sum();
        entries.sort_by_key(|(_, _, used)| *used);
        let mut removed = Vec::new();
        let mut gone = vec![false; entries.len()];
        for (i, (file, e, _)) in entries.iter().enumerate() {
            if total <= self.max_bytes {
                break;
            }
            let blob = self.blob_dir(&e.sha256);
            let path = adapter_path(&blob);
            if keep.contains(&path) {
                continue;
            }
            let _ = fs::remove_file(file);
            gone[i] = true;
            let still_used = entries.iter().zip(&gone).any(|((_, o, _), g)| !g && o.sha256 == e.sha256);
            if !still_used && fs::remove_dir_all(&blob).is_ok() {
                tracing::info!(source = %e.source, bytes = e.bytes, "adapter cache: evicted (least recently used, over --lora-cache-bytes)");
                total = total.saturating_sub(e.bytes);
                removed.push(path);
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staged(cache: &LoraCache, data: &[u8]) -> Staging {
        let s = cache.staging().unwrap();
        fs::write(s.dir.join("adapter_config.json"), b"{}").unwrap();
        fs::write(s.dir.join("adapter_model.safetensors"), data).unwrap();
        s
    }

    #[test]
    fn commit_lookup_verify_evict() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = LoraCache::open(tmp.path().join("c"), 250).unwrap();
        assert_eq!(cache.lookup("s3://b/a"), None);
        let a = cache.commit(staged(&cache, &[1; 100]), "s3://b/a").unwrap();
        assert_eq!(cache.lookup("s3://b/a"), Some(a.clone()));
        // A second source with the same content shares the blob.
        assert_eq!(cache.commit(staged(&cache, &[1; 100]), "s3://b/a2").unwrap(), a);
        // A half-written fetch of a dead process is gone after a reopen; entries stay.
        fs::create_dir_all(tmp.path().join("c/tmp/999999999-0")).unwrap();
        let cache = LoraCache::open(tmp.path().join("c"), 250).unwrap();
        assert_eq!(fs::read_dir(tmp.path().join("c/tmp")).unwrap().count(), 0);
        assert_eq!(cache.lookup("s3://b/a"), Some(a.clone()));
        // Damaged on disk: dropped, not served.
        fs::write(a.join("adapter_model.safetensors"), [2; 100]).unwrap();
        assert_eq!(cache.lookup("s3://b/a"), None);
        assert_eq!(cache.lookup("s3://b/a2"), None);
        // Over the cap: the least recently used goes first, unless kept.
        let x = cache.commit(staged(&cache, &[3; 100]), "x").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let y = cache.commit(staged(&cache, &[4; 100]), "y").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let z = cache.commit(staged(&cache, &[5; 100]), "z").unwrap();
        assert_eq!(cache.evict(&HashSet::from([x.clone()])), vec![y.clone()]);
        assert!(cache.lookup("x").is_some() && cache.lookup("y").is_none() && cache.lookup("z").is_some());
        assert!(x.is_dir() && !y.exists() && z.is_dir());
    }
}
