//! Adapters from remote sources (issue #23), against the real `loramux serve` binary on the
//! tiny fixture model:
//!
//! - S3 against a real S3-compatible server (moto, started by `tests/sources/run.sh`, which
//!   sets `LORAMUX_TEST_S3_*`; without them these tests print why and pass vacuously):
//!   credentials, a wrong credential (403 naming S3), a missing key (404 as an unknown adapter),
//!   a checksum mismatch (refused, nothing cached), single flight (16 concurrent first requests,
//!   one download), a restart served from the disk cache without a download, and credentials
//!   from the AWS profile files (an unknown profile: a 500 naming it); the fleet of 3 replicas
//!   sharing one bucket is `scripts/replicas.sh s3`, which the same script runs;
//! - against a local HTTP server in this test (no hub is reachable here): the hub's
//!   file-resolution layout with a token, https-style `.tar.gz`/`.zip`/`.gguf` files, a store
//!   that dies mid-download, a fetch SIGKILLed mid-way, `/ready` while a startup adapter is
//!   fetched, and `--lora-sync`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use common::{free_port, repo};

fn tiny() -> PathBuf {
    repo().join("fixtures/tiny/llama")
}

fn adapter_dir(name: &str) -> PathBuf {
    tiny().join("adapters").join(name)
}

/// A `loramux serve` process on the tiny model.
type Server = common::ServeProcess;

impl Server {
    /// Starts with `args` and `env`, its own `--lora-cache-dir` `cache`; waits for `/health`.
    fn start(args: &[String], env: &[(&str, String)], cache: &Path, log: &Path) -> Self {
        let port = free_port();
        let log_path = log;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log_path).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_loramux"));
        cmd.args(["serve", "--model", tiny().to_str().unwrap(), "--served-model-name", "tiny"])
            .args(args)
            .arg("--lora-cache-dir")
            .arg(cache)
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--enable-lora-updates", "--admin-api-key", "adm"])
            .env("LORAMUX_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for k in [
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
            "AWS_ALLOW_HTTP",
            "AWS_PROFILE",
            "AWS_DEFAULT_PROFILE",
            "AWS_SHARED_CREDENTIALS_FILE",
            "AWS_CONFIG_FILE",
            "HF_ENDPOINT",
            "HF_TOKEN",
        ] {
            cmd.env_remove(k);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::spawn_healthy(cmd, port, log_path)
    }

    fn get(&self, path: &str) -> (u16, String) {
        common::http(self.port, "GET", path, "", &[], Duration::from_secs(60)).unwrap_or((0, String::new()))
    }

    /// Greedy completion on `model`: status and the text (or the error body).
    fn complete(&self, model: &str) -> (u16, String) {
        let body = format!(r#"{{"model": "{model}", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}}"#);
        let (st, b) = common::http(self.port, "POST", "/v1/completions", "Content-Type: application/json\r\n", body.as_bytes(), Duration::from_secs(120)).unwrap();
        if st == 200 {
            let v: serde_json::Value = serde_json::from_str(&b).unwrap();
            (st, v["choices"][0]["text"].as_str().unwrap().to_string())
        } else {
            (st, b)
        }
    }

    fn load(&self, name: &str, path: &str) -> (u16, String) {
        let body = serde_json::json!({"lora_name": name, "lora_path": path}).to_string();
        common::http(self.port, "POST", "/v1/load_lora_adapter", "Authorization: Bearer adm\r\nContent-Type: application/json\r\n", body.as_bytes(), Duration::from_secs(120)).unwrap()
    }

    /// The sum of a metric's series whose labels include every `labels` pair.
    fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']) && labels.iter().all(|p| l.contains(p)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn fetches(&self) -> f64 {
        self.metric("loramux_lora_fetches_total", &["outcome=\"ok\""])
    }
}

/// The text local adapter `name` answers (the reference a remote copy must match).
fn reference_texts(tmp: &Path) -> HashMap<String, String> {
    let mut args = vec!["--lora-modules".to_string()];
    for n in ["a", "b"] {
        args.push(format!("{n}={}", adapter_dir(n).display()));
    }
    let s = Server::start(&args, &[], &tmp.join("ref-cache"), &tmp.join("ref.log"));
    ["a", "b"].iter().map(|n| (n.to_string(), s.complete(n).1)).collect()
}

/// Files of the cache: (index entries, blobs, temporaries).
fn cache_contents(cache: &Path) -> (usize, usize, usize) {
    let count = |d: &str| std::fs::read_dir(cache.join(d)).map(|r| r.flatten().filter(|e| !e.file_name().to_string_lossy().starts_with('.')).count()).unwrap_or(0);
    (count("sources"), count("blobs"), count("tmp"))
}

// ---------------------------------------------------------------------------------------------
// A local HTTP server: the hub's resolve layout and plain files, with faults on demand.

/// What the local server answers for a path.
#[derive(Clone)]
enum Reply {
    Body(Vec<u8>),
    /// Announces the whole length, sends `sent` bytes, closes.
    Truncated { body: Vec<u8>, sent: usize },
    /// Waits, then sends the body.
    Slow { body: Vec<u8>, delay: Duration },
    /// Sends the body slowly (for a SIGKILL mid-fetch).
    Trickle(Vec<u8>),
    /// Sends the body without a length (it ends when the connection closes).
    Unannounced(Vec<u8>),
    Status(u16),
}

struct Files {
    port: u16,
    routes: Arc<Mutex<HashMap<String, Reply>>>,
    requests: Arc<AtomicUsize>,
}

impl Files {
    /// Serves `routes`; a request without `Authorization: Bearer <token>` (when `token` is
    /// set) gets 401.
    fn start(token: Option<&str>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let routes: Arc<Mutex<HashMap<String, Reply>>> = Arc::default();
        let requests = Arc::new(AtomicUsize::new(0));
        let (r, n, token) = (routes.clone(), requests.clone(), token.map(str::to_string));
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (r, n, token) = (r.clone(), n.clone(), token.clone());
                std::thread::spawn(move || serve_one(conn, &r, &n, token.as_deref()));
            }
        });
        Self { port, routes, requests }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn put(&self, path: &str, reply: Reply) {
        self.routes.lock().unwrap().insert(path.to_string(), reply);
    }
}

fn serve_one(mut conn: TcpStream, routes: &Mutex<HashMap<String, Reply>>, requests: &AtomicUsize, token: Option<&str>) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte).unwrap_or(0) == 0 {
            return;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let path = head.split(' ').nth(1).unwrap_or("").to_string();
    requests.fetch_add(1, Ordering::SeqCst);
    let authorized = token.is_none_or(|t| head.lines().any(|l| l.eq_ignore_ascii_case(&format!("authorization: Bearer {t}"))));
    let reply = if authorized { routes.lock().unwrap().get(&path).cloned().unwrap_or(Reply::Status(404)) } else { Reply::Status(401) };
    let send = |conn: &mut TcpStream, len: usize| {
        let _ = write!(conn, "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n");
    };
    match reply {
        Reply::Body(b) => {
            send(&mut conn, b.len());
            let _ = conn.write_all(&b);
        }
        Reply::Truncated { body, sent } => {
            send(&mut conn, body.len());
            let _ = conn.write_all(&body[..sent]);
        }
        Reply::Slow { body, delay } => {
            std::thread::sleep(delay);
            send(&mut conn, body.len());
            let _ = conn.write_all(&body);
        }
        Reply::Trickle(body) => {
            send(&mut conn, body.len());
            for c in body.chunks(512) {
                if conn.write_all(c).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Reply::Unannounced(body) => {
            let _ = write!(conn, "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
            let _ = conn.write_all(&body);
        }
        Reply::Status(code) => {
            let _ = write!(conn, "HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    }
}

/// `adapter_dir(name)` packed as `.tar.gz` (inside a folder, as `tar czf x.tar.gz name/` makes it).
fn tar_gz(name: &str) -> Vec<u8> {
    let out = Command::new("tar").arg("czf").arg("-").arg("-C").arg(tiny().join("adapters")).arg(name).output().unwrap();
    assert!(out.status.success());
    out.stdout
}

fn zip_of(name: &str) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        w.start_file(f, zip::write::SimpleFileOptions::default()).unwrap();
        w.write_all(&std::fs::read(adapter_dir(name).join(f)).unwrap()).unwrap();
    }
    w.finish().unwrap().into_inner()
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(secs), "{what}: not within {secs} s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn hub_and_https_sources() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = reference_texts(tmp.path());
    let files = Files::start(Some("hf-secret"));
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        let data = std::fs::read(adapter_dir("a").join(f)).unwrap();
        files.put(&format!("/org/repo/resolve/v2/adapters/a/{f}"), Reply::Body(data.clone()));
    }
    files.put("/org/repo/resolve/main/b.tar.gz", Reply::Body(tar_gz("b")));
    files.put("/org/repo/resolve/main/a.zip", Reply::Body(zip_of("a")));
    let gguf = std::fs::read(tiny().join("adapters_gguf/e.gguf")).unwrap();
    files.put("/org/repo/resolve/main/e.gguf", Reply::Body(gguf.clone()));
    let cache = tmp.path().join("cache");
    let env = [("HF_ENDPOINT", files.url("")), ("HF_TOKEN", "hf-secret".to_string())];
    let s = Server::start(&[], &env, &cache, &tmp.path().join("hub.log"));

    // hf:// a folder at a revision; https-style archives and a GGUF (through the same server).
    assert_eq!(s.load("ha", "hf://org/repo/adapters/a@v2").0, 200);
    assert_eq!(s.complete("ha"), (200, reference["a"].clone()));
    // A plain URL gets no hub token: the store's 401 is a 403 naming it.
    let (st, body) = s.load("tb", &files.url("/org/repo/resolve/main/b.tar.gz"));
    assert_eq!(st, 403, "{body}");
    assert!(body.contains("HTTP server refused access"), "{body}");
    let s2 = Server::start(&[], &[("HF_ENDPOINT", files.url(""))], &tmp.path().join("cache2"), &tmp.path().join("hub2.log"));
    let (st, body) = s2.load("x", "hf://org/repo/adapters/a@v2");
    assert_eq!(st, 403, "no HF_TOKEN: the hub's 401 is a 403 naming it: {body}");
    assert!(body.contains("Hugging Face hub"), "{body}");
    drop(s2);

    let plain = Files::start(None);
    plain.put("/b.tar.gz", Reply::Body(tar_gz("b")));
    plain.put("/a.zip", Reply::Body(zip_of("a")));
    plain.put("/e.gguf", Reply::Body(gguf.clone()));
    assert_eq!(s.load("tb", &plain.url("/b.tar.gz")).0, 200);
    assert_eq!(s.complete("tb"), (200, reference["b"].clone()));
    assert_eq!(s.load("za", &plain.url("/a.zip")).0, 200);
    assert_eq!(s.complete("za"), (200, reference["a"].clone()));
    let (st, body) = s.load("ge", &format!("{}#sha256={}", plain.url("/e.gguf"), sha256_hex(&gguf)));
    assert_eq!(st, 200, "{body}");
    assert_eq!(s.complete("ge").0, 200);

    // A pin that does not match: refused, nothing cached.
    let before = cache_contents(&cache);
    let (st, body) = s.load("bad", &format!("{}#sha256={}", plain.url("/a.zip"), "0".repeat(64)));
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("checksum_mismatch") && body.contains("nothing cached"), "{body}");
    assert_eq!(cache_contents(&cache), before);

    // Missing file: 404 naming the source; a store that dies mid-download: 502, no half adapter.
    let (st, body) = s.load("m", &plain.url("/missing.gguf"));
    assert_eq!(st, 404, "{body}");
    let mut big = tar_gz("a");
    big.resize(big.len() + 200_000, 0);
    plain.put("/dies.tar.gz", Reply::Truncated { body: big, sent: 50_000 });
    let (st, body) = s.load("d", &plain.url("/dies.tar.gz"));
    assert_eq!(st, 502, "{body}");
    assert_eq!(cache_contents(&cache), before);
    assert_eq!(cache_contents(&cache).2, 0, "no temporary left");

    // --max-lora-bytes caps a download before it completes: announced or not, 413, nothing kept.
    plain.put("/big.gguf", Reply::Body(vec![0u8; 100_000]));
    plain.put("/big-unannounced.gguf", Reply::Unannounced(vec![0u8; 100_000]));
    let small = tmp.path().join("cache-small");
    let capped = Server::start(&["--max-lora-bytes".into(), "30000".into()], &[], &small, &tmp.path().join("capped.log"));
    for path in ["/big.gguf", "/big-unannounced.gguf"] {
        let (st, body) = capped.load("big", &plain.url(path));
        assert_eq!(st, 413, "{body}");
        assert!(body.contains("--max-lora-bytes"), "{body}");
    }
    assert_eq!(cache_contents(&small), (0, 0, 0));
}

#[test]
fn killed_fetch_leaves_no_half_adapter_and_ready_waits_for_startup_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = Files::start(None);
    let mut big = tar_gz("a");
    big.resize(big.len() + 100_000, 0);
    plain.put("/slow.tar.gz", Reply::Trickle(big));
    let cache = tmp.path().join("cache");
    let uri = plain.url("/slow.tar.gz");
    // Killed with SIGKILL mid-fetch: the restart finds no entry, no blob, no temporary.
    let mut s = Server::start(&[], &[], &cache, &tmp.path().join("kill.log"));
    let port = s.port;
    let loader = std::thread::spawn(move || {
        let body = serde_json::json!({"lora_name": "k", "lora_path": uri}).to_string();
        common::http(port, "POST", "/v1/load_lora_adapter", "Authorization: Bearer adm\r\n", body.as_bytes(), Duration::from_secs(30))
    });
    wait_for("a fetch in progress", 20, || cache_contents(&cache).2 > 0);
    // Other requests are not held by the fetch (it runs in tokio, off the batch loop).
    let t = Instant::now();
    assert_eq!(s.complete("tiny").0, 200);
    assert!(t.elapsed() < Duration::from_secs(2), "a base-model request waited {:?} behind a fetch", t.elapsed());
    assert!(cache_contents(&cache).2 > 0, "the fetch is still in progress");
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    let _ = loader.join();
    drop(s);
    let s = Server::start(&[], &[], &cache, &tmp.path().join("kill.log"));
    assert_eq!(cache_contents(&cache), (0, 0, 0), "nothing of the killed fetch survives");
    drop(s);

    // /ready is 503 while a remote --lora-modules (pinned) is fetched; /health is 200.
    plain.put("/r.tar.gz", Reply::Slow { body: tar_gz("b"), delay: Duration::from_secs(3) });
    let args = ["--lora-modules".to_string(), format!("r={}", plain.url("/r.tar.gz")), "--pin-lora".into(), "r".into(), "--max-loras".into(), "2".into()];
    let s = Server::start(&args, &[], &tmp.path().join("cache-r"), &tmp.path().join("ready.log"));
    let (st, body) = s.get("/ready");
    assert_eq!(st, 503, "{body}");
    assert!(body.contains("r.tar.gz") || body.contains("not fetched"), "{body}");
    assert_eq!(s.get("/health").0, 200);
    wait_for("/ready", 30, || s.get("/ready").0 == 200);
    assert_eq!(s.metric("loramux_adapter_pinned", &["adapter=\"r\""]), 1.0);
    assert_eq!(s.complete("r").0, 200);
}

#[test]
fn lora_sync_file() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = Files::start(None);
    plain.put("/a.tar.gz", Reply::Body(tar_gz("a")));
    let file = tmp.path().join("configmap.yaml");
    let yaml = |exist: &str, not: &str| format!("vLLMLoRAConfig:\n  name: pool\n  port: 8000\n  ensureExist:\n    models:\n{exist}  ensureNotExist:\n    models:\n{not}");
    let entry = |id: &str, src: &str| format!("    - id: {id}\n      source: {src}\n      base-model: tiny\n");
    std::fs::write(&file, yaml(&(entry("s1", &plain.url("/a.tar.gz")) + &entry("s2", adapter_dir("b").to_str().unwrap())), "")).unwrap();
    let args = ["--lora-sync".to_string(), file.display().to_string()];
    let s = Server::start(&args, &[], &tmp.path().join("cache"), &tmp.path().join("sync.log"));
    wait_for("ensureExist loaded", 30, || s.complete("s1").0 == 200 && s.complete("s2").0 == 200);
    std::fs::write(&file, yaml(&entry("s2", adapter_dir("b").to_str().unwrap()), &entry("s1", &plain.url("/a.tar.gz")))).unwrap();
    wait_for("ensureNotExist unloaded", 30, || s.complete("s1").0 == 404);
    assert_eq!(s.complete("s2").0, 200);
}

// ---------------------------------------------------------------------------------------------
// S3: a real S3-compatible server (moto) from tests/sources/run.sh.

struct S3 {
    endpoint: String,
    key_id: String,
    secret: String,
    bucket: String,
}

impl S3 {
    /// The store from `LORAMUX_TEST_S3_*`, or `None` (printed) when the script did not set it.
    fn from_env(test: &str) -> Option<Self> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        match (var("LORAMUX_TEST_S3_ENDPOINT"), var("LORAMUX_TEST_S3_KEY_ID"), var("LORAMUX_TEST_S3_SECRET"), var("LORAMUX_TEST_S3_BUCKET")) {
            (Some(endpoint), Some(key_id), Some(secret), Some(bucket)) => Some(Self { endpoint, key_id, secret, bucket }),
            _ => {
                eprintln!("SKIPPED {test}: LORAMUX_TEST_S3_ENDPOINT etc. are not set; run tests/sources/run.sh (starts an S3 server)");
                None
            }
        }
    }

    fn env(&self, secret: &str) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", secret.to_string()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }

    /// Uploads `files` under `key/`.
    fn put(&self, key: &str, files: &[(&str, Vec<u8>)]) {
        use object_store::ObjectStore;
        let store = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_access_key_id(&self.key_id)
            .with_secret_access_key(&self.secret)
            .with_region("us-east-1")
            .with_allow_http(true)
            .with_bucket_name(&self.bucket)
            .build()
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            for (name, data) in files {
                store.put(&object_store::path::Path::from(format!("{key}/{name}")), data.clone().into()).await.unwrap();
            }
        });
    }

    fn put_adapter(&self, key: &str, name: &str) {
        let files: Vec<(&str, Vec<u8>)> =
            ["adapter_config.json", "adapter_model.safetensors"].into_iter().map(|f| (f, std::fs::read(adapter_dir(name).join(f)).unwrap())).collect();
        self.put(key, &files);
    }
}

fn run_prefix(test: &str) -> String {
    format!("run-{}-{}-{test}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis())
}

#[test]
fn s3_sources_credentials_errors_single_flight_and_cache() {
    let Some(s3) = S3::from_env("s3_sources_credentials_errors_single_flight_and_cache") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let reference = reference_texts(tmp.path());
    let prefix = run_prefix("s3");
    s3.put_adapter(&format!("{prefix}/adapters/a1"), "a");
    s3.put_adapter(&format!("{prefix}/adapters/sf"), "b");
    let cache = tmp.path().join("cache");
    let args = ["--lora-dir".to_string(), format!("s3://{}/{prefix}/adapters/", s3.bucket)];
    let s = Server::start(&args, &s3.env(&s3.secret), &cache, &tmp.path().join("s3.log"));

    // With the right credentials: an unknown name is fetched from the prefix and answers as
    // the local adapter.
    assert_eq!(s.complete("a1"), (200, reference["a"].clone()));
    assert_eq!(s.fetches(), 1.0);
    // A key that is not there: the 404 of any unknown adapter.
    let (st, body) = s.complete("nope");
    assert_eq!(st, 404, "{body}");
    assert!(body.contains("model_not_found"), "{body}");
    let (st, body) = s.load("x", &format!("s3://{}/{prefix}/adapters/nope", s3.bucket));
    assert_eq!(st, 404, "{body}");
    assert!(body.contains("S3"), "{body}");
    // A pin that does not match: refused, nothing cached; the right pin loads.
    let before = cache_contents(&cache);
    let uri = format!("s3://{}/{prefix}/adapters/a1", s3.bucket);
    let (st, body) = s.load("pinned", &format!("{uri}#sha256={}", "f".repeat(64)));
    assert_eq!(st, 400, "{body}");
    assert_eq!(cache_contents(&cache), before, "nothing cached after a mismatch");
    let concat = [std::fs::read(adapter_dir("a").join("adapter_config.json")).unwrap(), std::fs::read(adapter_dir("a").join("adapter_model.safetensors")).unwrap()].concat();
    let (st, body) = s.load("pinned", &format!("{uri}#sha256={}", sha256_hex(&concat)));
    assert_eq!(st, 200, "{body}");
    assert_eq!(s.complete("pinned"), (200, reference["a"].clone()));

    // Single flight: 16 concurrent first requests for a new adapter, one download.
    let fetches = s.fetches();
    let port = s.port;
    let answers: Vec<(u16, String)> = (0..16)
        .map(|_| {
            std::thread::spawn(move || {
                let body = r#"{"model": "sf", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}"#;
                common::http(port, "POST", "/v1/completions", "Content-Type: application/json\r\n", body.as_bytes(), Duration::from_secs(120)).unwrap()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    assert!(answers.iter().all(|(st, _)| *st == 200), "{answers:?}");
    assert_eq!(s.fetches() - fetches, 1.0, "16 concurrent first requests, one fetch");
    drop(s);

    // Restarted on the same cache: served without a download.
    let s = Server::start(&args, &s3.env(&s3.secret), &cache, &tmp.path().join("s3.log"));
    assert_eq!(s.complete("a1"), (200, reference["a"].clone()));
    assert_eq!(s.complete("sf"), (200, reference["b"].clone()));
    assert_eq!(s.fetches(), 0.0, "no download after a restart");
    assert_eq!(s.metric("loramux_lora_cache_hits_total", &[]), 2.0);
    drop(s);

    // A wrong secret: a 403 naming S3, nothing cached.
    let wrong = Server::start(&args, &s3.env("wrong-secret"), &tmp.path().join("cache-wrong"), &tmp.path().join("wrong.log"));
    let (st, body) = wrong.complete("a1");
    assert_eq!(st, 403, "{body}");
    assert!(body.contains("S3 refused access"), "{body}");
    assert_eq!(cache_contents(&tmp.path().join("cache-wrong")), (0, 0, 0));
    drop(wrong);

    // No AWS_* keys in the environment: the profile AWS_PROFILE names, from the shared
    // credentials file (keys) and config file (region, endpoint), as `aws configure` writes them.
    let credentials = tmp.path().join("credentials");
    let config = tmp.path().join("config");
    std::fs::write(&credentials, format!("[default]\naws_access_key_id = nobody\naws_secret_access_key = wrong\n\n[loramux-test]\naws_access_key_id = {}\naws_secret_access_key = {}\n", s3.key_id, s3.secret)).unwrap();
    std::fs::write(&config, format!("[profile loramux-test]\nregion = us-east-1\nendpoint_url = {}\n", s3.endpoint)).unwrap();
    let files = |profile: &str| {
        vec![
            ("AWS_SHARED_CREDENTIALS_FILE", credentials.display().to_string()),
            ("AWS_CONFIG_FILE", config.display().to_string()),
            ("AWS_PROFILE", profile.to_string()),
        ]
    };
    let from_files = Server::start(&args, &files("loramux-test"), &tmp.path().join("cache-files"), &tmp.path().join("files.log"));
    assert_eq!(from_files.complete("a1"), (200, reference["a"].clone()));
    assert_eq!(from_files.fetches(), 1.0);
    drop(from_files);
    // A profile in neither file: a 500 naming it (the operator's setting), nothing cached.
    let unknown = Server::start(&args, &files("nobody"), &tmp.path().join("cache-unknown"), &tmp.path().join("unknown.log"));
    let (st, body) = unknown.complete("a1");
    assert_eq!(st, 500, "{body}");
    assert!(body.contains("AWS profile `nobody`"), "{body}");
    assert_eq!(cache_contents(&tmp.path().join("cache-unknown")), (0, 0, 0));
}

#[test]
fn s3_store_dying_mid_download_leaves_nothing() {
    // An "S3 endpoint" that announces an object and dies part-way through it (needs no moto).
    let tmp = tempfile::tempdir().unwrap();
    let fake = Files::start(None);
    let mut body = std::fs::read(adapter_dir("a").join("adapter_config.json")).unwrap();
    body.resize(300_000, b' ');
    fake.put("/bkt/p/x/adapter_config.json", Reply::Truncated { body, sent: 20_000 });
    let env = [
        ("AWS_ENDPOINT_URL", fake.url("")),
        ("AWS_ACCESS_KEY_ID", "k".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "s".to_string()),
        ("AWS_REGION", "us-east-1".to_string()),
        ("AWS_ALLOW_HTTP", "true".to_string()),
    ];
    let cache = tmp.path().join("cache");
    let s = Server::start(&["--lora-dir".into(), "s3://bkt/p".into()], &env, &cache, &tmp.path().join("die.log"));
    let (st, body) = s.complete("x");
    assert_eq!(st, 502, "{body}");
    assert!(body.contains("S3"), "{body}");
    assert_eq!(cache_contents(&cache), (0, 0, 0), "no half adapter in the cache");
    assert!(fake.requests.load(Ordering::SeqCst) >= 1);
}
