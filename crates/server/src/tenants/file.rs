//! The tenants file (`--tenants FILE`, TOML): [`parse_tenants`] reads and checks it into
//! [`Tenant`]s. Every refusal names the tenant and the field, so an operator can fix the file
//! without guessing; the caller adds the file's name ([`TenantsError::in_file`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{key_digest, Glob, Tenant, TenantLimits};

/// Why a tenants file was refused: which file, tenant and field, and what is wrong.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct TenantsError {
    /// The file, once known (the parser works on text).
    pub file: Option<PathBuf>,
    /// The tenant's name, or `tenants[i]` before its name is known.
    pub tenant: Option<String>,
    /// The field at fault, when there is one.
    pub field: Option<String>,
    pub message: String,
}

impl TenantsError {
    fn new(tenant: Option<&str>, field: Option<&str>, message: impl Into<String>) -> Self {
        Self { file: None, tenant: tenant.map(str::to_string), field: field.map(str::to_string), message: message.into() }
    }

    /// The same error, naming `file`.
    pub fn in_file(mut self, file: &Path) -> Self {
        self.file = Some(file.to_path_buf());
        self
    }

    fn describe(&self) -> String {
        let mut s = String::from("tenants file");
        if let Some(f) = &self.file {
            s.push_str(&format!(" {}", f.display()));
        }
        if let Some(t) = &self.tenant {
            s.push_str(&format!(", tenant '{t}'"));
        }
        if let Some(f) = &self.field {
            s.push_str(&format!(", field '{f}'"));
        }
        format!("{s}: {}", self.message)
    }
}

/// One `[[tenants]]` table as written. Every field is optional here so that one field alone
/// can be read ([`field_at_fault`]); the required ones are checked after.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: Option<String>,
    api_keys: Option<Vec<String>>,
    adapters: Option<Vec<String>>,
    default_adapter: Option<String>,
    weight: Option<f64>,
    max_concurrency: Option<u32>,
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u64>,
    max_uploads: Option<u32>,
    max_upload_rank: Option<u32>,
    max_upload_bytes: Option<u64>,
}

/// Longest tenant name: names are metric labels and log fields.
const MAX_NAME: usize = 64;
/// Longest key or adapter pattern accepted, so a file cannot make matching costly.
const MAX_ITEM: usize = 1024;

/// Parses and checks a tenants file's text: names unique (1 to 64 of `[A-Za-z0-9_.-]`), no key
/// held by two tenants, `sha256:` keys 64 hex digits, `weight` finite and > 0, limits > 0,
/// `default_adapter` covered by `adapters`. Plain keys are hashed here (the caller warns).
pub fn parse_tenants(text: &str) -> Result<Vec<Tenant>, TenantsError> {
    let table: toml::Table = toml::from_str(text).map_err(|e| TenantsError::new(None, None, e.to_string()))?;
    if let Some(other) = table.keys().find(|k| *k != "tenants") {
        return Err(TenantsError::new(None, None, format!("unknown key '{other}' (the file holds [[tenants]] tables only)")));
    }
    let entries = match table.get("tenants") {
        None => return Ok(Vec::new()),
        Some(toml::Value::Array(a)) => a,
        Some(_) => return Err(TenantsError::new(None, Some("tenants"), "must be an array of tables ([[tenants]])")),
    };
    let mut tenants: Vec<Tenant> = Vec::with_capacity(entries.len());
    let mut owners: HashMap<[u8; 32], String> = HashMap::new();
    for (i, value) in entries.iter().enumerate() {
        let label = value.get("name").and_then(|n| n.as_str()).map_or_else(|| format!("tenants[{i}]"), str::to_string);
        let entry: Entry = value
            .clone()
            .try_into()
            .map_err(|e: toml::de::Error| TenantsError::new(Some(&label), field_at_fault(value).as_deref(), e.message()))?;
        let tenant = tenant(entry, &label)?;
        if tenants.iter().any(|t| t.name == tenant.name) {
            return Err(TenantsError::new(Some(&tenant.name), Some("name"), "two tenants have this name"));
        }
        for d in &tenant.keys {
            if let Some(other) = owners.insert(*d, tenant.name.clone()) {
                let msg = format!("a key is listed twice (also by tenant '{other}'); each key belongs to one tenant");
                return Err(TenantsError::new(Some(&tenant.name), Some("api_keys"), msg));
            }
        }
        tenants.push(tenant);
    }
    Ok(tenants)
}

/// The key of a tenant table whose value alone does not read (wrong type, unknown key):
/// serde's message from a whole table does not say which one it was.
fn field_at_fault(value: &toml::Value) -> Option<String> {
    let table = value.as_table()?;
    let alone = |k: &String, v: &toml::Value| toml::Value::Table([(k.clone(), v.clone())].into_iter().collect()).try_into::<Entry>();
    table.iter().find(|(k, v)| alone(k, v).is_err()).map(|(k, _)| k.clone())
}

/// Checks a tenant name: 1 to 64 of `[A-Za-z0-9_.-]`.
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    if name.is_empty() || name.len() > MAX_NAME || !name.chars().all(ok_char) {
        return Err(format!("'{}' is not a tenant name: 1 to {MAX_NAME} of A-Z a-z 0-9 _ . -", name.escape_debug()));
    }
    Ok(())
}

/// One entry (`label`: its name or its place in the file) checked and turned into a [`Tenant`].
fn tenant(e: Entry, label: &str) -> Result<Tenant, TenantsError> {
    let required = |field: &str| TenantsError::new(Some(label), Some(field), "is required");
    let name = e.name.ok_or_else(|| required("name"))?;
    let api_keys = e.api_keys.ok_or_else(|| required("api_keys"))?;
    let patterns = e.adapters.ok_or_else(|| required("adapters"))?;
    check_name(&name).map_err(|m| TenantsError::new(None, Some("name"), m))?;
    let err = |field, message: String| TenantsError::new(Some(&name), Some(field), message);
    let mut keys = Vec::with_capacity(api_keys.len());
    let mut plain_keys = 0;
    for (i, k) in api_keys.iter().enumerate() {
        let (digest, plain) = parse_key(k).map_err(|m| err("api_keys", format!("key {}: {m}", i + 1)))?;
        keys.push(digest);
        plain_keys += usize::from(plain);
    }
    let mut adapters = Vec::with_capacity(patterns.len());
    for a in &patterns {
        if a.is_empty() || a.len() > MAX_ITEM || a.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(err("adapters", format!("'{}' is not an adapter name or pattern", a.escape_debug())));
        }
        adapters.push(Glob::new(a));
    }
    if let Some(d) = &e.default_adapter {
        if d.contains(['*', '?']) || !adapters.iter().any(|g| g.matches(d)) {
            return Err(err("default_adapter", format!("'{}' is not one of this tenant's adapters", d.escape_debug())));
        }
    }
    let weight = e.weight.unwrap_or(1.0);
    if !(weight.is_finite() && weight > 0.0) {
        return Err(err("weight", format!("must be a finite number > 0, got {weight}")));
    }
    let positive = [
        ("max_concurrency", e.max_concurrency.map(u64::from)),
        ("requests_per_minute", e.requests_per_minute.map(u64::from)),
        ("tokens_per_minute", e.tokens_per_minute),
        ("max_upload_rank", e.max_upload_rank.map(u64::from)),
        ("max_upload_bytes", e.max_upload_bytes),
    ];
    if let Some((field, _)) = positive.iter().find(|(_, v)| *v == Some(0)) {
        return Err(err(field, "must be at least 1 (leave it out for no limit)".into()));
    }
    let limits = TenantLimits {
        max_concurrency: e.max_concurrency,
        requests_per_minute: e.requests_per_minute,
        tokens_per_minute: e.tokens_per_minute,
    };
    Ok(Tenant {
        name,
        adapters,
        default_adapter: e.default_adapter,
        weight,
        limits,
        max_uploads: e.max_uploads,
        max_upload_rank: e.max_upload_rank,
        max_upload_bytes: e.max_upload_bytes,
        keys,
        plain_keys,
    })
}

/// A key as written: `sha256:<64 hex>` (its digest) or a plain key (hashed here). Returns the
/// digest and whether the key was plain.
fn parse_key(k: &str) -> Result<([u8; 32], bool), String> {
    if let Some(hex) = k.strip_prefix("sha256:") {
        return decode_hex(hex).map(|d| (d, false)).ok_or_else(|| "a sha256: key needs exactly 64 hex digits".to_string());
    }
    if k.is_empty() || k.len() > MAX_ITEM {
        return Err(format!("a key must have 1 to {MAX_ITEM} bytes"));
    }
    if k.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("keys cannot contain whitespace or control characters".into());
    }
    Ok((key_digest(k), true))
}

fn decode_hex(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *o = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACME_SHA: &str = "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"; // "foo"

    fn err(text: &str) -> TenantsError {
        parse_tenants(text).expect_err("refused")
    }

    #[test]
    fn parses_the_documented_example() {
        let text = format!(
            r#"
            [[tenants]]
            name = "acme"
            api_keys = ["{ACME_SHA}", "plain-key"]
            adapters = ["sql", "acme/*"]
            default_adapter = "sql"
            weight = 2.5
            max_concurrency = 4
            requests_per_minute = 60
            tokens_per_minute = 20000
            max_uploads = 10
            max_upload_rank = 64
            max_upload_bytes = 1000000

            [[tenants]]
            name = "b.team_2"
            api_keys = []
            adapters = ["?ql"]
            "#
        );
        let t = parse_tenants(&text).unwrap();
        assert_eq!(t.len(), 2);
        let a = &t[0];
        assert_eq!((a.name.as_str(), a.weight, a.plain_keys), ("acme", 2.5, 1));
        assert_eq!(a.keys[0], key_digest("foo"));
        assert_eq!(a.keys[1], key_digest("plain-key"));
        assert_eq!(a.limits, TenantLimits { max_concurrency: Some(4), requests_per_minute: Some(60), tokens_per_minute: Some(20000) });
        assert_eq!((a.max_uploads, a.max_upload_rank, a.max_upload_bytes), (Some(10), Some(64), Some(1000000)));
        assert!(a.may_use("sql") && a.may_use("acme/x") && a.may_use("acme/") && !a.may_use("acme") && !a.may_use("sqlx"));
        assert_eq!(t[1].weight, 1.0);
        assert!(t[1].may_use("sql") && t[1].may_use("xql") && !t[1].may_use("ql"));
        assert!(parse_tenants("").unwrap().is_empty());
    }

    #[test]
    fn refusals_name_tenant_and_field() {
        let one = |body: &str| format!("[[tenants]]\nname = \"t\"\napi_keys = [\"k\"]\nadapters = [\"a\"]\n{body}");
        let cases: &[(&str, Option<&str>, Option<&str>, &str)] = &[
            (&one("weight = 0.0"), Some("t"), Some("weight"), "> 0"),
            (&one("weight = nan"), Some("t"), Some("weight"), "> 0"),
            (&one("weight = -1.0"), Some("t"), Some("weight"), "> 0"),
            (&one("default_adapter = \"b\""), Some("t"), Some("default_adapter"), "not one of"),
            (&one("requests_per_minute = 0"), Some("t"), Some("requests_per_minute"), "at least 1"),
            (&one("max_upload_bytes = 0"), Some("t"), Some("max_upload_bytes"), "at least 1"),
            (&one("max_concurrency = -1"), Some("t"), Some("max_concurrency"), "expected u32"),
            (&one("weight = \"heavy\""), Some("t"), Some("weight"), "expected f64"),
            (&one("colour = 1"), Some("t"), Some("colour"), "unknown field `colour`"),
            ("[[tenants]]\nname = \"bad name\"\napi_keys = []\nadapters = []", None, Some("name"), "not a tenant name"),
            ("[[tenants]]\nname = \"t\"\napi_keys = [\"sha256:abc\"]\nadapters = []", Some("t"), Some("api_keys"), "64 hex"),
            ("[[tenants]]\nname = \"t\"\napi_keys = [\"a b\"]\nadapters = []", Some("t"), Some("api_keys"), "whitespace"),
            ("[[tenants]]\nname = \"t\"\napi_keys = []\nadapters = [\"\"]", Some("t"), Some("adapters"), "not an adapter"),
            ("[[tenants]]\napi_keys = []\nadapters = []", Some("tenants[0]"), Some("name"), "is required"),
            ("[[tenants]]\nname = 3\napi_keys = []\nadapters = []", Some("tenants[0]"), Some("name"), "expected a string"),
            ("[[tenants]]\nname = \"t\"\nadapters = []", Some("t"), Some("api_keys"), "is required"),
            ("other = 1", None, None, "unknown key 'other'"),
            ("tenants = 3", None, Some("tenants"), "array of tables"),
            ("[[tenants]\n", None, None, ""),
        ];
        for (text, tenant, field, needle) in cases {
            let e = err(text);
            assert_eq!((e.tenant.as_deref(), e.field.as_deref()), (*tenant, *field), "{text}: {e}");
            assert!(e.message.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn duplicates_are_refused() {
        let two = |a: &str, b: &str, ka: &str, kb: &str| {
            format!("[[tenants]]\nname = \"{a}\"\napi_keys = [\"{ka}\"]\nadapters = []\n[[tenants]]\nname = \"{b}\"\napi_keys = [\"{kb}\"]\nadapters = []\n")
        };
        let e = err(&two("x", "x", "k1", "k2"));
        assert_eq!((e.tenant.as_deref(), e.field.as_deref()), (Some("x"), Some("name")));
        // The same key, once plain and once as its digest.
        let e = err(&two("x", "y", "foo", ACME_SHA));
        assert_eq!((e.tenant.as_deref(), e.field.as_deref()), (Some("y"), Some("api_keys")));
        assert!(e.message.contains("'x'"), "{e}");
        let shown = e.in_file(Path::new("/etc/t.toml")).to_string();
        assert_eq!(shown, "tenants file /etc/t.toml, tenant 'y', field 'api_keys': a key is listed twice (also by tenant 'x'); each key belongs to one tenant");
        assert!(!shown.contains("foo"), "never the key");
    }

    #[test]
    fn hex_is_case_insensitive_and_exact() {
        let upper = ACME_SHA.to_uppercase().replace("SHA256:", "sha256:");
        assert_eq!(parse_key(&upper).unwrap(), (key_digest("foo"), false));
        assert!(parse_key(&format!("{ACME_SHA}0")).is_err());
        assert!(parse_key("sha256:zz6b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae").is_err());
        assert!(parse_key("sha256:é6b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7a").is_err());
    }
}
