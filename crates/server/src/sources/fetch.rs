//! [`Fetcher`]: the clients that bring an adapter's bytes to a local folder. S3 and
//! S3-compatible stores through `object_store` (endpoint, region and credentials from the
//! `AWS_*` environment variables); the Hugging Face hub through its file-resolution layout
//! (`{HF_ENDPOINT}/{repo}/resolve/{revision}/{file}`, `HF_TOKEN`) and plain URLs, both with
//! reqwest over rustls. Every download streams to a file under the size cap, hashed as it
//! goes; nothing here decides where the file ends up (the cache does).

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::{ObjectStore, RetryConfig};
use sha2::{Digest, Sha256};

use super::aws_profile::AwsProfile;
use super::uri::{AdapterUri, Location, Shape};
use super::SourceError;
use crate::durable::hex;

/// The files of a PEFT folder, fetched in this order (the `#sha256=` pin of a folder is over
/// the first two, concatenated); `routing.json` is optional.
pub(crate) const PEFT_FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];
pub(crate) const ROUTING_FILE: &str = "routing.json";
/// The name a fetched GGUF adapter is kept under.
pub(crate) const GGUF_FILE: &str = "adapter.gguf";
/// The name an archive is downloaded to before it is unpacked.
pub(crate) const ARCHIVE_FILE: &str = ".archive";

/// What a download left in its folder.
pub(crate) struct Downloaded {
    /// sha256 of the bytes the pin covers (the file; a folder's two PEFT files in order).
    pub digest: String,
    pub bytes: u64,
}

/// The clients, made once: S3 clients per bucket, one HTTP client.
pub(crate) struct Fetcher {
    http: reqwest::Client,
    s3: Mutex<HashMap<String, Arc<AmazonS3>>>,
    hf_endpoint: String,
    hf_token: Option<String>,
    /// `--max-lora-bytes`: no adapter download may be larger.
    max_bytes: u64,
}

/// Where one object is, in a form each client takes.
enum Object {
    S3 { bucket: String, key: String },
    Url { url: String, bearer: bool },
}

impl Fetcher {
    /// Reads `HF_ENDPOINT` and `HF_TOKEN`; the S3 settings are read per bucket, on first use.
    pub(crate) fn new(max_bytes: u64) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("loramux/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        let hf_endpoint = std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()).unwrap_or_else(|| "https://huggingface.co".into());
        let hf_token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty());
        Ok(Self { http, s3: Mutex::default(), hf_endpoint: hf_endpoint.trim_end_matches('/').to_string(), hf_token, max_bytes })
    }

    /// The S3 client of a bucket: `AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_ALLOW_HTTP` and the rest of
    /// object_store's `AWS_*` keys (its client options too: `AWS_ALLOW_HTTP` is one, so they
    /// are not replaced here), then what they leave unset from the AWS profile files
    /// ([`AwsProfile`]); few retries, so a dead store fails fast.
    fn s3(&self, uri: &str, bucket: &str) -> Result<Arc<AmazonS3>, SourceError> {
        let mut clients = self.s3.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(bucket) {
            return Ok(c.clone());
        }
        let retry = RetryConfig { max_retries: 2, retry_timeout: Duration::from_secs(15), ..RetryConfig::default() };
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket).with_retry(retry);
        let profile = AwsProfile::load().map_err(|message| SourceError::Settings { uri: uri.into(), message })?;
        if let Some(profile) = profile {
            builder = with_profile(builder, profile);
        }
        let client = builder
            .build()
            .map_err(|e| SourceError::Invalid { uri: uri.into(), message: format!("S3 client: {e}") })?;
        let client = Arc::new(client);
        clients.insert(bucket.to_string(), client.clone());
        Ok(client)
    }

    /// The object of `uri`, or of `file` inside it when it is a folder.
    fn object(&self, uri: &AdapterUri, file: Option<&str>) -> Object {
        let join = |base: &str, f: Option<&str>| match (base.is_empty(), f) {
            (_, None) => base.to_string(),
            (true, Some(f)) => f.to_string(),
            (false, Some(f)) => format!("{base}/{f}"),
        };
        match &uri.location {
            Location::S3 { bucket, key } => Object::S3 { bucket: bucket.clone(), key: join(key, file) },
            Location::Hub { repo, path, revision } => {
                Object::Url { url: format!("{}/{repo}/resolve/{revision}/{}", self.hf_endpoint, join(path, file)), bearer: true }
            }
            Location::Http { url, .. } => Object::Url { url: url.clone(), bearer: false },
        }
    }

    /// Downloads what `uri` names into `dir`: a folder's PEFT files (and `routing.json` if
    /// there is one), a GGUF as `adapter.gguf`, an archive as `.archive` (unpacked by the
    /// caller). Fails as soon as more than `--max-lora-bytes` would arrive.
    pub(crate) async fn download(&self, uri: &AdapterUri, dir: &Path) -> Result<Downloaded, SourceError> {
        if let Location::Http { insecure: true, url } = &uri.location {
            tracing::warn!(url = %url, "fetching an adapter over plain http://: use https:// outside loopback and tests");
        }
        let mut hash = Sha256::new();
        let mut bytes = 0u64;
        match uri.shape() {
            Shape::Folder => {
                for f in PEFT_FILES {
                    bytes += self.get(uri, Some(f), &dir.join(f), Some(&mut hash), bytes).await?;
                }
                match self.get(uri, Some(ROUTING_FILE), &dir.join(ROUTING_FILE), None, bytes).await {
                    Ok(n) => bytes += n,
                    Err(SourceError::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Shape::Gguf => bytes = self.get(uri, None, &dir.join(GGUF_FILE), Some(&mut hash), 0).await?,
            Shape::TarGz | Shape::Zip => bytes = self.get(uri, None, &dir.join(ARCHIVE_FILE), Some(&mut hash), 0).await?,
        }
        Ok(Downloaded { digest: hex(&hash.finalize()), bytes })
    }

    /// One object to `dest`, fsynced; `so_far` bytes already count against the cap.
    async fn get(&self, uri: &AdapterUri, file: Option<&str>, dest: &Path, mut hash: Option<&mut Sha256>, so_far: u64) -> Result<u64, SourceError> {
        let shown = match file {
            Some(f) => format!("{}/{f}", uri.without_pin()),
            None => uri.to_string(),
        };
        let store = match uri.location {
            Location::S3 { .. } => "S3",
            Location::Hub { .. } => "the Hugging Face hub",
            Location::Http { .. } => "the HTTP server",
        };
        let limit = self.max_bytes;
        let too_large = || SourceError::TooLarge { uri: shown.clone(), limit };
        let broken = |message: String| SourceError::Unavailable { uri: shown.clone(), store, message };
        let cache_err = |e: std::io::Error| SourceError::Cache { path: dest.display().to_string(), message: e.to_string() };
        // Created once the store answers with the object: a missing optional file leaves none.
        let mut out: Option<File> = None;
        let mut n = 0u64;
        let mut sink = |chunk: &[u8]| -> Result<(), SourceError> {
            n += chunk.len() as u64;
            if so_far + n > limit {
                return Err(too_large());
            }
            if let Some(h) = hash.as_deref_mut() {
                h.update(chunk);
            }
            let f = match &mut out {
                Some(f) => f,
                None => out.insert(File::create(dest).map_err(cache_err)?),
            };
            f.write_all(chunk).map_err(cache_err)
        };
        match self.object(uri, file) {
            Object::S3 { bucket, key } => {
                let client = self.s3(&shown, &bucket)?;
                let path = object_store::path::Path::from(key.as_str());
                let result = client.get(&path).await.map_err(|e| s3_error(&shown, e))?;
                if so_far + result.meta.size > limit {
                    return Err(too_large());
                }
                let expected = result.meta.size;
                let mut stream = result.into_stream();
                while let Some(chunk) = stream.next().await {
                    sink(&chunk.map_err(|e| s3_error(&shown, e))?)?;
                }
                if n != expected {
                    return Err(broken(format!("the object has {expected} bytes but {n} arrived")));
                }
            }
            Object::Url { url, bearer } => {
                let mut req = self.http.get(&url);
                if let (true, Some(t)) = (bearer, &self.hf_token) {
                    req = req.bearer_auth(t);
                }
                let mut resp = req.send().await.map_err(|e| broken(e.to_string()))?;
                let status = resp.status();
                match status.as_u16() {
                    200..=299 => {}
                    404 => return Err(SourceError::NotFound { uri: shown, store }),
                    401 | 403 => return Err(SourceError::Denied { uri: shown, store, detail: format!("HTTP {status}") }),
                    _ => return Err(broken(format!("HTTP {status}"))),
                }
                if resp.content_length().is_some_and(|l| so_far + l > limit) {
                    return Err(too_large());
                }
                let expected = resp.content_length();
                while let Some(chunk) = resp.chunk().await.map_err(|e| broken(format!("the transfer broke off: {e}")))? {
                    sink(&chunk)?;
                }
                if expected.is_some_and(|l| l != n) {
                    return Err(broken(format!("{} bytes announced, {n} arrived", expected.unwrap_or(0))));
                }
            }
        }
        let file = match out {
            Some(f) => f,
            None => File::create(dest).map_err(cache_err)?,
        };
        file.sync_all().map_err(cache_err)?;
        Ok(n)
    }
}

/// `builder` (from the environment) with what the environment leaves unset taken from
/// `profile`, the precedence of the AWS SDKs. An `http://` endpoint from the profile is allowed
/// (with a warning), as the SDKs allow it.
fn with_profile(mut builder: AmazonS3Builder, profile: AwsProfile) -> AmazonS3Builder {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.is_empty());
    if !set("AWS_ACCESS_KEY_ID") {
        if let (Some(id), Some(secret)) = (profile.access_key_id, profile.secret_access_key) {
            builder = builder.with_access_key_id(id).with_secret_access_key(secret);
            if let Some(token) = profile.session_token {
                builder = builder.with_token(token);
            }
        }
    }
    if !set("AWS_REGION") && !set("AWS_DEFAULT_REGION") {
        if let Some(region) = profile.region {
            builder = builder.with_region(region);
        }
    }
    if !set("AWS_ENDPOINT_URL") && !set("AWS_ENDPOINT") {
        if let Some(endpoint) = profile.endpoint_url {
            if endpoint.starts_with("http://") && !set("AWS_ALLOW_HTTP") {
                tracing::warn!(endpoint = %endpoint, "the AWS profile's S3 endpoint is plain http://: use https:// outside loopback and tests");
                builder = builder.with_allow_http(true);
            }
            builder = builder.with_endpoint(endpoint);
        }
    }
    builder
}

/// An object_store error as a [`SourceError`]: 404, 403/401, or the store failing.
fn s3_error(uri: &str, e: object_store::Error) -> SourceError {
    match e {
        object_store::Error::NotFound { .. } => SourceError::NotFound { uri: uri.into(), store: "S3" },
        object_store::Error::PermissionDenied { source, .. } | object_store::Error::Unauthenticated { source, .. } => {
            SourceError::Denied { uri: uri.into(), store: "S3", detail: first_line(&source.to_string()) }
        }
        e => SourceError::Unavailable { uri: uri.into(), store: "S3", message: first_line(&e.to_string()) },
    }
}

/// Error texts of HTTP clients can carry whole response bodies: the first line, bounded.
fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").chars().take(300).collect()
}
