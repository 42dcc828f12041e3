//! Crash-safe files, shared by the upload store and the remote-adapter cache: a file is
//! written under a temporary name, fsynced, renamed into place and its directory fsynced,
//! so a crash leaves the old state or the new one, never half of it. And the content hash
//! both use to name what they keep.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use sha2::{Digest, Sha256};

/// Writes `data` to `path` and fsyncs it.
pub(crate) fn write_synced(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// Fsyncs a directory, so the renames and creations in it survive a crash.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A random name part for temporaries.
pub(crate) fn random_suffix() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Lower-case hex of a digest.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The sha256 naming a set of adapter files: the files in name order, each as its name, a
/// NUL, its length (u64 little-endian) and its bytes.
#[derive(Default)]
pub(crate) struct ContentHash(Sha256);

impl ContentHash {
    /// Adds the next file (callers add them in name order).
    pub(crate) fn file(&mut self, name: &str, data: &[u8]) {
        self.0.update(name.as_bytes());
        self.0.update([0]);
        self.0.update((data.len() as u64).to_le_bytes());
        self.0.update(data);
    }

    pub(crate) fn finish(self) -> String {
        hex(&self.0.finalize())
    }
}
