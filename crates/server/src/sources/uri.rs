//! [`AdapterUri`]: an adapter's remote address (`s3://`, `hf://`, `https://`, `http://`),
//! parsed once where it is given (a flag, a request, the sync file), so that everything after
//! works on checked parts. A plain path is not a URI: [`AdapterUri::parse`] says `None`.

use std::fmt;

/// Why a string that looks like an adapter URI is not one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("adapter URI {uri}: {message}")]
pub struct UriError {
    pub uri: String,
    pub message: String,
}

/// Where the adapter's bytes are.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Location {
    /// An S3 (or S3-compatible) object or key prefix.
    S3 { bucket: String, key: String },
    /// A Hugging Face hub repository, a folder of it, at a revision.
    Hub { repo: String, path: String, revision: String },
    /// A plain URL (`insecure`: `http://`).
    Http { url: String, insecure: bool },
}

/// What the address holds, from how it ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// A PEFT folder: `adapter_config.json`, `adapter_model.safetensors` (and an optional
    /// `routing.json`) under it.
    Folder,
    /// One llama.cpp GGUF adapter file.
    Gguf,
    /// A PEFT folder packed as `.tar.gz` / `.tgz`.
    TarGz,
    /// A PEFT folder packed as `.zip`.
    Zip,
}

/// A parsed adapter URI, with its optional `#sha256=<hex>` pin.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AdapterUri {
    pub location: Location,
    /// The pinned sha256 (lower-case hex) the downloaded bytes must have.
    pub sha256: Option<String>,
}

/// The schemes this parser claims: anything else is a local path.
const SCHEMES: [&str; 4] = ["s3://", "hf://", "https://", "http://"];

fn bad<T>(uri: &str, message: impl Into<String>) -> Result<T, UriError> {
    Err(UriError { uri: uri.chars().take(200).collect(), message: message.into() })
}

/// A path segment a key, repository or folder may contain: no empty, `.` or `..` segment,
/// no control characters or backslashes.
fn check_segments(uri: &str, what: &str, path: &str) -> Result<(), UriError> {
    for seg in path.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." {
            return bad(uri, format!("{what} has an empty, '.' or '..' segment"));
        }
        if seg.chars().any(|c| c.is_control() || c == '\\' || c.is_whitespace()) {
            return bad(uri, format!("{what} contains whitespace, a control character or a backslash"));
        }
    }
    Ok(())
}

impl AdapterUri {
    /// Whether `s` is meant as a URI (starts with a scheme this server fetches from).
    pub fn is_uri(s: &str) -> bool {
        let lower = s.get(..8).unwrap_or(s).to_ascii_lowercase();
        SCHEMES.iter().any(|p| lower.starts_with(p))
    }

    /// Parses `s`: `Ok(None)` for a local path, an error for a malformed URI.
    pub fn parse(s: &str) -> Result<Option<Self>, UriError> {
        if !Self::is_uri(s) {
            return Ok(None);
        }
        if s.len() > 2048 {
            return bad(s, "longer than 2048 bytes");
        }
        let (body, fragment) = match s.split_once('#') {
            Some((b, f)) => (b, Some(f)),
            None => (s, None),
        };
        let sha256 = match fragment {
            None => None,
            Some(f) => {
                let hex = f.strip_prefix("sha256=").ok_or_else(|| UriError { uri: s.into(), message: "the fragment must be #sha256=<64 hex digits>".into() })?;
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return bad(s, "#sha256= needs 64 hex digits");
                }
                Some(hex.to_ascii_lowercase())
            }
        };
        let (scheme, rest) = body.split_once("://").unwrap_or(("", body));
        let location = match scheme.to_ascii_lowercase().as_str() {
            "s3" => {
                let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
                let valid_bucket = (3..=63).contains(&bucket.len())
                    && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
                    && !bucket.starts_with(['-', '.']);
                if !valid_bucket {
                    return bad(s, "the bucket name must be 3 to 63 of [a-z0-9.-]");
                }
                let key = key.trim_end_matches('/');
                if !key.is_empty() {
                    check_segments(s, "the key", key)?;
                }
                Location::S3 { bucket: bucket.to_string(), key: key.to_string() }
            }
            "hf" => {
                let (path, revision) = match rest.rsplit_once('@') {
                    Some((p, r)) => (p, r),
                    None => (rest, "main"),
                };
                if revision.is_empty() || revision.len() > 255 || !revision.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
                    return bad(s, "the revision must be 1 to 255 of [A-Za-z0-9._-]");
                }
                let path = path.trim_end_matches('/');
                check_segments(s, "the repository path", path)?;
                let mut parts = path.splitn(3, '/');
                let (Some(org), Some(name)) = (parts.next(), parts.next()) else {
                    return bad(s, "expected hf://org/repo[/subfolder][@revision]");
                };
                let id_ok = |p: &str| p.len() <= 96 && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
                if !id_ok(org) || !id_ok(name) {
                    return bad(s, "org and repo must be of [A-Za-z0-9._-]");
                }
                Location::Hub { repo: format!("{org}/{name}"), path: parts.next().unwrap_or("").to_string(), revision: revision.to_string() }
            }
            "http" | "https" => {
                let host = rest.split(['/', '?']).next().unwrap_or("");
                if host.is_empty() || host.contains('@') {
                    return bad(s, "expected a host (and no user:password@ in the URL)");
                }
                if body.chars().any(|c| c.is_control() || c.is_whitespace()) {
                    return bad(s, "the URL contains whitespace or a control character");
                }
                Location::Http { url: body.to_string(), insecure: scheme.eq_ignore_ascii_case("http") }
            }
            _ => return bad(s, "unknown scheme"),
        };
        let uri = Self { location, sha256 };
        if let Location::Http { .. } = &uri.location {
            if uri.shape() == Shape::Folder {
                return bad(s, "an https:// adapter must end in .gguf, .tar.gz, .tgz or .zip (a folder cannot be listed over plain HTTP)");
            }
        }
        Ok(Some(uri))
    }

    /// The object's name as it ends (last path segment, no query).
    fn last_segment(&self) -> &str {
        let path = match &self.location {
            Location::S3 { key, .. } => key.as_str(),
            Location::Hub { path, .. } => path.as_str(),
            Location::Http { url, .. } => url.split(['?', '#']).next().unwrap_or(url),
        };
        path.rsplit('/').next().unwrap_or(path)
    }

    /// What the address holds: a file by its extension, else a folder.
    pub fn shape(&self) -> Shape {
        let last = self.last_segment().to_ascii_lowercase();
        if last.ends_with(".gguf") {
            Shape::Gguf
        } else if last.ends_with(".tar.gz") || last.ends_with(".tgz") {
            Shape::TarGz
        } else if last.ends_with(".zip") {
            Shape::Zip
        } else {
            Shape::Folder
        }
    }

    /// The store it names, for error messages and metrics: `s3`, `hub` or `http`.
    pub fn kind(&self) -> &'static str {
        match self.location {
            Location::S3 { .. } => "s3",
            Location::Hub { .. } => "hub",
            Location::Http { .. } => "http",
        }
    }

    /// The address without its pin (how one file of a folder is named in messages).
    pub fn without_pin(&self) -> Self {
        Self { location: self.location.clone(), sha256: None }
    }

    /// `self` as a prefix with `child` appended (the `--lora-dir URI` lookup of a name).
    pub fn join(&self, child: &str) -> Self {
        let location = match &self.location {
            Location::S3 { bucket, key } => {
                Location::S3 { bucket: bucket.clone(), key: if key.is_empty() { child.to_string() } else { format!("{key}/{child}") } }
            }
            Location::Hub { repo, path, revision } => Location::Hub {
                repo: repo.clone(),
                path: if path.is_empty() { child.to_string() } else { format!("{path}/{child}") },
                revision: revision.clone(),
            },
            Location::Http { url, insecure } => Location::Http { url: format!("{}/{child}", url.trim_end_matches('/')), insecure: *insecure },
        };
        Self { location, sha256: None }
    }
}

impl fmt::Display for AdapterUri {
    /// The URI as a user would write it (the cache keys on this form).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.location {
            Location::S3 { bucket, key } => write!(f, "s3://{bucket}/{key}")?,
            Location::Hub { repo, path, revision } if path.is_empty() => write!(f, "hf://{repo}@{revision}")?,
            Location::Hub { repo, path, revision } => write!(f, "hf://{repo}/{path}@{revision}")?,
            Location::Http { url, .. } => write!(f, "{url}")?,
        }
        if let Some(h) = &self.sha256 {
            write!(f, "#sha256={h}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> AdapterUri {
        AdapterUri::parse(s).unwrap().unwrap()
    }

    #[test]
    fn forms() {
        assert_eq!(AdapterUri::parse("adapters/pirate").unwrap(), None);
        assert_eq!(AdapterUri::parse("/abs/x.gguf").unwrap(), None);
        let u = ok("s3://my-bucket/adapters/pirate/");
        assert_eq!(u.location, Location::S3 { bucket: "my-bucket".into(), key: "adapters/pirate".into() });
        assert_eq!(u.shape(), Shape::Folder);
        assert_eq!(u.to_string(), "s3://my-bucket/adapters/pirate");
        assert_eq!(ok("s3://b12/x.gguf").shape(), Shape::Gguf);
        assert_eq!(ok("S3://b12/x.TAR.GZ").shape(), Shape::TarGz);
        let h = ok("hf://org/repo/sub/dir@v1.0");
        assert_eq!(h.location, Location::Hub { repo: "org/repo".into(), path: "sub/dir".into(), revision: "v1.0".into() });
        assert_eq!(ok("hf://org/repo").location, Location::Hub { repo: "org/repo".into(), path: String::new(), revision: "main".into() });
        let pinned = ok(&format!("https://h.example/a.zip#sha256={}", "A".repeat(64)));
        assert_eq!(pinned.sha256.as_deref(), Some(&"a".repeat(64)[..]));
        assert_eq!(pinned.shape(), Shape::Zip);
        assert!(matches!(ok("http://127.0.0.1:9/a.gguf").location, Location::Http { insecure: true, .. }));
        assert_eq!(ok("s3://bkt/p").join("x").to_string(), "s3://bkt/p/x");
        assert_eq!(ok("s3://bkt").join("x").to_string(), "s3://bkt/x");
    }

    #[test]
    fn refusals() {
        for s in [
            "s3://B/x",
            "s3://ab/x",
            "s3://bucket/a/../b",
            "s3://bucket/a//b",
            "hf://org",
            "hf://org/repo@",
            "hf://org/re po",
            "hf://o!g/repo",
            "https://host/folder",
            "https://user:pw@host/a.gguf",
            "https:///a.gguf",
            "s3://bucket/x#md5=00",
            "s3://bucket/x#sha256=abc",
            "http://h/a b.gguf",
        ] {
            assert!(AdapterUri::parse(s).is_err(), "{s} should be refused");
        }
    }
}
