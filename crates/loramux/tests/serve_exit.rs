//! `loramux serve` exits on its own, with a non-zero status, when its batch loop dies, so
//! an orchestrator restarts it instead of keeping a live HTTP front over a dead engine.
//! The fault is injected with the hidden `--debug-fault admit=ADAPTER` flag and triggered
//! over HTTP.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{free_port, repo};

/// The server process, killed if the test ends before it exits.
struct Server {
    child: Child,
    log: PathBuf,
}

impl Server {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One JSON request on its own connection: status and body.
fn http(port: u16, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    common::http(port, method, path, "Content-Type: application/json\r\n", body.as_bytes(), Duration::from_secs(20))
}

#[test]
fn serve_exits_non_zero_when_the_batch_loop_dies() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("serve.log");
    let out = std::fs::File::create(&log).unwrap();
    let err = out.try_clone().unwrap();
    let port = free_port();
    let tiny = repo().join("fixtures/tiny/llama");
    let adapter = format!("a={}", tiny.join("adapters/a").display());
    let child = Command::new(env!("CARGO_BIN_EXE_loramux"))
        .args(["serve", "--model", tiny.to_str().unwrap(), "--served-model-name", "tiny", "--lora-modules", &adapter])
        .args(["--debug-fault", "admit=a", "--host", "127.0.0.1", "--port", &port.to_string()])
        .env("LORAMUX_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("loramux runs");
    let mut server = Server { child, log };

    let t = Instant::now();
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            panic!("the server exited during startup ({status}):\n{}", server.log());
        }
        if matches!(http(port, "GET", "/health", ""), Ok((200, _))) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no /health within 60 s:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let (st, body) = http(port, "POST", "/v1/completions", r#"{"model": "tiny", "prompt": "hi", "max_tokens": 2}"#).unwrap();
    assert_eq!(st, 200, "the base model serves before the fault: {body}");
    assert!(server.child.try_wait().unwrap().is_none(), "still running before the fault");

    // The fault: admitting a request on adapter a panics in the batch loop.
    let (st, body) = http(port, "POST", "/v1/completions", r#"{"model": "a", "prompt": "hi", "max_tokens": 2}"#).unwrap();
    assert!((500..600).contains(&st), "the request that kills the loop gets a 5xx, got {st}: {body}");
    assert!(body.contains("\"error\""), "an OpenAI error body: {body}");

    let t = Instant::now();
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "the server still runs {:?} after its batch loop died:\n{}", t.elapsed(), server.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success(), "the server exits non-zero, got {status}:\n{}", server.log());
    assert!(status.code().is_some(), "it exited on its own, not by a signal: {status}");
    assert!(server.log().contains("batch loop"), "the log says why:\n{}", server.log());
    assert!(http(port, "GET", "/health", "").is_err(), "nothing listens on the port any more");
}
