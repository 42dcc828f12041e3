//! Adapter uploads (issue #21, the per-user part): a tenant sends an adapter's files over
//! HTTP (`POST /v1/adapters`) and it is served as `<tenant>/<name>` to that tenant alone.
//!
//! - `multipart.rs`: [`parse_upload`], the `multipart/form-data` body into an [`UploadForm`];
//! - `store.rs`: [`AdapterStore`], the durable content-addressed store the uploads live in;
//! - this file: [`UploadedNames`] (which adapter names are uploads, so that no other
//!   tenant's glob reaches them) and [`check_upload_name`].
//!
//! The endpoints are in `routes/adapters.rs`.

mod multipart;
mod store;

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

pub use multipart::{parse_upload, AdapterFiles, FormError, UploadForm};
pub use store::{AdapterStore, Format, Staged, StoreError, StoredAdapter};

/// The served names (`<tenant>/<name>`) of every uploaded adapter, shared by the auth check
/// and the upload endpoints: an upload is usable by its tenant only, whatever other
/// tenants' globs say. A name is added before the adapter is served and removed after it
/// stops being served.
#[derive(Clone, Default)]
pub struct UploadedNames(Arc<RwLock<HashSet<String>>>);

impl UploadedNames {
    pub fn contains(&self, id: &str) -> bool {
        self.0.read().unwrap_or_else(|e| e.into_inner()).contains(id)
    }

    pub fn insert(&self, id: String) {
        self.0.write().unwrap_or_else(|e| e.into_inner()).insert(id);
    }

    pub fn remove(&self, id: &str) {
        self.0.write().unwrap_or_else(|e| e.into_inner()).remove(id);
    }
}

impl PartialEq for UploadedNames {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::fmt::Debug for UploadedNames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UploadedNames({})", self.0.read().map(|s| s.len()).unwrap_or(0))
    }
}

/// Longest uploaded adapter name.
const MAX_NAME: usize = 64;

/// Checks an upload's name: 1 to 64 of `[A-Za-z0-9_.-]`, not starting with `.` (the store
/// keeps its temporaries under such names), so it is one safe file name.
pub fn check_upload_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    if name.is_empty() || name.len() > MAX_NAME || !name.chars().all(ok_char) || name.starts_with('.') {
        return Err(format!("'{}' is not an adapter name: 1 to {MAX_NAME} of A-Z a-z 0-9 _ . - (not starting with '.')", name.escape_debug()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "sql-v2", "x.y_z", &"a".repeat(64)] {
            assert!(check_upload_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", "é", &"a".repeat(65), "../x"] {
            assert!(check_upload_name(bad).is_err(), "{bad}");
        }
    }
}
