//! [`TenantStore`]: the live tenant set behind a lock that is only held to clone an `Arc`
//! out (never across an await), swapped whole on reload, and the per-tenant counters, kept by
//! name so that a reload does not reset a tenant's limits. Requests already admitted keep the
//! `Arc<Tenant>` they were authenticated with: a reload never drops them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::limits::{Refusal, Usage};
use super::{parse_tenants, Admission, RequestTenant, Tenant, Tenants, TenantsError};
use crate::auth::{ApiKey, Caller};
use crate::error::ApiError;
use crate::metrics::Metrics;

/// The tenants in force and their counters.
pub struct TenantStore {
    current: RwLock<Arc<Tenants>>,
    usage: Mutex<HashMap<String, Arc<Usage>>>,
    /// `--tenants`, re-read on reload.
    file: Option<PathBuf>,
    /// One tenant per `--api-key`, merged into every load of the file.
    shorthand: Vec<Tenant>,
}

/// What a request will cost against `tokens_per_minute`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    /// Prompt tokens (once per prompt, whatever `n`).
    pub prompt: u64,
    /// `max_tokens` summed over the choices: reserved, and refunded where not generated.
    pub completion: u64,
}

impl TenantStore {
    /// The `--api-key` shorthands (tenants `key-1`, `key-2`, ... that may use every adapter)
    /// and the tenants file, read now: a broken file refuses startup.
    pub fn new(api_keys: &[ApiKey], file: Option<PathBuf>) -> Result<Self, TenantsError> {
        let shorthand = api_keys
            .iter()
            .enumerate()
            .map(|(i, k)| Tenant::shorthand(format!("key-{}", i + 1), &k.key, k.adapter.clone()))
            .collect();
        let store = Self { current: RwLock::new(Arc::default()), usage: Mutex::default(), file, shorthand };
        let tenants = store.load()?;
        *store.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(tenants);
        Ok(store)
    }

    /// The tenants file, if there is one.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// Whether `/v1` calls need a key: with a tenants file they always do, even while it
    /// lists no tenant (an emptied file must not open the server).
    pub fn required(&self) -> bool {
        self.file.is_some() || !self.shorthand.is_empty()
    }

    /// The set in force now.
    pub fn current(&self) -> Arc<Tenants> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Re-reads the file; a good one replaces the set at once, a broken one changes nothing.
    /// Returns the new set's size.
    pub fn reload(&self) -> Result<usize, TenantsError> {
        let tenants = Arc::new(self.load()?);
        let n = tenants.len();
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = tenants.clone();
        let mut usage = self.usage.lock().unwrap_or_else(|e| e.into_inner());
        usage.retain(|name, _| tenants.names().any(|n| n == name));
        Ok(n)
    }

    /// The file's tenants (plain keys warned about) and the shorthands, checked together.
    fn load(&self) -> Result<Tenants, TenantsError> {
        let mut list = match &self.file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| TenantsError { file: None, tenant: None, field: None, message: e.to_string() }.in_file(path))?;
                parse_tenants(&text).map_err(|e| e.in_file(path))?
            }
            None => Vec::new(),
        };
        for t in list.iter().filter(|t| t.plain_keys > 0) {
            tracing::warn!(
                tenant = %t.name,
                keys = t.plain_keys,
                "plain-text API keys in the tenants file: store them as sha256:<hex> (printf %s KEY | sha256sum)"
            );
        }
        for s in &self.shorthand {
            let clash = |field: &str, message: String| TenantsError {
                file: None,
                tenant: Some(s.name.clone()),
                field: Some(field.to_string()),
                message,
            };
            if list.iter().any(|t| t.name == s.name) {
                return Err(clash("name", "the name of an --api-key shorthand tenant is taken by the file".into()));
            }
            if let Some(t) = list.iter().find(|t| t.keys.iter().any(|k| s.keys.contains(k))) {
                return Err(clash("api_keys", format!("an --api-key is also a key of tenant '{}'", t.name)));
            }
        }
        list.extend(self.shorthand.iter().cloned());
        Ok(Tenants::new(list))
    }

    fn usage(&self, name: &str) -> Arc<Usage> {
        let mut usage = self.usage.lock().unwrap_or_else(|e| e.into_inner());
        usage.entry(name.to_string()).or_default().clone()
    }

    /// Admits a request of `caller` costing `cost` under its tenant's limits, counting it in
    /// the tenant metrics; past a limit, a 429 with `Retry-After` (for that tenant only).
    pub fn admit(&self, caller: &Caller, cost: Cost, metrics: &Metrics) -> Result<Admission, ApiError> {
        let label = caller.label();
        let request_tenant = Arc::new(RequestTenant::new(label.to_string()));
        let in_flight = metrics.tenant_in_flight.with_label_values(&[label]);
        let Some(tenant) = &caller.tenant else {
            metrics.tenant_requests.with_label_values(&[label]).inc();
            return Ok(Admission::unlimited(request_tenant, in_flight));
        };
        let usage = self.usage(&tenant.name);
        match usage.admit(&tenant.limits, cost.prompt.saturating_add(cost.completion), Instant::now()) {
            Ok(id) => {
                metrics.tenant_requests.with_label_values(&[label]).inc();
                Ok(Admission::limited(request_tenant, in_flight, usage, id, cost.completion))
            }
            Err(refusal) => {
                let (reason, error) = refusal_error(tenant, refusal, cost);
                metrics.tenant_refusals.with_label_values(&[label, reason]).inc();
                Err(error)
            }
        }
    }
}

/// The metrics reason and the client's 429 for a refusal.
fn refusal_error(tenant: &Tenant, refusal: Refusal, cost: Cost) -> (&'static str, ApiError) {
    let l = &tenant.limits;
    match refusal {
        Refusal::Concurrency => (
            "concurrency",
            ApiError::tenant_limit(
                format!("Concurrency limit reached: at most {} requests in flight for this key.", l.max_concurrency.unwrap_or(0)),
                "concurrency_limit_exceeded",
                Duration::from_secs(1),
            ),
        ),
        Refusal::Requests { retry_after } => (
            "rate_limit",
            ApiError::tenant_limit(
                format!("Rate limit reached: {} requests per minute for this key.", l.requests_per_minute.unwrap_or(0)),
                "rate_limit_exceeded",
                retry_after,
            ),
        ),
        Refusal::Tokens { retry_after } => (
            "token_limit",
            ApiError::tenant_limit(
                format!("Token limit reached: {} tokens per minute for this key (prompt plus max_tokens).", l.tokens_per_minute.unwrap_or(0)),
                "token_limit_exceeded",
                retry_after,
            ),
        ),
        Refusal::TooLarge => (
            "token_limit",
            ApiError::tenant_limit(
                format!(
                    "This request needs {} tokens (prompt plus max_tokens), more than this key's {} tokens per minute: lower max_tokens or n.",
                    cost.prompt.saturating_add(cost.completion),
                    l.tokens_per_minute.unwrap_or(0)
                ),
                "token_limit_exceeded",
                super::limits::WINDOW,
            ),
        ),
    }
}
