//! Test helpers: start the real server on a loopback port and talk HTTP to it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use loramux_engine::ModelLocation;
use loramux_server::{Server, Settings};
use serde_json::{json, Value};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

pub fn fixture(arch: &str) -> PathBuf {
    repo().join("fixtures/tiny").join(arch)
}

pub fn fixture_adapter(arch: &str, name: &str) -> PathBuf {
    fixture(arch).join("adapters").join(name)
}

/// Settings for a tiny fixture model served as `tiny` on 127.0.0.1:0.
pub fn tiny_settings() -> Settings {
    let mut s = Settings::for_model("tiny");
    s.host = "127.0.0.1".into();
    s.port = 0;
    s.shutdown_timeout = Duration::from_secs(5);
    s
}

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("LORAMUX_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

pub struct TestServer {
    pub server: Option<Server>,
    pub url: String,
    pub http: reqwest::Client,
    pub key: Option<String>,
}

impl TestServer {
    pub async fn start(location: ModelLocation, settings: Settings) -> Self {
        init_logs();
        let server = Server::start(location, settings).await.expect("server starts");
        let url = server.url();
        Self { server: Some(server), url, http: reqwest::Client::new(), key: None }
    }

    pub async fn tiny(arch: &str, settings: Settings) -> Self {
        Self::start(ModelLocation::HfDir(fixture(arch)), settings).await
    }

    pub fn with_key(mut self, key: &str) -> Self {
        self.key = Some(key.to_string());
        self
    }

    pub async fn shutdown(mut self) {
        self.server.take().unwrap().shutdown().await.expect("clean shutdown");
    }

    fn auth(&self, rb: reqwest::RequestBuilder, key: Option<&str>) -> reqwest::RequestBuilder {
        match key.or(self.key.as_deref()) {
            Some(k) => rb.header("authorization", format!("Bearer {k}")),
            None => rb,
        }
    }

    /// POSTs raw bytes; returns status and body text.
    pub async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>, key: Option<&str>) -> (u16, String) {
        self.try_post_raw(path, body, key).await.expect("request sent")
    }

    /// Like `post_raw`, but a failed send is returned: a server that answers 413 to an
    /// oversized body closes the connection, and a client still writing it may see a broken
    /// pipe instead of the response.
    pub async fn try_post_raw(&self, path: &str, body: impl Into<reqwest::Body>, key: Option<&str>) -> reqwest::Result<(u16, String)> {
        let rb = self.http.post(format!("{}{path}", self.url)).header("content-type", "application/json").body(body);
        let r = self.auth(rb, key).send().await?;
        let status = r.status().as_u16();
        Ok((status, r.text().await.unwrap_or_default()))
    }

    /// POSTs JSON; returns status and parsed body (`Value::String` when not JSON).
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_key(path, body, None).await
    }

    pub async fn post_key(&self, path: &str, body: &Value, key: Option<&str>) -> (u16, Value) {
        let (status, text) = self.post_raw(path, serde_json::to_vec(body).unwrap(), key).await;
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let r = self.auth(self.http.get(format!("{}{path}", self.url)), None).send().await.expect("request sent");
        let status = r.status().as_u16();
        (status, r.text().await.unwrap_or_default())
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let (s, t) = self.get(path).await;
        (s, serde_json::from_str(&t).unwrap_or(Value::String(t)))
    }

    /// A streaming request: every `data:` payload in order (the last is "[DONE]" when complete).
    pub async fn stream(&self, path: &str, body: &Value) -> (u16, Vec<String>) {
        let (status, text) = self.stream_raw(path, body).await;
        if status != 200 {
            return (status, vec![text]);
        }
        let mut events = Vec::new();
        for frame in text.split("\n\n").filter(|f| !f.is_empty()) {
            let payload = frame.strip_prefix("data: ").unwrap_or_else(|| panic!("SSE frame without 'data: ': {frame:?}"));
            events.push(payload.to_string());
        }
        (status, events)
    }

    /// A streaming request with named events (`event:` then `data:` lines, as the Responses
    /// API sends them): each event's name and parsed data, in order.
    pub async fn stream_events(&self, path: &str, body: &Value) -> (u16, Vec<(String, Value)>) {
        let (status, frames) = self.stream_raw(path, body).await;
        let events = frames
            .split("\n\n")
            .filter(|f| !f.is_empty() && status == 200)
            .map(|f| {
                let (event, data) = f.split_once('\n').unwrap_or_else(|| panic!("frame without data: {f:?}"));
                let name = event.strip_prefix("event: ").unwrap_or_else(|| panic!("frame without 'event: ': {f:?}"));
                let data = data.strip_prefix("data: ").unwrap_or_else(|| panic!("frame without 'data: ': {f:?}"));
                (name.to_string(), serde_json::from_str(data).unwrap())
            })
            .collect();
        (status, events)
    }

    /// A streaming request's status and whole body.
    async fn stream_raw(&self, path: &str, body: &Value) -> (u16, String) {
        let rb = self.http.post(format!("{}{path}", self.url)).header("content-type", "application/json").body(serde_json::to_vec(body).unwrap());
        let mut r = self.auth(rb, None).send().await.expect("request sent");
        let status = r.status().as_u16();
        let mut text = String::new();
        while let Some(chunk) = r.chunk().await.expect("body chunk") {
            text.push_str(std::str::from_utf8(&chunk).expect("utf-8 SSE"));
        }
        (status, text)
    }

    /// Greedy chat text for `model`.
    pub async fn chat_text(&self, model: &str, content: &str, max_tokens: usize) -> String {
        let (status, v) = self.post("/v1/chat/completions", &chat_body(model, content, max_tokens)).await;
        assert_eq!(status, 200, "{v}");
        v["choices"][0]["message"]["content"].as_str().unwrap().to_string()
    }

    /// Greedy completion text for `model`.
    pub async fn completion_text(&self, model: &str, prompt: &str, max_tokens: usize) -> String {
        let (status, v) = self.post("/v1/completions", &completion_body(model, prompt, max_tokens)).await;
        assert_eq!(status, 200, "{v}");
        v["choices"][0]["text"].as_str().unwrap().to_string()
    }

    /// The value of one Prometheus series (exact name with labels), 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let (_, text) = self.get("/metrics").await;
        metric_value(&text, series)
    }
}

pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).map(|v| v.trim().parse::<f64>().unwrap()))
        .unwrap_or(0.0)
}

pub fn chat_body(model: &str, content: &str, max_tokens: usize) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

pub fn completion_body(model: &str, prompt: &str, max_tokens: usize) -> Value {
    json!({ "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0 })
}

/// Asserts an OpenAI-style error body.
pub fn assert_error(status: u16, body: &Value, want_status: u16, what: &str) {
    assert_eq!(status, want_status, "{what}: {body}");
    let e = &body["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: no error.message in {body}");
    assert!(e["type"].is_string(), "{what}: no error.type in {body}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{what}: error lacks param/code: {body}");
}

/// Copies an adapter directory.
pub fn copy_adapter(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

/// One part of a multipart/form-data body: name, file name, bytes.
pub type Part<'a> = (&'a str, Option<&'a str>, &'a [u8]);

/// A multipart/form-data body and its content type.
pub fn multipart(parts: &[Part]) -> (String, Vec<u8>) {
    let boundary = "loramux-test-boundary-7f3a";
    let mut body = Vec::new();
    for (name, filename, data) in parts {
        let fname = filename.map(|f| format!("; filename=\"{f}\"")).unwrap_or_default();
        body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"{fname}\r\n\r\n").as_bytes());
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// The parts of a PEFT adapter directory, read.
pub fn peft_parts(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    (std::fs::read(dir.join("adapter_config.json")).unwrap(), std::fs::read(dir.join("adapter_model.safetensors")).unwrap())
}

impl TestServer {
    /// POSTs a multipart upload to `/v1/adapters` with `key`: status and parsed body.
    pub async fn upload(&self, key: &str, parts: &[Part<'_>]) -> (u16, Value) {
        let (ct, body) = multipart(parts);
        let r = self
            .http
            .post(format!("{}/v1/adapters", self.url))
            .header("content-type", ct)
            .header("authorization", format!("Bearer {key}"))
            .body(body)
            .send()
            .await
            .expect("request sent");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// Sends `method path` with `key` and no body: status and raw body.
    pub async fn call_key(&self, method: reqwest::Method, path: &str, key: &str) -> (u16, String) {
        let r = self.http.request(method, format!("{}{path}", self.url)).header("authorization", format!("Bearer {key}")).send().await.expect("request sent");
        let status = r.status().as_u16();
        (status, r.text().await.unwrap_or_default())
    }
}
