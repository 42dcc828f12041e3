//! Who may call what: `--api-key KEY[:ADAPTER]` keys (a key may carry its user's default
//! adapter) for every `/v1` call, and a separate admin key for loading and unloading adapters.

use axum::http::HeaderMap;

use crate::error::ApiError;

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
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Caller {
    /// Presented the admin key.
    pub admin: bool,
    /// The key's default adapter.
    pub default_adapter: Option<String>,
}

impl Caller {
    /// Whether this caller may have its requests served by `adapter`: the router offers
    /// only these as candidates. Today every key may use every adapter; a per-key
    /// restriction (an allow-list on `ApiKey`) goes here.
    pub fn may_use(&self, _adapter: &str) -> bool {
        true
    }
}

/// The configured keys.
#[derive(Clone, Debug, Default)]
pub struct Auth {
    keys: Vec<ApiKey>,
    admin: Option<String>,
}

/// Compares without an early exit on the first differing byte.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

impl Auth {
    pub fn new(keys: Vec<ApiKey>, admin: Option<String>) -> Self {
        Self { keys, admin }
    }

    /// Whether `/v1` calls need a key.
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Checks a `/v1` call: with keys configured a valid key (or the admin key) is required.
    pub fn check(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let token = bearer(headers);
        let admin = match (token, &self.admin) {
            (Some(t), Some(a)) => ct_eq(t.as_bytes(), a.as_bytes()),
            _ => false,
        };
        if admin {
            return Ok(Caller { admin: true, default_adapter: None });
        }
        if self.keys.is_empty() {
            return Ok(Caller::default());
        }
        let Some(token) = token else {
            return Err(ApiError::unauthorized(
                "Missing API key: send it as the header `Authorization: Bearer YOUR_KEY`.",
            ));
        };
        // Check every key so timing does not tell which prefix matched.
        let mut found = None;
        for k in &self.keys {
            if ct_eq(token.as_bytes(), k.key.as_bytes()) && found.is_none() {
                found = Some(k);
            }
        }
        match found {
            Some(k) => Ok(Caller { admin: false, default_adapter: k.adapter.clone() }),
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

    #[test]
    fn keys_adapters_and_admin() {
        let auth = Auth::new(
            vec![ApiKey::parse("k1").unwrap(), ApiKey::parse("k2:pirate").unwrap()],
            Some("root".into()),
        );
        assert_eq!(auth.check(&headers("Bearer k1")).unwrap(), Caller::default());
        assert_eq!(auth.check(&headers("bearer k2")).unwrap().default_adapter.as_deref(), Some("pirate"));
        assert!(auth.check(&headers("Bearer root")).unwrap().admin);
        assert_eq!(auth.check(&headers("Bearer nope")).unwrap_err().status, 401);
        assert_eq!(auth.check(&HeaderMap::new()).unwrap_err().status, 401);
        assert_eq!(auth.check_admin(&headers("Bearer k1")).unwrap_err().status, 403);
        assert!(auth.check_admin(&headers("Bearer root")).is_ok());
        assert!(ApiKey::parse(":x").is_err());
        assert!(ApiKey::parse("k:").is_err());
    }

    #[test]
    fn open_server_still_guards_admin() {
        let auth = Auth::new(vec![], Some("root".into()));
        assert!(auth.check(&HeaderMap::new()).is_ok());
        assert_eq!(auth.check_admin(&HeaderMap::new()).unwrap_err().status, 401);
    }
}
