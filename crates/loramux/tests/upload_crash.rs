//! A server SIGKILLed in the middle of an adapter upload restarts with the whole adapter or
//! none of it (issue #21): the real `loramux serve` binary, a ~10 MB upload (adapter a of the
//! tiny fixture padded with safetensors metadata), killed at several points (while the body
//! is still arriving, just after its last byte, while it is written and checked), restarted
//! on the same `--adapter-store`. After each restart the upload is either listed and serves
//! adapter a's text, or not listed; the store holds no temporary and no unreferenced blob.

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;

use common::{free_port, repo};

/// `loramux serve` on the tiny model with adapter a, tenant `t` (key `k`), the given store.
type Server = common::ServeProcess;

impl Server {
    fn start(dir: &Path) -> Self {
        let tiny = repo().join("fixtures/tiny/llama");
        let tenants = dir.join("tenants.toml");
        std::fs::write(&tenants, "[[tenants]]\nname = \"t\"\napi_keys = [\"k\"]\nadapters = [\"a\"]\n").unwrap();
        let port = free_port();
        let log_path = dir.join("serve.log");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_loramux"));
        cmd.args(["serve", "--model", tiny.to_str().unwrap(), "--served-model-name", "tiny"])
            .arg("--lora-modules")
            .arg(format!("a={}", tiny.join("adapters/a").display()))
            .arg("--tenants")
            .arg(&tenants)
            .arg("--adapter-store")
            .arg(dir.join("store"))
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .env("LORAMUX_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        Self::spawn_healthy(cmd, port, &log_path)
    }
}

/// One request with tenant t's key on its own connection: status and body.
fn http(port: u16, method: &str, path: &str, ct: &str, body: &[u8]) -> std::io::Result<(u16, String)> {
    common::http(port, method, path, &format!("Authorization: Bearer k\r\nContent-Type: {ct}\r\n"), body, Duration::from_secs(30))
}

/// Adapter a's safetensors with `pad` bytes of `__metadata__` in its header: the same
/// tensors (offsets are relative to the data), a bigger file.
fn padded_weights(pad: usize) -> Vec<u8> {
    let bytes = std::fs::read(repo().join("fixtures/tiny/llama/adapters/a/adapter_model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header.insert("__metadata__".into(), serde_json::json!({"pad": "x".repeat(pad)}));
    let mut h = serde_json::to_vec(&header).unwrap();
    h.resize(h.len().div_ceil(8) * 8, b' ');
    [&(h.len() as u64).to_le_bytes()[..], &h, &bytes[8 + n..]].concat()
}

fn multipart(weights: &[u8]) -> (String, Vec<u8>) {
    let config = std::fs::read(repo().join("fixtures/tiny/llama/adapters/a/adapter_config.json")).unwrap();
    let mut body = Vec::new();
    for (name, data) in [("adapter_config.json", &config[..]), ("adapter_model.safetensors", weights), ("name", b"big")] {
        body.extend_from_slice(format!("--B0undary\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes());
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"--B0undary--\r\n");
    ("multipart/form-data; boundary=B0undary".into(), body)
}

fn chat(port: u16, model: &str) -> (u16, String) {
    let body = format!(r#"{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello there"}}], "max_tokens": 6, "temperature": 0}}"#);
    http(port, "POST", "/v1/chat/completions", "application/json", body.as_bytes()).unwrap()
}

fn content(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["choices"][0]["message"]["content"].as_str().unwrap().to_string()
}

/// The store after a restart: no temporaries, every blob referenced by an index entry.
fn check_store(store: &Path) -> bool {
    assert!(!store.join("tmp").exists() || std::fs::read_dir(store.join("tmp")).unwrap().next().is_none(), "a temporary survived");
    let blobs: Vec<String> = std::fs::read_dir(store.join("blobs")).map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default();
    let index = store.join("tenants/t/big.json");
    if index.exists() {
        let e: serde_json::Value = serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
        assert_eq!(blobs, [e["sha256"].as_str().unwrap()], "only the entry's blob");
        true
    } else {
        assert!(blobs.is_empty(), "an unreferenced blob survived: {blobs:?}");
        false
    }
}

#[test]
fn sigkill_during_an_upload_leaves_the_whole_adapter_or_none() {
    let tmp = tempfile::tempdir().unwrap();
    let (ct, body) = multipart(&padded_weights(10 << 20));
    let mut outcomes = Vec::new();
    // Kill points: mid-body (a part sent, the rest withheld), then after the last byte.
    for (i, kill_after_ms) in [None, Some(0u64), Some(5), Some(20), Some(60), Some(150), Some(400)].into_iter().enumerate() {
        let dir = tmp.path().join(format!("run{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = Server::start(&dir);
        let (_, reference) = chat(server.port, "a");
        let port = server.port;
        let mut sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(sock, "POST /v1/adapters HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n\r\n", body.len()).unwrap();
        match kill_after_ms {
            None => sock.write_all(&body[..body.len() / 2]).unwrap(),
            Some(ms) => {
                sock.write_all(&body).unwrap();
                std::thread::sleep(Duration::from_millis(ms));
            }
        }
        server.child.kill().unwrap(); // SIGKILL
        server.child.wait().unwrap();
        drop(sock);
        let server = Server::start(&dir);
        let kept = check_store(&dir.join("store"));
        let (st, list) = http(server.port, "GET", "/v1/adapters", "", &[]).unwrap();
        assert_eq!(st, 200, "{list}");
        assert_eq!(list.contains("\"t/big\""), kept, "listed iff stored: {list}");
        let (st, answer) = chat(server.port, "t/big");
        if kept {
            assert_eq!((st, content(&answer)), (200, content(&reference)), "the whole adapter is served");
        } else {
            assert_eq!(st, 404, "{answer}");
        }
        outcomes.push((kill_after_ms, kept));
    }
    eprintln!("kill point (ms after the last byte; None: mid-body) -> adapter kept: {outcomes:?}");
    assert!(!outcomes[0].1, "an upload killed mid-body is never kept");
}
