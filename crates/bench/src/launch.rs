//! Starting a loramux server for a run: a child process on a free loopback port, its log
//! kept in a file, stopped with SIGTERM when the run ends. Its memory is read like any
//! server's, from its `/metrics` ([`crate::client::MetricsSnapshot::peak_resident_bytes`]).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::BenchError;

/// A loramux server this run started.
pub struct LaunchedServer {
    child: Child,
    url: String,
    log: PathBuf,
}

/// How long a server may take to load its model and answer `/health`.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(600);

fn free_port() -> Result<u16, BenchError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| BenchError::Launch(format!("no free port: {e}")))?;
    Ok(listener.local_addr().map_err(|e| BenchError::Launch(e.to_string()))?.port())
}

impl LaunchedServer {
    /// Runs `exe serve ARGS --host 127.0.0.1 --port P` and waits until `/health` answers.
    /// The server's output goes to `log`; if it exits early, the error carries the log's tail.
    pub async fn start(exe: &Path, args: &[String], log: &Path) -> Result<Self, BenchError> {
        let port = free_port()?;
        let log_file = std::fs::File::create(log).map_err(|e| BenchError::Io { path: log.to_path_buf(), source: e })?;
        let err_file = log_file.try_clone().map_err(|e| BenchError::Io { path: log.to_path_buf(), source: e })?;
        let child = Command::new(exe)
            .arg("serve")
            .args(args)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(err_file)
            .spawn()
            .map_err(|e| BenchError::Launch(format!("cannot run {}: {e}", exe.display())))?;
        let mut server = Self { child, url: format!("http://127.0.0.1:{port}"), log: log.to_path_buf() };
        let http = reqwest::Client::new();
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(BenchError::Launch(format!(
                    "the server exited ({status}) during startup; its log ({}) ends:\n{}",
                    server.log.display(),
                    server.log_tail(20)
                )));
            }
            if let Ok(r) = http.get(format!("{}/health", server.url)).send().await {
                if r.status().is_success() {
                    return Ok(server);
                }
            }
            if started.elapsed() > STARTUP_TIMEOUT {
                return Err(BenchError::Launch(format!(
                    "the server did not answer /health within {} s; log: {}",
                    STARTUP_TIMEOUT.as_secs(),
                    server.log.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The server's base URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The last `lines` lines of the server's log.
    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// SIGTERM (graceful shutdown), then SIGKILL if it has not exited after 10 s.
    pub fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LaunchedServer {
    fn drop(&mut self) {
        self.terminate();
    }
}
