//! Who may call what: a key of a tenant (`--tenants FILE`, or the `--api-key KEY[:ADAPTER]`
//! shorthand: a one-key tenant that may use every adapter) for every `/v1` call, and a separate
//! admin key for loading and unloading adapters. A tenant's key may use only its adapters:
//! those its globs name and its own upload namespace `<tenant>/*`, never another tenant's uploads.

use std::sync::Arc;

use axum::http::HeaderMap;

use crate::error::ApiError;
use crate::tenants::{ct_eq, Tenant, TenantStore};
use crate::uploads::UploadedNames;

/// One accepted API key.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub key: String,
    /// Adapter used when the request names the base model or no model.
    pub adapter: Option<String>,
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("ApiKey").field("key", &"***").field("adapter", &self.adapter).finish()
    }
}

impl ApiKey {
    /// Parses `KEY` or `KEY:ADAPTER` (keys therefore cannot contain ':').
    pub fn parse(s: &str) -> Result<Self, String> {
        let (key, adapter) = match s.split_once(':') {
            Some((k, a)) => (k, Some(a)),
            None => (s, None),
        };
        if key.is_empty() {
            return Err(format!("--api-key '{}': the key is empty", s.split(':').next().unwrap_or("")));
        }
        if key.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("--api-key: keys cannot contain whitespace".into());
        }
        if adapter.is_some_and(str::is_empty) {
            return Err("--api-key KEY:ADAPTER: the adapter name is empty".into());
        }
        Ok(Self { key: key.to_string(), adapter: adapter.map(str::to_string) })
    }
}

/// What an authenticated caller may do.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Caller {
    /// Presented the admin key.
    pub admin: bool,
    /// The key's default adapter.
    pub default_adapter: Option<String>,
    /// The tenant the key belongs to; `None` for the admin key and on an open server.
    pub tenant: Option<Arc<Tenant>>,
    /// Uploaded adapters: each is its tenant's alone, whatever other tenants' globs say.
    pub uploaded: UploadedNames,
}

/// The tenant metrics label of requests made with the admin key.
pub const ADMIN_LABEL: &str = "(admin)";
/// The tenant metrics label of requests on a server without keys.
pub const OPEN_LABEL: &str = "(none)";

impl Caller {
    /// Whether this caller may have its requests served by `adapter`: a tenant's key only by
    /// the tenant's adapters (its globs, and its upload namespace `<tenant>/*`, but never
    /// another tenant's upload), the admin key and an open server by every one. The router
    /// offers only these as candidates. The base model is not an adapter: every caller may use it.
    pub fn may_use(&self, adapter: &str) -> bool {
        let Some(t) = &self.tenant else { return true };
        if adapter.split_once('/').is_some_and(|(ns, _)| ns == t.name) {
            return true;
        }
        !self.uploaded.contains(adapter) && t.may_use(adapter)
    }

    /// The tenant metrics label: the tenant's name, [`ADMIN_LABEL`] or [`OPEN_LABEL`]
    /// (neither a possible tenant name, so the label set stays the configured names plus two).
    pub fn label(&self) -> &str {
        match (&self.tenant, self.admin) {
            (Some(t), _) => &t.name,
            (None, true) => ADMIN_LABEL,
            (None, false) => OPEN_LABEL,
        }
    }
}

/// The tenants' keys and the admin key.
pub struct Auth {
    tenants: Arc<TenantStore>,
    admin: Option<String>,
    uploaded: UploadedNames,
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

impl Auth {
    pub fn new(tenants: Arc<TenantStore>, admin: Option<String>) -> Self {
        Self { tenants, admin, uploaded: UploadedNames::default() }
    }

    /// The uploaded adapters' names, which every [`Caller`] checks (the upload store adds to them).
    pub fn uploaded(&self) -> &UploadedNames {
        &self.uploaded
    }

    /// The tenants in force (admission counts requests against their limits).
    pub fn tenants(&self) -> &TenantStore {
        &self.tenants
    }

    /// Whether `/v1` calls need a key.
    pub fn enabled(&self) -> bool {
        self.tenants.required()
    }

    /// Checks a `/v1` call: with keys configured a tenant's key (or the admin key) is required.
    pub fn check(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let token = bearer(headers);
        let admin = match (token, &self.admin) {
            (Some(t), Some(a)) => ct_eq(t.as_bytes(), a.as_bytes()),
            _ => false,
        };
        if admin {
            return Ok(Caller { admin: true, default_adapter: None, tenant: None, uploaded: self.uploaded.clone() });
        }
        if !self.tenants.required() {
            return Ok(Caller { uploaded: self.uploaded.clone(), ..Caller::default() });
        }
        let Some(token) = token else {
            return Err(ApiError::unauthorized(
                "Missing API key: send it as the header `Authorization: Bearer YOUR_KEY`.",
            ));
        };
        match self.tenants.current().find(token) {
            Some(t) => Ok(Caller { admin: false, default_adapter: t.default_adapter.clone(), tenant: Some(t), uploaded: self.uploaded.clone() }),
            None => Err(ApiError::unauthorized("Incorrect API key provided.")),
        }
    }

    /// Checks an admin call (adapter load/unload).
    pub fn check_admin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let caller = self.check(headers)?;
        if caller.admin {
            return Ok(());
        }
        if bearer(headers).is_none() {
            return Err(ApiError::unauthorized("This endpoint needs the admin API key (`Authorization: Bearer ADMIN_KEY`)."));
        }
        Err(ApiError::forbidden("This endpoint needs the admin API key; the key given is not it."))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("authorization", v.parse().unwrap());
        h
    }

    fn auth(keys: &[&str], admin: Option<&str>) -> Auth {
        let keys: Vec<ApiKey> = keys.iter().map(|k| ApiKey::parse(k).unwrap()).collect();
        Auth::new(Arc::new(TenantStore::new(&keys, None).unwrap()), admin.map(str::to_string))
    }

    #[test]
    fn keys_adapters_and_admin() {
        let auth = auth(&["k1", "k2:pirate"], Some("root"));
        let k1 = auth.check(&headers("Bearer k1")).unwrap();
        assert_eq!((k1.admin, k1.default_adapter.as_deref(), k1.label()), (false, None, "key-1"));
        assert!(k1.may_use("anything"));
        assert_eq!(auth.check(&headers("bearer k2")).unwrap().default_adapter.as_deref(), Some("pirate"));
        assert!(auth.check(&headers("Bearer root")).unwrap().admin);
        assert_eq!(auth.check(&headers("Bearer nope")).unwrap_err().status, 401);
        assert_eq!(auth.check(&HeaderMap::new()).unwrap_err().status, 401);
        assert_eq!(auth.check_admin(&headers("Bearer k1")).unwrap_err().status, 403);
        assert!(auth.check_admin(&headers("Bearer root")).is_ok());
        assert!(ApiKey::parse(":x").is_err());
        // An upload is its tenant's alone, even for a key whose glob is `*`.
        auth.uploaded().insert("key-2/x".into());
        assert!(!k1.may_use("key-2/x") && k1.may_use("key-1/anything") && k1.may_use("key-2/y"));
        assert!(auth.check(&headers("Bearer k2")).unwrap().may_use("key-2/x"));
        assert!(auth.check(&headers("Bearer root")).unwrap().may_use("key-2/x"));
        assert!(ApiKey::parse("k:").is_err());
    }

    #[test]
    fn open_server_still_guards_admin() {
        let auth = auth(&[], Some("root"));
        assert_eq!(auth.check(&HeaderMap::new()).unwrap().label(), OPEN_LABEL);
        assert_eq!(auth.check(&headers("Bearer root")).unwrap().label(), ADMIN_LABEL);
        assert_eq!(auth.check_admin(&HeaderMap::new()).unwrap_err().status, 401);
    }
}
