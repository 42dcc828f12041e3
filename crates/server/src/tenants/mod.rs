//! Tenants (issue #21): who holds which API keys, which adapters they may use, and their
//! limits. A [`Tenant`] is what an authenticated request runs as; the fair-share scheduler and
//! adapter uploads hang their settings (`weight`, `max_uploads`) off it.
//!
//! - this file: [`Tenant`], [`Tenants`] (the set, with constant-time key lookup), [`Glob`];
//! - `file.rs`: the `--tenants` TOML file, [`parse_tenants`];
//! - `limits.rs`: per-tenant sliding windows (requests and tokens per minute) and in-flight counts;
//! - `store.rs`: [`TenantStore`], the live set swapped on reload, with the counters that outlive it;
//! - `reload.rs`: the task that re-reads the file on SIGHUP and when it changes.

mod file;
mod limits;
mod reload;
mod store;

use sha2::{Digest, Sha256};

pub use file::{parse_tenants, TenantsError};
pub use limits::{Admission, RequestTenant};
pub use reload::spawn_reloader;
pub use store::{Cost, TenantStore};

/// A tenant's request limits; `None`: no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TenantLimits {
    /// Requests in flight at once (streams count until their last byte or the client leaves).
    pub max_concurrency: Option<u32>,
    /// Requests admitted in any 60-second window.
    pub requests_per_minute: Option<u32>,
    /// Prompt plus `max_tokens` tokens admitted in any 60-second window (unused completion
    /// tokens are given back when the request ends).
    pub tokens_per_minute: Option<u64>,
}

/// One tenant: its keys (as sha256 digests), the adapters it may use, its limits.
#[derive(Clone, PartialEq)]
pub struct Tenant {
    /// Unique, `[A-Za-z0-9_.-]{1,64}`: the metrics label and the key for its counters.
    pub name: String,
    adapters: Vec<Glob>,
    /// Adapter used when a request names the base model or no model.
    pub default_adapter: Option<String>,
    /// Fair share: the scheduler's weight for this tenant (`loramux_engine::scheduler::fair`).
    pub weight: f64,
    pub limits: TenantLimits,
    /// How many adapters the tenant may have uploaded at once (past it: 429).
    pub max_uploads: Option<u32>,
    /// Highest rank of an uploaded adapter (also bounded by `--max-lora-rank`).
    pub max_upload_rank: Option<u32>,
    /// Bytes the tenant's uploaded adapters may take in all (past it: 413).
    pub max_upload_bytes: Option<u64>,
    keys: Vec<[u8; 32]>,
    /// How many keys were written in plain text (warned about at load).
    plain_keys: usize,
}

impl std::fmt::Debug for Tenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key digests.
        f.debug_struct("Tenant")
            .field("name", &self.name)
            .field("adapters", &self.adapters.iter().map(|g| g.0.as_str()).collect::<Vec<_>>())
            .field("default_adapter", &self.default_adapter)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Tenant {
    /// A tenant of one key that may use every adapter: what `--api-key KEY[:ADAPTER]` means.
    pub fn shorthand(name: String, key: &str, default_adapter: Option<String>) -> Self {
        Self {
            name,
            adapters: vec![Glob::new("*")],
            default_adapter,
            weight: 1.0,
            limits: TenantLimits::default(),
            max_uploads: None,
            max_upload_rank: None,
            max_upload_bytes: None,
            keys: vec![key_digest(key)],
            plain_keys: 0,
        }
    }

    /// Whether the tenant may have requests served by `adapter` (a name, matched against the
    /// tenant's names and globs).
    pub fn may_use(&self, adapter: &str) -> bool {
        self.adapters.iter().any(|g| g.matches(adapter))
    }
}

/// The sha256 digest a key is stored and compared as.
pub fn key_digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// An adapter pattern: `*` matches any run of characters (`/` included), `?` one character.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    pub fn new(pattern: &str) -> Self {
        Self(pattern.to_string())
    }

    /// Whether `name` matches, in O(pattern × name) at worst (no backtracking blow-up).
    pub fn matches(&self, name: &str) -> bool {
        let p: Vec<char> = self.0.chars().collect();
        let s: Vec<char> = name.chars().collect();
        let (mut pi, mut si) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while si < s.len() {
            if pi < p.len() && (p[pi] == '?' || p[pi] == s[si]) {
                pi += 1;
                si += 1;
            } else if pi < p.len() && p[pi] == '*' {
                star = Some((pi, si));
                pi += 1;
            } else if let Some((sp, ss)) = star {
                pi = sp + 1;
                si = ss + 1;
                star = Some((sp, ss + 1));
            } else {
                return false;
            }
        }
        p[pi..].iter().all(|&c| c == '*')
    }
}

/// Compares without an early exit on the first differing byte.
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A set of tenants, as one load of the file (plus the `--api-key` shorthands) made it.
#[derive(Clone, Debug, Default)]
pub struct Tenants {
    list: Vec<std::sync::Arc<Tenant>>,
}

impl Tenants {
    pub fn new(list: Vec<Tenant>) -> Self {
        Self { list: list.into_iter().map(std::sync::Arc::new).collect() }
    }

    /// The tenant holding `key`: its digest is compared with every stored digest, in constant
    /// time each and without stopping at a match, so timing does not tell which one matched.
    pub fn find(&self, key: &str) -> Option<std::sync::Arc<Tenant>> {
        let digest = key_digest(key);
        let mut found = None;
        for t in &self.list {
            for d in &t.keys {
                if ct_eq(&digest, d) && found.is_none() {
                    found = Some(t.clone());
                }
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The tenant named `name`.
    pub fn get(&self, name: &str) -> Option<std::sync::Arc<Tenant>> {
        self.list.iter().find(|t| t.name == name).cloned()
    }

    /// The tenants' names, in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.list.iter().map(|t| t.name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let m = |p: &str, s: &str| Glob::new(p).matches(s);
        assert!(m("*", "") && m("*", "a/b") && m("a*", "a") && m("a*c", "abbbc") && m("a?c", "abc"));
        assert!(m("*a*b*", "xxaxxbxx") && m("acme/*", "acme/sql") && m("é?", "éx"));
        assert!(!m("a?c", "ac") && !m("a*c", "abcd") && !m("", "a") && !m("abc", "ab") && !m("a", "A"));
        // Pathological patterns stay polynomial.
        assert!(!m(&"*a".repeat(50), &"a".repeat(49)));
    }

    #[test]
    fn lookup_by_digest() {
        let t = Tenants::new(vec![Tenant::shorthand("k1".into(), "one", None), Tenant::shorthand("k2".into(), "two", Some("b".into()))]);
        assert_eq!(t.find("two").unwrap().name, "k2");
        assert!(t.find("three").is_none() && t.find("").is_none());
        assert!(!format!("{:?}", t).contains(&format!("{:?}", key_digest("one"))));
    }
}
