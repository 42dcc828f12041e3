//! The web page (issue #25) over HTTP: `GET /` serves the page and its two assets without a
//! key while the API they call still needs one, the assets name nothing off this server, and
//! `--disable-web-ui` leaves `/` a 404 like any unknown path. The page in a real browser:
//! `tests/web/run.sh`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;

use common::{free_port, repo, ServeProcess};

/// A `loramux serve` on the tiny fixture model with adapter `a` and an API key, killed on drop.
struct Server {
    process: ServeProcess,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serve.log");
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let port = free_port();
        let tiny = repo().join("fixtures/tiny/llama");
        let adapter = format!("a={}", tiny.join("adapters/a").display());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_loramux"));
        cmd.args(["serve", "--model", tiny.to_str().unwrap(), "--served-model-name", "tiny", "--lora-modules", &adapter])
            .args(["--api-key", "web-key", "--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--adapter-store", dir.path().join("store").to_str().unwrap()])
            .args(extra)
            .env("LORAMUX_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        Server { process: ServeProcess::spawn_healthy(cmd, port, &log), _dir: dir }
    }

    /// `GET path` with extra header lines: status, headers (lower-cased names) and body.
    fn get(&self, path: &str, headers: &str) -> std::io::Result<Reply> {
        let mut s = TcpStream::connect(("127.0.0.1", self.process.port))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{headers}\r\n")?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        let text = String::from_utf8_lossy(&out).to_string();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let headers = head.lines().skip(1).filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())).collect();
        Ok(Reply { status, headers, body: body.to_string() })
    }
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> &str {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).unwrap_or("")
    }
}

const ASSETS: [(&str, &str); 3] = [("/", "text/html"), ("/web/app.js", "text/javascript"), ("/web/style.css", "text/css")];

#[test]
fn the_page_is_served_and_names_nothing_off_the_server() {
    let server = Server::start(&[]);
    for (path, kind) in ASSETS {
        let r = server.get(path, "").unwrap();
        assert_eq!(r.status, 200, "GET {path} without a key: {}", r.body);
        assert!(r.header("content-type").starts_with(kind), "{path}: {}", r.header("content-type"));
        assert!(r.header("content-security-policy").contains("connect-src 'self'"), "{path}: {:?}", r.headers);
        assert!(r.body.len() > 500, "{path}: {}", r.body);
        // Nothing absolute: every URL in the page is relative to this server.
        for off_host in ["http://", "https://", "src=\"//", "href=\"//", "url(//", "fetch(\"/", "@import"] {
            assert!(!r.body.contains(off_host), "{path} contains {off_host:?}");
        }
    }
    let page = server.get("/", "").unwrap().body;
    assert!(page.contains("<title>loramux</title>") && page.contains("src=\"web/app.js\"") && page.contains("href=\"web/style.css\""));
    let js = server.get("/web/app.js", "").unwrap().body;
    for call in ["\"v1/models\"", "\"v1/lora_adapters\"", "\"metrics\"", "\"v1/chat/completions\"", "\"v1/completions\""] {
        assert!(js.contains(call), "app.js calls {call}");
    }

    // The data the page reads follows the API key.
    assert_eq!(server.get("/v1/models", "").unwrap().status, 401);
    assert_eq!(server.get("/v1/lora_adapters", "").unwrap().status, 401);
    let r = server.get("/v1/lora_adapters", "Authorization: Bearer web-key\r\n").unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["base"]["id"], "tiny", "{v}");
    let a = &v["data"][0];
    assert_eq!((a["id"].as_str(), a["resident"].as_bool(), a["pinned"].as_bool(), a["merged"].as_bool()), (Some("a"), Some(true), Some(false), Some(false)), "{v}");
    assert!(a["rank"].as_u64().is_some_and(|r| r > 0) && a["bytes"].as_u64().is_some_and(|b| b > 0), "{v}");
    assert!(a.get("path").is_none(), "no file paths for key holders: {v}");
    assert_eq!((v["admin"].as_bool(), v["lora_updates"].as_bool()), (Some(false), Some(false)), "{v}");
}

#[test]
fn disable_web_ui_leaves_only_the_api() {
    let server = Server::start(&["--disable-web-ui"]);
    for (path, _) in ASSETS {
        let r = server.get(path, "").unwrap();
        assert_eq!(r.status, 404, "GET {path} with --disable-web-ui: {}", r.body);
        assert!(r.body.contains("\"error\""), "an OpenAI error body: {}", r.body);
    }
    assert_eq!(server.get("/v1/models", "Authorization: Bearer web-key\r\n").unwrap().status, 200);
}
