//! A small OpenAI-compatible client for load generation: every request is streamed so
//! time to first token and inter-token latency are measured at the client, and a failed
//! request becomes a sample with its error instead of ending the run.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::BenchError;

/// One server to talk to.
#[derive(Clone)]
pub struct Endpoint {
    base_url: String,
    api_key: Option<String>,
    http: reqwest::Client,
}

/// One chat request as the benchmarks send it.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct ChatRequest {
    /// The base model's name or an adapter's name (vLLM's convention).
    pub model: String,
    pub prompt: String,
    pub max_tokens: usize,
    pub temperature: f64,
    /// Generate exactly `max_tokens` (vLLM's extension) so latency compares like with like.
    pub ignore_eos: bool,
}

/// What one request measured, kept raw in every result file.
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
pub struct Sample {
    /// Position in the run's request sequence.
    pub index: usize,
    pub model: String,
    /// Seconds from the start of the run to sending the request.
    pub start_s: f64,
    /// Send to last byte.
    pub latency_ms: f64,
    /// Send to the first generated text.
    pub ttft_ms: Option<f64>,
    /// Gaps between consecutive streamed chunks carrying text.
    pub itl_ms: Vec<f64>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub finish_reason: Option<String>,
    pub ok: bool,
    /// HTTP status and message when the request failed.
    pub error: Option<String>,
}

impl Sample {
    /// Mean gap between tokens after the first, the usual "time per output token".
    pub fn tpot_ms(&self) -> Option<f64> {
        let (ttft, n) = (self.ttft_ms?, self.completion_tokens?);
        (n > 1).then(|| (self.latency_ms - ttft) / (n - 1) as f64)
    }
}

/// A parsed Prometheus text exposition: `(name, labels, value)` rows.
#[derive(Clone, Debug, Default)]
pub struct MetricsSnapshot {
    rows: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl MetricsSnapshot {
    /// Parses the text format, skipping comments and lines it cannot read.
    pub fn parse(text: &str) -> Self {
        let mut rows = Vec::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let (series, value) = match line.rsplit_once(' ') {
                Some(x) => x,
                None => continue,
            };
            let Ok(value) = value.parse::<f64>() else { continue };
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, parse_labels(rest.trim_end_matches('}'))),
                None => (series, BTreeMap::new()),
            };
            rows.push((name.to_string(), labels, value));
        }
        Self { rows }
    }

    /// Sum of every series of `name` (all label values), if the metric exists.
    pub fn sum(&self, name: &str) -> Option<f64> {
        let mut found = false;
        let total = self
            .rows
            .iter()
            .filter(|(n, _, _)| n == name)
            .inspect(|_| found = true)
            .map(|(_, _, v)| v)
            .sum();
        found.then_some(total)
    }

    /// The value of the series of `name` whose label `key` is `value`.
    pub fn get(&self, name: &str, key: &str, value: &str) -> Option<f64> {
        self.rows
            .iter()
            .find(|(n, l, _)| n == name && l.get(key).map(String::as_str) == Some(value))
            .map(|(_, _, v)| *v)
    }
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, e)) = chars.next() {
                        value.push(if e == 'n' { '\n' } else { e });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                _ => value.push(c),
            }
        }
        out.insert(key.trim_start_matches(',').trim().to_string(), value);
        rest = &after[end..];
    }
    out
}

impl Endpoint {
    /// A client for `base_url` (e.g. `http://127.0.0.1:8000`), with a bearer key if given.
    pub fn new(base_url: &str, api_key: Option<String>) -> Self {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .timeout(Duration::from_secs(600))
            .build()
            .expect("a default HTTP client builds");
        Self { base_url: base_url.trim_end_matches('/').to_string(), api_key, http }
    }

    /// The server's base URL.
    pub fn url(&self) -> &str {
        &self.base_url
    }

    fn auth(&self, rb: reqwest::RequestBuilder, key: Option<&str>) -> reqwest::RequestBuilder {
        match key.or(self.api_key.as_deref()) {
            Some(k) => rb.header("authorization", format!("Bearer {k}")),
            None => rb,
        }
    }

    /// `GET /v1/models`: the `data` entries, or why they could not be read.
    async fn model_entries(&self) -> Result<Vec<Value>, BenchError> {
        let url = format!("{}/v1/models", self.base_url);
        let resp = self
            .auth(self.http.get(&url), None)
            .send()
            .await
            .map_err(|e| BenchError::Unreachable { url: url.clone(), message: e.to_string() })?;
        let status = resp.status();
        let body: Value = resp
            .json()
            .await
            .map_err(|e| BenchError::Server(format!("GET {url}: {status}: not JSON: {e}")))?;
        if !status.is_success() {
            return Err(BenchError::Server(format!("GET {url}: {status}: {body}")));
        }
        Ok(body["data"].as_array().cloned().unwrap_or_default())
    }

    /// The ids the server serves (base and adapters).
    pub async fn models(&self) -> Result<Vec<String>, BenchError> {
        Ok(self.model_entries().await?.iter().filter_map(|m| m["id"].as_str().map(str::to_string)).collect())
    }

    /// The base model's id: the first model `/v1/models` lists without a `parent`.
    pub async fn base_model(&self) -> Result<String, BenchError> {
        let entries = self.model_entries().await?;
        entries
            .iter()
            .find(|m| m["parent"].is_null())
            .or(entries.first())
            .and_then(|m| m["id"].as_str().map(str::to_string))
            .ok_or_else(|| BenchError::Server(format!("GET {}/v1/models: no model listed", self.base_url)))
    }

    /// Fails with the list of available models unless the server serves every `wanted` name.
    pub async fn require_models(&self, wanted: &[&str]) -> Result<Vec<String>, BenchError> {
        let have = self.models().await?;
        let missing: Vec<&str> = wanted.iter().copied().filter(|w| !have.iter().any(|h| h == w)).collect();
        if !missing.is_empty() {
            return Err(BenchError::ModelNotFound { missing: missing.join(", "), available: have.join(", ") });
        }
        Ok(have)
    }

    /// `GET /metrics`, if the server exposes Prometheus metrics.
    pub async fn metrics(&self) -> Option<MetricsSnapshot> {
        let resp = self.http.get(format!("{}/metrics", self.base_url)).send().await.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        Some(MetricsSnapshot::parse(&resp.text().await.ok()?))
    }

    /// Sends one streamed chat request and measures it; never fails.
    pub async fn chat(&self, req: &ChatRequest, index: usize, run_start: Instant) -> Sample {
        let mut sample = Sample { index, model: req.model.clone(), ..Default::default() };
        let body = json!({
            "model": req.model,
            "messages": [{"role": "user", "content": req.prompt}],
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
            "ignore_eos": req.ignore_eos,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        let sent = Instant::now();
        sample.start_s = sent.duration_since(run_start).as_secs_f64();
        let outcome = self.stream_chat(&body, sent, &mut sample).await;
        sample.latency_ms = sent.elapsed().as_secs_f64() * 1e3;
        match outcome {
            Ok(()) => sample.ok = true,
            Err(e) => sample.error = Some(e),
        }
        sample
    }

    async fn stream_chat(&self, body: &Value, sent: Instant, sample: &mut Sample) -> Result<(), String> {
        let url = format!("{}/v1/chat/completions", self.base_url);
        let mut resp = self
            .auth(self.http.post(&url), None)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| format!("send: {e}"))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or(text);
            return Err(format!("HTTP {}: {message}", status.as_u16()));
        }
        let mut buf = Vec::new();
        let mut last_token: Option<Instant> = None;
        let mut done = false;
        while let Some(chunk) = resp.chunk().await.map_err(|e| format!("stream: {e}"))? {
            let now = Instant::now();
            buf.extend_from_slice(&chunk);
            while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = buf.drain(..pos + 2).collect();
                let text = String::from_utf8_lossy(&event);
                for data in text.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim) {
                    if data == "[DONE]" {
                        done = true;
                        continue;
                    }
                    let v: Value = serde_json::from_str(data).map_err(|e| format!("bad event {data}: {e}"))?;
                    if let Some(err) = v.get("error") {
                        return Err(format!("error event: {err}"));
                    }
                    let choice = &v["choices"][0];
                    let has_text = choice["delta"]["content"].as_str().is_some_and(|s| !s.is_empty());
                    if has_text {
                        match last_token {
                            None => sample.ttft_ms = Some(now.duration_since(sent).as_secs_f64() * 1e3),
                            Some(prev) => sample.itl_ms.push(now.duration_since(prev).as_secs_f64() * 1e3),
                        }
                        last_token = Some(now);
                    }
                    if let Some(r) = choice["finish_reason"].as_str() {
                        sample.finish_reason = Some(r.to_string());
                    }
                    if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                        sample.prompt_tokens = u["prompt_tokens"].as_u64();
                        sample.completion_tokens = u["completion_tokens"].as_u64();
                    }
                }
            }
        }
        if !done {
            return Err("stream ended without [DONE]".into());
        }
        Ok(())
    }

    /// `POST /v1/load_lora_adapter` with the admin key; returns the round-trip seconds.
    pub async fn load_adapter(&self, name: &str, path: &str, admin_key: Option<&str>) -> Result<f64, BenchError> {
        self.admin_post("load_lora_adapter", json!({"lora_name": name, "lora_path": path}), admin_key).await
    }

    /// `POST /v1/unload_lora_adapter` with the admin key; returns the round-trip seconds.
    pub async fn unload_adapter(&self, name: &str, admin_key: Option<&str>) -> Result<f64, BenchError> {
        self.admin_post("unload_lora_adapter", json!({"lora_name": name}), admin_key).await
    }

    async fn admin_post(&self, what: &str, body: Value, admin_key: Option<&str>) -> Result<f64, BenchError> {
        let url = format!("{}/v1/{what}", self.base_url);
        let t = Instant::now();
        let resp = self
            .auth(self.http.post(&url), admin_key)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| BenchError::Unreachable { url: url.clone(), message: e.to_string() })?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let secs = t.elapsed().as_secs_f64();
        if !status.is_success() {
            return Err(BenchError::Server(format!("POST {url}: HTTP {}: {text}", status.as_u16())));
        }
        Ok(secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prometheus_text_with_labels() {
        let m = MetricsSnapshot::parse(
            "# HELP x y\nloramux_adapter_loads_total 3\nvllm:lora_requests_info{max_lora=\"8\",running_lora_adapters=\"a,b\",waiting_lora_adapters=\"\"} 1.7e9\nloramux_requests_total{adapter=\"a\",finish_reason=\"length\"} 2\nloramux_requests_total{adapter=\"b\",finish_reason=\"stop\"} 5\n",
        );
        assert_eq!(m.sum("loramux_adapter_loads_total"), Some(3.0));
        assert_eq!(m.sum("loramux_requests_total"), Some(7.0));
        assert_eq!(m.get("loramux_requests_total", "adapter", "b"), Some(5.0));
        assert_eq!(m.get("vllm:lora_requests_info", "running_lora_adapters", "a,b"), Some(1.7e9));
        assert_eq!(m.sum("absent"), None);
    }
}
