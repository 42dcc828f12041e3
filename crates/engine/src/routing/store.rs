//! The disk cache of routing-example embeddings, so a restart (or a reload of the same
//! adapter) does not run the model again: one file per embedding, under
//! `<dir>/<embedder fingerprint>/<sha256 of the token ids>.f32`, raw little-endian f32.
//! Written to a temporary file and renamed, so a crash leaves a whole file or none; a file
//! of the wrong length is ignored (and rewritten).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// A directory of cached embeddings for one embedder.
#[derive(Clone, Debug)]
pub struct EmbeddingStore {
    dir: PathBuf,
}

impl EmbeddingStore {
    /// The store of embedder `fingerprint` under `root` (e.g. `<cache>/routing`).
    pub fn new(root: &Path, fingerprint: &str) -> Self {
        let safe: String = fingerprint
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '_' })
            .collect();
        Self { dir: root.join(safe) }
    }

    fn path(&self, ids: &[u32]) -> PathBuf {
        let mut h = Sha256::new();
        for id in ids {
            h.update(id.to_le_bytes());
        }
        self.dir.join(format!("{:x}.f32", h.finalize()))
    }

    /// The cached embedding of `ids`, if a whole one is there.
    pub fn get(&self, ids: &[u32]) -> Option<Vec<f32>> {
        let bytes = std::fs::read(self.path(ids)).ok()?;
        if bytes.is_empty() || bytes.len() % 4 != 0 {
            return None;
        }
        Some(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }

    /// Stores an embedding; a failure (read-only disk...) only costs a recomputation later.
    pub fn put(&self, ids: &[u32], v: &[f32]) {
        let path = self.path(ids);
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let written = std::fs::create_dir_all(&self.dir).and_then(|_| std::fs::write(&tmp, &bytes)).and_then(|_| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            std::fs::remove_file(&tmp).ok();
            tracing::debug!(path = %path.display(), error = %e, "routing embedding not cached on disk");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_torn_files_ignored() {
        let root = std::env::temp_dir().join(format!("loramux-store-{}", std::process::id()));
        let s = EmbeddingStore::new(&root, "base-x/y:1");
        assert_eq!(s.get(&[1, 2]), None);
        s.put(&[1, 2], &[0.5, -1.0]);
        assert_eq!(s.get(&[1, 2]), Some(vec![0.5, -1.0]));
        assert_eq!(s.get(&[2, 1]), None);
        std::fs::write(s.path(&[3]), [1u8, 2, 3]).unwrap();
        assert_eq!(s.get(&[3]), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
