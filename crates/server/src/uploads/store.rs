//! [`AdapterStore`]: uploaded adapters on disk, durable and content-addressed.
//!
//! ```text
//! <store>/blobs/<sha256>/            one per distinct content: adapter_config.json +
//!                                    adapter_model.safetensors, or adapter.gguf; and
//!                                    routing.json (adapter.routing.json) when uploaded
//! <store>/tenants/<tenant>/<name>.json   the index: name -> sha256, bytes, rank, created
//! <store>/tmp/<random>/              an upload being written (removed at startup)
//! ```
//!
//! Every file is written to a temporary name, fsynced, renamed into place and its directory
//! fsynced: a blob directory appears whole or not at all, and so does an index entry, which
//! is written only after its blob. A crash at any point leaves either the whole adapter (an
//! entry whose blob exists) or none (an unreferenced blob or a temporary, removed by
//! [`AdapterStore::open`]). The sha256 is over the files in name order, each as its name, a
//! NUL, its length (u64 little-endian) and its bytes.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::durable::{self, ContentHash};

use super::multipart::AdapterFiles;

/// Why the store could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("adapter store {}: {source}", .path.display())]
pub struct StoreError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError { path: path.to_path_buf(), source }
}

/// How the adapter was uploaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Peft,
    Gguf,
}

/// One index entry: a tenant's adapter name and the blob it points to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredAdapter {
    pub tenant: String,
    pub name: String,
    pub sha256: String,
    pub format: Format,
    /// Bytes of the uploaded files (what counts against `max_upload_bytes`).
    pub bytes: u64,
    pub rank: usize,
    /// Unix seconds of the upload.
    pub created: u64,
}

impl StoredAdapter {
    /// What requests name it by: `<tenant>/<name>`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.tenant, self.name)
    }
}

/// An upload written under `tmp/`, not yet in place; removed when dropped unplaced.
pub struct Staged {
    dir: PathBuf,
    pub sha256: String,
    pub format: Format,
    pub bytes: u64,
}

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The store: its root and the index, kept in memory and on disk.
pub struct AdapterStore {
    root: PathBuf,
    index: Mutex<BTreeMap<(String, String), StoredAdapter>>,
    /// Held by an upload or a delete from its quota check to its last write, so that changes
    /// to the store (and to what the engine serves under its names) happen one at a time.
    pub commit: tokio::sync::Mutex<()>,
}

/// Writes `data` to `path` and fsyncs it.
fn write_synced(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    durable::write_synced(path, data).map_err(io_err(path))
}

/// Fsyncs a directory, so the renames and creations in it survive a crash.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    durable::sync_dir(dir).map_err(io_err(dir))
}

/// The files of an upload as they are stored, in name order.
fn blob_files<'a>(files: &'a AdapterFiles, routing: Option<&'a [u8]>) -> (Format, Vec<(&'static str, &'a [u8])>) {
    let (format, mut out, routing_name) = match files {
        AdapterFiles::Peft { config, weights } => {
            (Format::Peft, vec![("adapter_config.json", &config[..]), ("adapter_model.safetensors", &weights[..])], "routing.json")
        }
        AdapterFiles::Gguf { file, .. } => (Format::Gguf, vec![("adapter.gguf", &file[..])], "adapter.routing.json"),
    };
    if let Some(r) = routing {
        out.push((routing_name, r));
    }
    out.sort_by_key(|(n, _)| *n);
    (format, out)
}

impl AdapterStore {
    /// Opens the store at `root` (created on the first upload): reads the index, drops
    /// entries whose blob is missing, and removes what a crash can leave (temporaries,
    /// unreferenced blobs).
    pub fn open(root: PathBuf) -> Result<Self, StoreError> {
        let store = Self { root, index: Mutex::default(), commit: tokio::sync::Mutex::new(()) };
        let _ = fs::remove_dir_all(store.root.join("tmp"));
        let mut index = BTreeMap::new();
        for entry in store.read_index()? {
            if store.blob_dir(&entry.sha256).is_dir() {
                index.insert((entry.tenant.clone(), entry.name.clone()), entry);
            } else {
                tracing::warn!(adapter = %entry.id(), sha256 = %entry.sha256, "uploaded adapter skipped: its blob is missing");
            }
        }
        *store.index.lock().unwrap_or_else(|e| e.into_inner()) = index;
        store.remove_unreferenced_blobs()?;
        Ok(store)
    }

    /// Every index entry on disk; temporaries, unreadable files and entries that do not match
    /// their place (tenant folder, file name, a 64-hex sha256) are removed.
    fn read_index(&self) -> Result<Vec<StoredAdapter>, StoreError> {
        let tenants = self.root.join("tenants");
        let mut out = Vec::new();
        let Ok(dirs) = fs::read_dir(&tenants) else { return Ok(out) };
        for dir in dirs.flatten().filter(|d| d.path().is_dir()) {
            for file in fs::read_dir(dir.path()).map_err(io_err(&dir.path()))?.flatten() {
                let path = file.path();
                let fname = file.file_name().to_string_lossy().into_owned();
                let parsed = fs::read(&path).ok().and_then(|b| serde_json::from_slice::<StoredAdapter>(&b).ok());
                let in_place = |e: &StoredAdapter| {
                    let hex = e.sha256.len() == 64 && e.sha256.bytes().all(|b| b.is_ascii_hexdigit());
                    hex && dir.file_name() == e.tenant.as_str() && fname == format!("{}.json", e.name) && super::check_upload_name(&e.name).is_ok()
                };
                match parsed {
                    Some(e) if in_place(&e) => out.push(e),
                    _ => {
                        tracing::warn!(file = %path.display(), "adapter store: removing a temporary or unreadable index file");
                        let _ = fs::remove_file(&path);
                    }
                }
            }
        }
        Ok(out)
    }

    fn remove_unreferenced_blobs(&self) -> Result<(), StoreError> {
        let Ok(blobs) = fs::read_dir(self.root.join("blobs")) else { return Ok(()) };
        for b in blobs.flatten() {
            let sha = b.file_name().to_string_lossy().into_owned();
            if !self.referenced(&sha) {
                fs::remove_dir_all(b.path()).map_err(io_err(&b.path()))?;
            }
        }
        Ok(())
    }

    fn blob_dir(&self, sha256: &str) -> PathBuf {
        self.root.join("blobs").join(sha256)
    }

    /// What the engine reads: the blob directory (PEFT) or its `adapter.gguf`.
    pub fn adapter_path(&self, sha256: &str, format: Format) -> PathBuf {
        match format {
            Format::Peft => self.blob_dir(sha256),
            Format::Gguf => self.blob_dir(sha256).join("adapter.gguf"),
        }
    }

    /// Every entry, by tenant then name.
    pub fn entries(&self) -> Vec<StoredAdapter> {
        self.index.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    /// A tenant's entries, by name.
    pub fn tenant_entries(&self, tenant: &str) -> Vec<StoredAdapter> {
        self.entries().into_iter().filter(|e| e.tenant == tenant).collect()
    }

    pub fn get(&self, tenant: &str, name: &str) -> Option<StoredAdapter> {
        self.index.lock().unwrap_or_else(|e| e.into_inner()).get(&(tenant.to_string(), name.to_string())).cloned()
    }

    fn referenced(&self, sha256: &str) -> bool {
        self.index.lock().unwrap_or_else(|e| e.into_inner()).values().any(|e| e.sha256 == sha256)
    }

    /// Writes an upload's files under `tmp/`, fsynced, and hashes them.
    pub fn stage(&self, files: &AdapterFiles, routing: Option<&[u8]>) -> Result<Staged, StoreError> {
        let (format, files) = blob_files(files, routing);
        let tmp = self.root.join("tmp");
        fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        let dir = tmp.join(durable::random_suffix());
        fs::create_dir(&dir).map_err(io_err(&dir))?;
        let mut staged = Staged { dir, sha256: String::new(), format, bytes: 0 };
        let mut hash = ContentHash::default();
        for (name, data) in files {
            write_synced(&staged.dir.join(name), data)?;
            hash.file(name, data);
            staged.bytes += data.len() as u64;
        }
        sync_dir(&staged.dir)?;
        staged.sha256 = hash.finish();
        Ok(staged)
    }

    /// Moves a staged upload to its blob (kept as it is when the content is already there);
    /// returns the path the engine reads.
    pub fn place(&self, staged: Staged) -> Result<PathBuf, StoreError> {
        let blobs = self.root.join("blobs");
        fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
        let blob = self.blob_dir(&staged.sha256);
        if !blob.is_dir() {
            fs::rename(&staged.dir, &blob).map_err(io_err(&blob))?;
            sync_dir(&blobs)?;
        }
        Ok(self.adapter_path(&staged.sha256, staged.format))
    }

    /// Writes an index entry (replacing one of the same name) atomically and durably.
    pub fn put(&self, entry: StoredAdapter) -> Result<(), StoreError> {
        let dir = self.root.join("tenants").join(&entry.tenant);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        sync_dir(&self.root.join("tenants"))?;
        let tmp = dir.join(format!(".{}.json.{}", entry.name, durable::random_suffix()));
        let json = serde_json::to_vec_pretty(&entry).unwrap_or_default();
        write_synced(&tmp, &json)?;
        let path = dir.join(format!("{}.json", entry.name));
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        sync_dir(&dir)?;
        self.index.lock().unwrap_or_else(|e| e.into_inner()).insert((entry.tenant.clone(), entry.name.clone()), entry);
        Ok(())
    }

    /// Removes an index entry durably; returns it.
    pub fn remove(&self, tenant: &str, name: &str) -> Result<Option<StoredAdapter>, StoreError> {
        let dir = self.root.join("tenants").join(tenant);
        let path = dir.join(format!("{name}.json"));
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(&dir)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
        Ok(self.index.lock().unwrap_or_else(|e| e.into_inner()).remove(&(tenant.to_string(), name.to_string())))
    }

    /// Deletes a blob once no entry points to it.
    pub fn collect(&self, sha256: &str) {
        if !self.referenced(sha256) {
            if let Err(e) = fs::remove_dir_all(self.blob_dir(sha256)) {
                tracing::warn!(sha256, "adapter store: an unreferenced blob could not be removed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Bytes;

    fn gguf(data: &'static [u8]) -> AdapterFiles {
        AdapterFiles::Gguf { file: Bytes::from_static(data), filename: None }
    }

    fn entry(tenant: &str, name: &str, sha256: &str) -> StoredAdapter {
        StoredAdapter { tenant: tenant.into(), name: name.into(), sha256: sha256.into(), format: Format::Gguf, bytes: 4, rank: 1, created: 0 }
    }

    #[test]
    fn content_addressed_and_reopened() {
        let tmp = tempfile::tempdir().unwrap();
        let store = AdapterStore::open(tmp.path().join("s")).unwrap();
        let a = store.stage(&gguf(b"AAAA"), None).unwrap();
        let b = store.stage(&gguf(b"AAAA"), None).unwrap();
        assert_eq!(a.sha256, b.sha256);
        let with_routing = store.stage(&gguf(b"AAAA"), Some(b"{}")).unwrap();
        assert_ne!(a.sha256, with_routing.sha256);
        let sha = a.sha256.clone();
        let path = store.place(a).unwrap();
        assert_eq!(store.place(b).unwrap(), path);
        assert_eq!(fs::read(&path).unwrap(), b"AAAA");
        drop(with_routing);
        store.put(entry("t", "x", &sha)).unwrap();
        store.put(entry("t", "y", &sha)).unwrap();
        // What a crash leaves: a temporary upload, a half-written index file, an orphan blob.
        let orphan = store.stage(&gguf(b"BBBB"), None).unwrap();
        let orphan_sha = orphan.sha256.clone();
        store.place(orphan).unwrap();
        store.stage(&gguf(b"CCCC"), None).map(std::mem::forget).unwrap();
        fs::write(tmp.path().join("s/tenants/t/.z.json.123"), b"{").unwrap();
        let store = AdapterStore::open(tmp.path().join("s")).unwrap();
        assert_eq!(store.entries().iter().map(StoredAdapter::id).collect::<Vec<_>>(), ["t/x", "t/y"]);
        assert!(!store.blob_dir(&orphan_sha).exists() && !tmp.path().join("s/tmp").exists());
        assert!(!tmp.path().join("s/tenants/t/.z.json.123").exists());
        store.remove("t", "x").unwrap();
        store.collect(&sha);
        assert!(path.exists(), "still referenced by t/y");
        store.remove("t", "y").unwrap();
        store.collect(&sha);
        assert!(!path.exists() && store.entries().is_empty());
    }
}
