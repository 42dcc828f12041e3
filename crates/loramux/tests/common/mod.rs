//! What the tests that run the real `loramux` binary share: the repository, a free port, and
//! one raw HTTP/1.1 request (a test may cut a connection or kill the server mid-request, so no
//! client library stands between it and the socket).

#![allow(dead_code)] // each test binary uses its own part

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// A loopback port nobody listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One request on its own connection (`headers`: extra header lines, each ending in
/// `\r\n`): status and body.
pub fn http(port: u16, method: &str, path: &str, headers: &str, body: &[u8], timeout: Duration) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(timeout))?;
    write!(s, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{headers}Content-Length: {}\r\n\r\n", body.len())?;
    s.write_all(body)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
}

/// A `loramux serve` process on `port`, killed when dropped.
pub struct ServeProcess {
    pub child: Child,
    pub port: u16,
}

impl ServeProcess {
    /// Spawns `cmd` (a `loramux serve` listening on `port`, writing to `log`) and waits up to
    /// 60 s for `/health`; a server that exits first fails the test with its log.
    pub fn spawn_healthy(mut cmd: Command, port: u16, log: &Path) -> Self {
        let mut server = Self { child: cmd.spawn().expect("loramux runs"), port };
        let t = Instant::now();
        while !matches!(http(port, "GET", "/health", "", &[], Duration::from_secs(60)), Ok((200, _))) {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("the server exited during startup ({status}):\n{}", std::fs::read_to_string(log).unwrap_or_default());
            }
            assert!(t.elapsed() < Duration::from_secs(60), "no /health within 60 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
