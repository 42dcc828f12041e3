//! A small OpenAI-compatible client for load generation: every request is streamed so
//! time to first token and inter-token latency are measured at the client, and a failed
//! request becomes a sample with its error instead of ending the run.

use std::time::{Duration, Instant};

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
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

/// The server gauges of resident memory (`/proc/self/status`'s `VmRSS` and `VmHWM`, which the
/// loramux server reads at each scrape), so the benchmark reads them the same way for a
/// server it started and for one at `--url`.
const RESIDENT_BYTES: &str = "process_resident_memory_bytes";
const PEAK_RESIDENT_BYTES: &str = "loramux_process_peak_resident_memory_bytes";

/// A parsed Prometheus text exposition (`prometheus-parse`): its counters, gauges and
/// untyped series; a histogram's `_sum` and `_count` series keep those names.
///
/// The parser skips metric names with a colon (vLLM's `vllm:*`) and splits label values
/// at commas, so neither is read through this type; loramux's own `loramux_*` series are.
#[derive(Clone, Debug, Default)]
pub struct MetricsSnapshot {
    samples: Vec<prometheus_parse::Sample>,
}

impl MetricsSnapshot {
    /// Parses the text format, skipping comments and lines it cannot read.
    pub fn parse(text: &str) -> Self {
        let lines = text.lines().map(|l| Ok(l.to_string()));
        // The only error Scrape::parse passes on is one of the lines iterator: none here.
        Self { samples: prometheus_parse::Scrape::parse(lines).map(|s| s.samples).unwrap_or_default() }
    }

    /// Every series of `name` with a single value, with its labels.
    fn series<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (&'a prometheus_parse::Labels, f64)> + 'a {
        self.samples.iter().filter(move |s| s.metric == name).filter_map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => {
                Some((&s.labels, v))
            }
            prometheus_parse::Value::Histogram(_) | prometheus_parse::Value::Summary(_) => None,
        })
    }

    /// Sum of every series of `name` (all label values), if the metric exists.
    pub fn sum(&self, name: &str) -> Option<f64> {
        self.series(name).map(|(_, v)| v).reduce(|a, b| a + b)
    }

    /// The value of the series of `name` whose label `key` is `value`.
    pub fn get(&self, name: &str, key: &str, value: &str) -> Option<f64> {
        self.series(name).find(|(l, _)| l.get(key) == Some(value)).map(|(_, v)| v)
    }

    /// A loramux server's resident memory at this scrape, bytes (`VmRSS`). `None` for servers
    /// without loramux's peak gauge: another server's process gauges may describe only its
    /// front-end process.
    pub fn resident_bytes(&self) -> Option<f64> {
        self.sum(PEAK_RESIDENT_BYTES)?;
        self.sum(RESIDENT_BYTES)
    }

    /// A loramux server's peak resident memory since it started, bytes (`VmHWM`): it covers
    /// what no scrape saw (model loading, bursts between two scrapes).
    pub fn peak_resident_bytes(&self) -> Option<f64> {
        self.sum(PEAK_RESIDENT_BYTES)
    }
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
        let resp = self
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
        // The body as a stream of chunks, framed into server-sent events by eventsource-stream.
        let chunks = futures_util::stream::unfold(resp, |mut resp| async move {
            resp.chunk().await.transpose().map(|chunk| (chunk, resp))
        });
        let mut events = std::pin::pin!(chunks.eventsource());
        let mut last_token: Option<Instant> = None;
        let mut done = false;
        while let Some(event) = events.next().await {
            let event = event.map_err(|e| format!("stream: {e}"))?;
            let now = Instant::now();
            let data = event.data.trim();
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
            "# HELP x y\nloramux_adapter_loads_total 3\nloramux_requests_total{adapter=\"a\",finish_reason=\"length\"} 2\nloramux_requests_total{adapter=\"b\",finish_reason=\"stop\"} 5\nloramux_kv_used_bytes 1.7e9\n",
        );
        assert_eq!(m.sum("loramux_adapter_loads_total"), Some(3.0));
        assert_eq!(m.sum("loramux_requests_total"), Some(7.0));
        assert_eq!(m.get("loramux_requests_total", "adapter", "b"), Some(5.0));
        assert_eq!(m.get("loramux_requests_total", "adapter", "c"), None);
        assert_eq!(m.sum("loramux_kv_used_bytes"), Some(1.7e9));
        assert_eq!(m.sum("absent"), None);
        assert_eq!(m.resident_bytes(), None);
    }

    #[test]
    fn reads_histogram_sums_and_memory_gauges() {
        let m = MetricsSnapshot::parse(concat!(
            "# HELP loramux_adapter_load_seconds Adapter load time.\n",
            "# TYPE loramux_adapter_load_seconds histogram\n",
            "loramux_adapter_load_seconds_bucket{le=\"0.1\"} 1\n",
            "loramux_adapter_load_seconds_bucket{le=\"+Inf\"} 2\n",
            "loramux_adapter_load_seconds_sum 0.25\n",
            "loramux_adapter_load_seconds_count 2\n",
            "# TYPE process_resident_memory_bytes gauge\n",
            "process_resident_memory_bytes 104857600\n",
            "# TYPE loramux_process_peak_resident_memory_bytes gauge\n",
            "loramux_process_peak_resident_memory_bytes 209715200\n",
        ));
        assert_eq!(m.sum("loramux_adapter_load_seconds_sum"), Some(0.25));
        assert_eq!(m.sum("loramux_adapter_load_seconds_count"), Some(2.0));
        assert_eq!(m.resident_bytes(), Some(104857600.0));
        assert_eq!(m.peak_resident_bytes(), Some(209715200.0));
        // Another server's process gauge alone is not taken for the server's memory.
        assert_eq!(MetricsSnapshot::parse("process_resident_memory_bytes 1e6\n").resident_bytes(), None);
    }
}
