//! Metrics conformance with the Gateway API Inference Extension (GIE, issue #13): the real
//! server on the tiny fixture, requests that run and wait, `/metrics` scraped while they do and
//! read the way GIE's endpoint picker reads a vLLM server (its `vllm` pod-metrics client):
//!
//! - `vllm:lora_requests_info` (a gauge): of its series, the one with the largest value (a Unix
//!   time) that has a running or a waiting adapter; labels `max_lora` (an integer),
//!   `running_lora_adapters` and `waiting_lora_adapters` (comma-separated, no spaces). A series
//!   with both lists empty is skipped: the picker then keeps the adapters it saw last.
//! - `vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`
//!   (gauges, read with `GetGauge().GetValue()`: an untyped family would read as 0).
//!
//! Also checks that the ConfigMap under `deploy/k8s/` holds a `loramux.toml` the server accepts.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::json;

/// Tiny llama: 768 bytes of KV per token, 64-token blocks; a budget of 16 blocks holds two
/// sequences of the fixture's full length (512 tokens, 8 blocks).
const KV_BLOCK_BYTES: usize = 64 * 768;
const KV_BLOCKS: usize = 16;
const MAX_LORAS: usize = 3;

/// One sample of a family in the text exposition: its labels and value.
#[derive(Clone, Debug)]
struct Sample {
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The text exposition (format 0.0.4) parsed strictly: families by name, and the `# TYPE` of
/// each. A line the parser cannot read fails the test, as it fails the picker's whole scrape.
struct Exposition {
    families: BTreeMap<String, Vec<Sample>>,
    types: BTreeMap<String, String>,
}

fn parse_exposition(text: &str) -> Exposition {
    let mut families: BTreeMap<String, Vec<Sample>> = BTreeMap::new();
    let mut types = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let mut words = rest.split_whitespace();
            if words.next() == Some("TYPE") {
                let (name, kind) = (words.next().expect("# TYPE name"), words.next().expect("# TYPE kind"));
                assert!(types.insert(name.to_string(), kind.to_string()).is_none(), "two # TYPE lines for {name}");
            }
            continue;
        }
        let (name, labels, rest) = parse_series(line);
        let value = rest.split_whitespace().next().unwrap_or_else(|| panic!("no value: {line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value {value:?}: {line:?}"));
        families.entry(name).or_default().push(Sample { labels, value });
    }
    Exposition { families, types }
}

/// `name{k="v",...} rest` -> (name, labels, rest); label values unescaped (`\\`, `\"`, `\n`).
fn parse_series(line: &str) -> (String, BTreeMap<String, String>, &str) {
    let name_end = line.find(['{', ' ']).unwrap_or_else(|| panic!("no value: {line:?}"));
    let name = &line[..name_end];
    assert!(
        !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
        "bad metric name {name:?}"
    );
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(mut s) = rest.strip_prefix('{') {
        loop {
            s = s.trim_start_matches([' ', ',']);
            if let Some(after) = s.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = s.find('=').unwrap_or_else(|| panic!("label without '=': {line:?}"));
            let key = s[..eq].trim().to_string();
            let mut chars = s[eq + 1..].char_indices();
            assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "unquoted label value: {line:?}");
            let mut value = String::new();
            let end = loop {
                match chars.next() {
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next().map(|(_, c)| c) {
                        Some('n') => value.push('\n'),
                        Some(c @ ('\\' | '"')) => value.push(c),
                        other => panic!("bad escape {other:?}: {line:?}"),
                    },
                    Some((_, c)) => value.push(c),
                    None => panic!("unterminated label value: {line:?}"),
                }
            };
            assert!(labels.insert(key.clone(), value).is_none(), "label {key} twice: {line:?}");
            s = &s[eq + 1 + end + 1..];
        }
    }
    assert!(rest.starts_with(' '), "no space before the value: {line:?}");
    (name.to_string(), labels, rest)
}

/// One `vllm:lora_requests_info` series as the picker reads it.
#[derive(Clone, Debug, PartialEq)]
struct LoraInfo {
    max_lora: usize,
    running: Vec<String>,
    waiting: Vec<String>,
    /// The gauge's value: the Unix time of the last update.
    time: f64,
}

/// What the picker takes from one scrape.
#[derive(Debug)]
struct PickerView {
    running: f64,
    waiting: f64,
    kv_usage: f64,
    /// The series the picker uses: the latest with a running or waiting adapter (`None`: it
    /// keeps what it had).
    lora: Option<LoraInfo>,
    /// The latest series whatever its lists (what the server says now).
    lora_latest: LoraInfo,
}

/// A comma-separated adapter list, as the picker splits it (`""` is no adapter).
fn adapter_list(value: &str) -> Vec<String> {
    if value.is_empty() {
        return Vec::new();
    }
    let list: Vec<String> = value.split(',').map(str::to_string).collect();
    for name in &list {
        assert!(!name.is_empty() && !name.contains(char::is_whitespace), "adapter list {value:?}: names, commas, no spaces");
    }
    list
}

/// The samples of a gauge family (the picker reads gauges; an untyped family reads as 0).
fn gauge<'a>(exp: &'a Exposition, name: &str) -> &'a [Sample] {
    assert_eq!(exp.types.get(name).map(String::as_str), Some("gauge"), "{name} must be a gauge");
    exp.families.get(name).unwrap_or_else(|| panic!("{name} missing"))
}

/// The value of a family with one series (one served base model).
fn single(exp: &Exposition, name: &str) -> f64 {
    let samples = gauge(exp, name);
    assert_eq!(samples.len(), 1, "{name}: one series");
    samples[0].value
}

/// The series with the largest value (the latest update).
fn latest<'a>(infos: impl Iterator<Item = &'a LoraInfo>) -> Option<LoraInfo> {
    infos.max_by(|x, y| x.time.total_cmp(&y.time)).cloned()
}

fn picker_view(text: &str) -> PickerView {
    let exp = parse_exposition(text);
    let infos: Vec<LoraInfo> = gauge(&exp, "vllm:lora_requests_info")
        .iter()
        .map(|s| {
            let label = |k: &str| -> String {
                s.labels.get(k).cloned().unwrap_or_else(|| panic!("vllm:lora_requests_info without {k}: {:?}", s.labels))
            };
            LoraInfo {
                max_lora: label("max_lora").parse().expect("max_lora is an integer"),
                running: adapter_list(&label("running_lora_adapters")),
                waiting: adapter_list(&label("waiting_lora_adapters")),
                time: s.value,
            }
        })
        .collect();
    let lora_latest = latest(infos.iter()).expect("a vllm:lora_requests_info series");
    // The picker skips series with both lists empty, and keeps one only if its value is above
    // 0 (it starts from 0 and takes `>`).
    let lora = latest(infos.iter().filter(|i| !(i.running.is_empty() && i.waiting.is_empty()) && i.time > 0.0));
    PickerView {
        running: single(&exp, "vllm:num_requests_running"),
        waiting: single(&exp, "vllm:num_requests_waiting"),
        kv_usage: single(&exp, "vllm:kv_cache_usage_perc"),
        lora,
        lora_latest,
    }
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// Scrapes until `want` holds for the picker's view (at most `limit`), then returns that view.
async fn scrape_until(srv: &TestServer, limit: Duration, what: &str, want: impl Fn(&PickerView) -> bool) -> PickerView {
    let t = Instant::now();
    loop {
        let (status, text) = srv.get("/metrics").await;
        assert_eq!(status, 200);
        let view = picker_view(&text);
        if want(&view) {
            return view;
        }
        assert!(t.elapsed() < limit, "{what}: not seen within {limit:?}; last view {view:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn picker_sees_running_and_waiting_adapters() {
    let mut s = tiny_settings();
    s.lora_modules = ["a", "b"].iter().map(|n| (n.to_string(), fixture_adapter("llama", n))).collect();
    s.max_num_seqs = 1; // a second request waits
    s.lora.max_loras = MAX_LORAS;
    s.kv_cache_bytes = KV_BLOCKS * KV_BLOCK_BYTES;
    let srv = TestServer::tiny("llama", s).await;

    // Idle: nothing running or waiting; the one series has empty lists, so the picker skips it.
    let (_, text) = srv.get("/metrics").await;
    let idle = picker_view(&text);
    assert_eq!((idle.running, idle.waiting, idle.kv_usage), (0.0, 0.0, 0.0), "{idle:?}");
    assert_eq!((idle.lora_latest.running.len(), idle.lora_latest.waiting.len()), (0, 0), "{idle:?}");
    assert_eq!(idle.lora_latest.max_lora, MAX_LORAS);
    assert!((idle.lora_latest.time - unix_now()).abs() < 120.0, "the value is the Unix time of the last update: {idle:?}");
    assert_eq!(idle.lora, None);

    // A long request on `a`, streamed: once its first token is out it is running.
    let body = json!({"model": "a", "prompt": "go", "max_tokens": 480, "temperature": 0, "ignore_eos": true, "stream": true});
    let mut a = srv.http.post(format!("{}/v1/completions", srv.url)).header("content-type", "application/json").body(body.to_string()).send().await.unwrap();
    assert_eq!(a.status().as_u16(), 200);
    let mut a_text = String::new();
    while !a_text.contains("\"text\"") {
        let chunk = a.chunk().await.unwrap().expect("a's stream ends only after its first token");
        a_text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let alone = scrape_until(&srv, Duration::from_secs(5), "a running", |v| v.lora.as_ref().is_some_and(|l| l.running == names(&["a"]))).await;
    let lora = alone.lora.clone().unwrap();
    assert_eq!(lora.waiting, Vec::<String>::new(), "{alone:?}");
    assert_eq!((alone.running, alone.waiting), (1.0, 0.0), "{alone:?}");

    // A request on `b` while `a` holds the only place in the batch: it waits.
    let b = tokio::spawn({
        let (http, url) = (srv.http.clone(), srv.url.clone());
        async move {
            let body = json!({"model": "b", "prompt": "go", "max_tokens": 8, "temperature": 0, "ignore_eos": true});
            let r = http.post(format!("{url}/v1/completions")).header("content-type", "application/json").body(body.to_string()).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    });
    let both = scrape_until(&srv, Duration::from_secs(5), "b waiting", |v| v.lora.as_ref().is_some_and(|l| !l.waiting.is_empty())).await;
    let lora = both.lora.clone().unwrap();
    assert_eq!(lora.running, names(&["a"]), "{both:?}");
    assert_eq!(lora.waiting, names(&["b"]), "{both:?}");
    assert_eq!(lora.max_lora, MAX_LORAS, "max_lora is --max-loras");
    assert!(lora.time >= idle.lora_latest.time && (lora.time - unix_now()).abs() < 120.0, "{both:?}");
    assert_eq!(both.running, 1.0, "{both:?}");
    assert_eq!(both.waiting, 1.0, "{both:?}");
    assert!(both.kv_usage > 0.0 && both.kv_usage <= 1.0, "{both:?}");
    // The fraction of the budget that `a`'s whole blocks take (1 to 8 of 16).
    let blocks = both.kv_usage * KV_BLOCKS as f64;
    assert!((blocks - blocks.round()).abs() < 1e-9 && (1.0..=8.0).contains(&blocks.round()), "{both:?}");

    // Both finish.
    let (status, text) = b.await.unwrap();
    assert_eq!(status, 200, "{text}");
    while let Some(chunk) = a.chunk().await.unwrap() {
        a_text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(a_text.ends_with("data: [DONE]\n\n") && a_text.contains("\"finish_reason\":\"length\""), "a ran to its end");
    let done = scrape_until(&srv, Duration::from_secs(5), "idle again", |v| v.running == 0.0 && v.waiting == 0.0).await;
    assert_eq!(done.kv_usage, 0.0, "{done:?}");
    assert_eq!(done.lora_latest.running, Vec::<String>::new(), "{done:?}");
    assert_eq!(done.lora_latest.waiting, Vec::<String>::new(), "{done:?}");
    assert_eq!(done.lora_latest.max_lora, MAX_LORAS);
    assert!(done.lora_latest.time >= lora.time, "{done:?}");
    // The server keeps no stale series: the picker finds none with adapters and keeps its last view.
    assert_eq!(done.lora, None, "{done:?}");
    assert_eq!(parse_exposition(&srv.get("/metrics").await.1).families["vllm:lora_requests_info"].len(), 1);
    srv.shutdown().await;
}

#[test]
fn exposition_parser_reads_escapes_and_refuses_garbage() {
    let exp = parse_exposition("# TYPE x gauge\nx{a=\"p\\\"q\\\\r\\ns\",b=\"\"} 1.5 1700000000000\ny 2\n");
    assert_eq!(exp.types["x"], "gauge");
    assert_eq!(exp.families["x"][0].labels["a"], "p\"q\\r\ns");
    assert_eq!(exp.families["x"][0].labels["b"], "");
    assert_eq!(exp.families["x"][0].value, 1.5);
    assert_eq!(exp.families["y"][0].value, 2.0);
    for bad in ["x{a=\"1} 2", "x{a=1} 2", "x 1e", "x{a=\"1\"}2"] {
        assert!(std::panic::catch_unwind(|| parse_exposition(bad)).is_err(), "{bad:?} must not parse");
    }
    assert_eq!(adapter_list(""), Vec::<String>::new());
    assert_eq!(adapter_list("a,b"), names(&["a", "b"]));
    assert!(std::panic::catch_unwind(|| adapter_list("a, b")).is_err());
}

/// The `loramux.toml` of the ConfigMap in deploy/k8s/ (a YAML block scalar under `data:`).
fn configmap_toml() -> String {
    let path = repo().join("deploy/k8s/configmap.yaml");
    let yaml = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut lines = yaml.lines();
    let key = lines.by_ref().find(|l| l.trim_start().starts_with("loramux.toml: |")).expect("a loramux.toml key");
    let key_indent = key.len() - key.trim_start().len();
    let body: Vec<&str> = lines.take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > key_indent).collect();
    let indent = body.iter().filter(|l| !l.trim().is_empty()).map(|l| l.len() - l.trim_start().len()).min().expect("a non-empty loramux.toml");
    body.iter().map(|l| l.get(indent..).unwrap_or("")).collect::<Vec<_>>().join("\n")
}

#[test]
fn deploy_configmap_holds_a_config_the_server_accepts() {
    let text = configmap_toml();
    let config = loramux_server::ServeConfig::from_toml(&text).unwrap_or_else(|e| panic!("deploy/k8s/configmap.yaml loramux.toml: {e}\n{text}"));
    let model = config.model.clone().expect("the ConfigMap names the model");
    let settings = config.resolve(&model).expect("the ConfigMap's settings resolve");
    // What deploy/k8s/deployment.yaml's resource arithmetic assumes.
    assert_eq!(model, "smollm2-135m");
    assert_eq!(settings.lora.max_loras, 8);
    assert_eq!(settings.lora.max_bytes, 128 << 20);
    assert_eq!(settings.kv_cache_bytes, 2 << 30);
    assert_eq!(settings.port, 8000);
    assert_eq!(settings.lora_dirs, vec![std::path::PathBuf::from("/opt/loramux/adapters")]);
}
