//! Every fault of issue #10, over HTTP on loopback against the real server (router, batch
//! loop, engine) on the tiny fixture models: broken adapters, panics in the forward pass,
//! in admission and in the adapter reader, streamed text with incomplete UTF-8 and stop
//! strings, adapter byte limits, stop-string limits, tiny temperatures, unload and in-place
//! replace under load, a full waiting queue, request deadlines, slow clients and a GGUF
//! whose head count is zero.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::future::join_all;
use serde_json::{json, Value};

const RUNNING: &str = "vllm:num_requests_running{model_name=\"tiny\"}";
const WAITING: &str = "vllm:num_requests_waiting{model_name=\"tiny\"}";
const KV_USAGE: &str = "vllm:kv_cache_usage_perc{model_name=\"tiny\"}";
const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";
/// The tiny models' context is 512 tokens: a prompt of a few tokens and this many output
/// tokens is the longest request they take (a few hundred milliseconds on a CPU).
const LONG: usize = 500;

fn with_modules(arch: &str, names: &[&str]) -> loramux_server::Settings {
    let mut s = tiny_settings();
    s.lora_modules = names.iter().map(|n| (n.to_string(), fixture_adapter(arch, n))).collect();
    s
}

fn admin_settings(s: &mut loramux_server::Settings, root: &std::path::Path) {
    s.enable_lora_updates = true;
    s.admin_api_key = Some("admin".into());
    s.allowed_lora_roots = vec![root.to_path_buf()];
}

fn long_body(model: &str, stream: bool) -> Value {
    json!({"model": model, "prompt": "go", "max_tokens": LONG, "temperature": 0, "ignore_eos": true, "stream": stream})
}

fn error_message(v: &Value) -> &str {
    v["error"]["message"].as_str().unwrap_or("")
}

fn listed(models: &Value, id: &str) -> bool {
    models["data"].as_array().unwrap().iter().any(|m| m["id"] == id)
}

/// Polls a metric series until `ok` holds; panics after `within`.
async fn wait_metric(srv: &TestServer, series: &str, within: Duration, ok: impl Fn(f64) -> bool) -> f64 {
    let t = Instant::now();
    loop {
        let (_, text) = srv.get("/metrics").await;
        assert!(text.contains(series), "no series {series} in /metrics");
        let v = metric_value(&text, series);
        if ok(v) {
            return v;
        }
        assert!(t.elapsed() < within, "{series} stayed at {v} for {within:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A streaming request, read whole as bytes (a multi-byte character may straddle network
/// chunks): the status and every SSE `data:` payload (or the body when not 200).
async fn sse(srv: &TestServer, path: &str, body: &Value) -> (u16, Vec<String>) {
    let r = srv
        .http
        .post(format!("{}{path}", srv.url))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("request sent");
    let status = r.status().as_u16();
    let bytes = r.bytes().await.expect("body");
    let text = String::from_utf8(bytes.to_vec()).expect("the response is UTF-8");
    if status != 200 {
        return (status, vec![text]);
    }
    let frames = text
        .split("\n\n")
        .filter(|f| !f.is_empty())
        .map(|f| f.strip_prefix("data: ").unwrap_or_else(|| panic!("SSE frame without 'data: ': {f:?}")).to_string())
        .collect();
    (status, frames)
}

/// What a stream carried: its text, finish reason, completion tokens (with include_usage),
/// and the error frame if one came.
#[derive(Debug, Default)]
struct Streamed {
    text: String,
    finish: Option<String>,
    completion_tokens: Option<u64>,
    error: Option<Value>,
    done: bool,
}

fn parse_stream(frames: &[String], chat: bool) -> Streamed {
    let mut s = Streamed::default();
    for f in frames {
        if f == "[DONE]" {
            s.done = true;
            continue;
        }
        let v: Value = serde_json::from_str(f).unwrap_or_else(|_| panic!("chunk is not JSON: {f}"));
        if v.get("error").is_some() {
            s.error = Some(v);
            continue;
        }
        if let Some(c) = v["choices"].get(0) {
            let piece = if chat { &c["delta"]["content"] } else { &c["text"] };
            s.text.push_str(piece.as_str().unwrap_or(""));
            if let Some(f) = c["finish_reason"].as_str() {
                s.finish = Some(f.to_string());
            }
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            s.completion_tokens = Some(n);
        }
    }
    s
}

fn text_of(v: &Value, chat: bool) -> String {
    let c = &v["choices"][0];
    if chat { &c["message"]["content"] } else { &c["text"] }.as_str().unwrap_or_else(|| panic!("no text in {v}")).to_string()
}

// 1. --------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rank_pattern_with_a_zero_rank_is_refused_naming_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let zero = tmp.path().join("zero");
    copy_adapter(&fixture_adapter("llama", "a"), &zero);
    let cfg_path = zero.join("adapter_config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["rank_pattern"] = json!({"q_proj": 0});
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let mut s = tiny_settings();
    s.lora_dirs = vec![tmp.path().to_path_buf()];
    admin_settings(&mut s, tmp.path());
    let srv = Arc::new(TestServer::tiny("llama", s).await);
    let base = srv.chat_text("tiny", "hello", 12).await;

    // At run time: 400 naming the field, and nothing registered.
    let (st, v) = srv.post_key("/v1/load_lora_adapter", &json!({"lora_name": "zero2", "lora_path": "zero"}), Some("admin")).await;
    assert_error(st, &v, 400, "load_lora_adapter of a rank-0 rank_pattern");
    assert!(error_message(&v).contains("rank_pattern"), "the error names rank_pattern: {v}");
    assert!(!listed(&srv.get_json("/v1/models").await.1, "zero2"));

    // In a --lora-dir, requested by model, while base-model requests run beside it.
    let mut tasks = Vec::new();
    for i in 0..12 {
        let srv = srv.clone();
        tasks.push(tokio::spawn(async move {
            let model = if i % 3 == 0 { "zero" } else { "tiny" };
            let (st, v) = srv.post(CHAT, &chat_body(model, "hello", 12)).await;
            (model, st, v)
        }));
    }
    let mut refused = 0;
    for t in join_all(tasks).await {
        let (model, st, v) = t.unwrap();
        if model == "zero" {
            assert!((400..500).contains(&st), "a rank-0 adapter gets a 4xx, got {st}: {v}");
            assert_error(st, &v, st, "lazily read rank-0 adapter");
            assert!(error_message(&v).contains("rank_pattern"), "the error names rank_pattern: {v}");
            refused += 1;
        } else {
            assert_eq!(st, 200, "base request beside the broken adapter: {v}");
            assert_eq!(text_of(&v, true), base, "base text beside the broken adapter");
        }
    }
    assert_eq!(refused, 4);
    let (st, frames) = sse(&srv, COMPLETIONS, &json!({"model": "zero", "prompt": "x", "max_tokens": 4, "stream": true})).await;
    let v: Value = serde_json::from_str(&frames[0]).unwrap();
    assert_error(st, &v, 400, "streamed request on the rank-0 adapter");
    assert_eq!(srv.chat_text("tiny", "hello", 12).await, base);
    Arc::into_inner(srv).unwrap().shutdown().await;
}

// 2. --------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_forward_pass_fails_only_its_adapters_requests() {
    let mut s = with_modules("llama", &["a", "b"]);
    s.debug_faults.panic_on_forward = Some("a".into());
    let srv = Arc::new(TestServer::tiny("llama", s).await);
    let prompts = ["hello there", "one two three four"];
    let mut alone = std::collections::HashMap::new();
    for m in ["tiny", "b"] {
        for p in prompts {
            alone.insert((m, p), srv.chat_text(m, p, 12).await);
        }
    }
    let (st, v) = srv.post(CHAT, &chat_body("a", "hello there", 12)).await;
    assert_error(st, &v, 500, "a request on the adapter whose forward pass panics");

    // All at once, twice over: passes mix rows of a, b and the base model.
    let mut tasks = Vec::new();
    for _round in 0..2 {
        for m in ["tiny", "a", "b"] {
            for p in prompts {
                let srv = srv.clone();
                tasks.push(tokio::spawn(async move {
                    let (st, v) = srv.post(CHAT, &chat_body(m, p, 12)).await;
                    (m, p, st, v)
                }));
            }
        }
    }
    for t in join_all(tasks).await {
        let (m, p, st, v) = t.unwrap();
        if m == "a" {
            assert_error(st, &v, 500, "concurrent request on a");
        } else {
            assert_eq!(st, 200, "{m} beside a failing adapter: {v}");
            assert_eq!(text_of(&v, true), alone[&(m, p)], "{m} {p:?} batched with a failing adapter differs from alone");
        }
    }
    // Streamed: the failure arrives as an error frame, and the other stream is whole.
    let sa = srv.clone();
    let sb = srv.clone();
    let mut body_b = chat_body("b", "hello there", 12);
    body_b["stream"] = json!(true);
    let mut body_a = chat_body("a", "hello there", 12);
    body_a["stream"] = json!(true);
    let (ra, rb) = tokio::join!(
        async move { sse(&sa, CHAT, &body_a).await },
        async move { sse(&sb, CHAT, &body_b).await }
    );
    let a = parse_stream(&ra.1, true);
    assert!(ra.0 == 500 || a.error.as_ref().is_some_and(|e| e["error"]["type"] == "server_error"), "streamed a: {ra:?}");
    assert_eq!(rb.0, 200);
    let b = parse_stream(&rb.1, true);
    assert!(b.error.is_none() && b.done, "{rb:?}");
    assert_eq!(b.text, alone[&("b", "hello there")]);

    let (st, _) = srv.get("/health").await;
    assert_eq!(st, 200, "the server keeps serving");
    assert_eq!(srv.chat_text("tiny", "hello there", 12).await, alone[&("tiny", "hello there")]);
    assert!(srv.metric("loramux_request_errors_total{status=\"500\"}").await >= 5.0);
    Arc::into_inner(srv).unwrap().shutdown().await;
}

// 3. --------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_loop_death_fails_every_request_and_health_turns_503() {
    let mut s = with_modules("llama", &["a"]);
    s.debug_faults.panic_on_admit = Some("a".into());
    let srv = Arc::new(TestServer::tiny("llama", s).await);
    assert_eq!(srv.get("/health").await.0, 200);
    srv.chat_text("tiny", "hi", 4).await;

    // A long base request is running when the loop dies: it fails too.
    let long = {
        let srv = srv.clone();
        tokio::spawn(async move {
            let mut body = long_body("tiny", false);
            body["n"] = json!(16);
            srv.post(COMPLETIONS, &body).await
        })
    };
    wait_metric(&srv, RUNNING, Duration::from_secs(10), |v| v >= 1.0).await;
    let (st, v) = srv.post(CHAT, &chat_body("a", "hi", 4)).await;
    assert!((500..600).contains(&st), "the request that kills the loop gets a 5xx, got {st}: {v}");
    assert_error(st, &v, st, "the request that kills the loop");
    assert_eq!(v["error"]["type"], "server_error", "{v}");
    let (st, v) = long.await.unwrap();
    assert_error(st, &v, 500, "a request running when the loop died");

    let (st, text) = srv.get("/health").await;
    assert_eq!(st, 503, "health after the loop died: {text}");
    let (st, v) = srv.post(CHAT, &chat_body("tiny", "hi", 4)).await;
    assert_error(st, &v, 503, "a new request after the loop died");
    let (st, v) = srv.post(COMPLETIONS, &json!({"model": "a", "prompt": "x", "max_tokens": 2, "stream": true})).await;
    assert_error(st, &v, 503, "a new streamed request after the loop died");
    Arc::into_inner(srv).unwrap().shutdown().await;
}

// 4. --------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_text_equals_the_whole_text_for_random_bytes_and_multibyte_stops() {
    let srv = TestServer::tiny("llama", tiny_settings()).await;
    let mut cuts = 0;
    let mut non_ascii = 0;
    for seed in 0..24u64 {
        let chat = seed % 2 == 1;
        let path = if chat { CHAT } else { COMPLETIONS };
        let mut body = if chat {
            json!({"messages": [{"role": "user", "content": "say something"}]})
        } else {
            json!({"prompt": "the"})
        };
        body["max_tokens"] = json!(64);
        body["temperature"] = json!(1.0);
        body["seed"] = json!(seed);
        body["ignore_eos"] = json!(true);

        // Without a stop string: the whole text, then the same seed streamed.
        let (st, v) = srv.post(path, &body).await;
        assert_eq!(st, 200, "seed {seed}: {v}");
        let whole = text_of(&v, chat);
        if !whole.is_ascii() {
            non_ascii += 1;
        }
        let observed: String = whole.chars().find(|c| !c.is_ascii()).map(String::from).unwrap_or_else(|| "é".into());
        let stops: [Option<Vec<String>>; 3] = [None, Some(vec!["é".into(), "€".into()]), Some(vec![observed])];
        for stop in stops {
            let mut body = body.clone();
            let want = match &stop {
                None => whole.clone(),
                Some(list) => {
                    body["stop"] = json!(list);
                    let cut = list.iter().filter_map(|s| whole.find(s.as_str())).min();
                    if cut.is_some() {
                        cuts += 1;
                    }
                    whole[..cut.unwrap_or(whole.len())].to_string()
                }
            };
            let (st, v) = srv.post(path, &body).await;
            assert_eq!(st, 200, "seed {seed} stop {stop:?}: {v}");
            let text = text_of(&v, chat);
            assert_eq!(text, want, "seed {seed}: stop {stop:?} cuts the text at its first occurrence");
            let finish = v["choices"][0]["finish_reason"].as_str().unwrap().to_string();
            if want.len() < whole.len() {
                assert_eq!(finish, "stop", "seed {seed} stop {stop:?}");
            }
            body["stream"] = json!(true);
            let (st, frames) = sse(&srv, path, &body).await;
            assert_eq!(st, 200, "seed {seed} stop {stop:?} streamed: {frames:?}");
            let s = parse_stream(&frames, chat);
            assert!(s.error.is_none(), "seed {seed} stop {stop:?}: error frame {:?}", s.error);
            assert!(s.done, "seed {seed}: the stream ends with [DONE]");
            assert_eq!(s.text, text, "seed {seed} stop {stop:?}: streamed deltas concatenated differ from the whole text");
            assert_eq!(s.finish.as_deref(), Some(finish.as_str()), "seed {seed} stop {stop:?}");
        }
    }
    assert!(non_ascii >= 12, "random bytes give non-ASCII text (only {non_ascii} of 24)");
    assert!(cuts >= 12, "the stop strings cut texts (only {cuts} cuts)");
    assert_eq!(srv.metric("loramux_request_errors_total{status=\"500\"}").await, 0.0);
    srv.shutdown().await;
}

// 5. --------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adapter_above_the_byte_limit_is_refused_promptly_and_starves_nobody() {
    use loramux_engine::{Engine, EngineOptions, ModelLocation};
    let probe = Engine::load(&ModelLocation::HfDir(fixture("llama")), &EngineOptions::default()).unwrap();
    let size = |n: &str| {
        loramux_engine::lora::LoraModel::load(n, &fixture_adapter("llama", n), probe.loras().shapes(), 64).unwrap().bytes
    };
    let (small, big) = (size("a"), size("b"));
    assert!(small < big, "fixture adapter a ({small} B) is smaller than b ({big} B)");
    drop(probe);

    let tmp = tempfile::tempdir().unwrap();
    copy_adapter(&fixture_adapter("llama", "b"), &tmp.path().join("big"));
    copy_adapter(&fixture_adapter("llama", "a"), &tmp.path().join("small"));
    let reference = TestServer::tiny("llama", with_modules("llama", &["a"])).await;
    let want_small = reference.chat_text("a", "hello", 10).await;
    reference.shutdown().await;

    let mut s = tiny_settings();
    s.lora_dirs = vec![tmp.path().to_path_buf()];
    s.lora.max_bytes = big - 1;
    let srv = Arc::new(TestServer::tiny("llama", s).await);
    for round in 0..2 {
        let t = Instant::now();
        let (st, v) = srv.post(CHAT, &chat_body("big", "hello", 10)).await;
        assert!((400..500).contains(&st), "round {round}: an adapter above --max-lora-bytes gets a 4xx, got {st}: {v}");
        assert_error(st, &v, st, "adapter above the byte limit");
        assert!(error_message(&v).contains("limit"), "the error says why: {v}");
        assert!(t.elapsed() < Duration::from_secs(5), "round {round}: answered in {:?}", t.elapsed());
        let t = Instant::now();
        assert_eq!(srv.chat_text("small", "hello", 10).await, want_small, "round {round}: the adapter that fits serves");
        assert!(t.elapsed() < Duration::from_secs(5));
    }
    // Both at once, several times: the one that fits is never starved by the other.
    let tasks = (0..6).map(|i| {
        let srv = srv.clone();
        async move { (i, srv.post(CHAT, &chat_body(if i % 2 == 0 { "big" } else { "small" }, "hello", 10)).await) }
    });
    let t = Instant::now();
    for (i, (st, v)) in join_all(tasks).await {
        if i % 2 == 0 {
            assert!((400..500).contains(&st), "{st}: {v}");
        } else {
            assert_eq!(st, 200, "{v}");
            assert_eq!(text_of(&v, true), want_small);
        }
    }
    assert!(t.elapsed() < Duration::from_secs(5));
    Arc::into_inner(srv).unwrap().shutdown().await;
}

// 6. --------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_are_bounded_in_length_and_count() {
    let srv = TestServer::tiny("llama", tiny_settings()).await;
    let too_long = ["x".repeat(257), "é".repeat(129)]; // 257 and 258 bytes (129 characters)
    for stop in &too_long {
        for (path, mut body) in [(COMPLETIONS, completion_body("tiny", "hi", 4)), (CHAT, chat_body("tiny", "hi", 4))] {
            for stream in [false, true] {
                body["stop"] = json!([stop]);
                body["stream"] = json!(stream);
                let (st, v) = srv.post(path, &body).await;
                assert_error(st, &v, 400, &format!("a stop string of {} bytes on {path}", stop.len()));
                assert!(error_message(&v).contains("stop"), "the error names stop: {v}");
            }
        }
    }
    let seventeen: Vec<String> = (0..17).map(|i| format!("s{i}")).collect();
    let mut body = completion_body("tiny", "hi", 4);
    body["stop"] = json!(seventeen);
    let (st, v) = srv.post(COMPLETIONS, &body).await;
    assert_error(st, &v, 400, "17 stop strings");
    assert_eq!(v["error"]["param"], "stop", "{v}");
    body["stop"] = json!(&seventeen[..16]);
    let (st, v) = srv.post(COMPLETIONS, &body).await;
    assert_eq!(st, 200, "16 stop strings are accepted: {v}");

    let want = srv.completion_text("tiny", "hi", 8).await;
    for stop in ["x".repeat(256), "é".repeat(128)] {
        for (path, mut body) in [(COMPLETIONS, completion_body("tiny", "hi", 8)), (CHAT, chat_body("tiny", "hi", 8))] {
            body["stop"] = json!(stop);
            let (st, v) = srv.post(path, &body).await;
            assert_eq!(st, 200, "a stop string of 256 bytes is accepted on {path}: {v}");
            if path == COMPLETIONS {
                assert_eq!(text_of(&v, false), want, "a stop string that never matches changes nothing");
            }
        }
    }
    srv.shutdown().await;
}

// 7. --------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_temperatures_give_the_greedy_text() {
    let srv = TestServer::tiny("llama", with_modules("llama", &["a"])).await;
    for model in ["tiny", "a"] {
        for prompt in ["hello", "one two three"] {
            let greedy = srv.completion_text(model, prompt, 24).await;
            let greedy_chat = srv.chat_text(model, prompt, 24).await;
            for t in [1e-30, 1e-12] {
                for seed in [None, Some(5)] {
                    let mut body = completion_body(model, prompt, 24);
                    body["temperature"] = json!(t);
                    if let Some(s) = seed {
                        body["seed"] = json!(s);
                    }
                    let (st, v) = srv.post(COMPLETIONS, &body).await;
                    assert_eq!(st, 200, "temperature {t}: {v}");
                    assert_eq!(text_of(&v, false), greedy, "{model} {prompt:?} temperature {t} seed {seed:?}");
                    let mut body = chat_body(model, prompt, 24);
                    body["temperature"] = json!(t);
                    body["logprobs"] = json!(true);
                    let (st, v) = srv.post(CHAT, &body).await;
                    assert_eq!(st, 200, "temperature {t}: {v}");
                    assert_eq!(text_of(&v, true), greedy_chat, "chat {model} {prompt:?} temperature {t}");
                    for lp in v["choices"][0]["logprobs"]["content"].as_array().unwrap() {
                        assert!(lp["logprob"].as_f64().is_some_and(f64::is_finite), "finite logprobs: {lp}");
                    }
                }
            }
        }
    }
    srv.shutdown().await;
}

// 8. --------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_adapter_reader_fails_its_requests_promptly() {
    let tmp = tempfile::tempdir().unwrap();
    copy_adapter(&fixture_adapter("llama", "a"), &tmp.path().join("x"));
    copy_adapter(&fixture_adapter("llama", "b"), &tmp.path().join("y"));
    let reference = TestServer::tiny("llama", with_modules("llama", &["b"])).await;
    let want_y = reference.chat_text("b", "hello", 10).await;
    let base = reference.chat_text("tiny", "hello", 10).await;
    reference.shutdown().await;

    let mut s = tiny_settings();
    s.lora_dirs = vec![tmp.path().to_path_buf()];
    s.debug_faults.panic_on_adapter_read = Some("x".into());
    let srv = Arc::new(TestServer::tiny("llama", s).await);
    for attempt in 0..2 {
        let t = Instant::now();
        let (st, v) = srv.post(CHAT, &chat_body("x", "hello", 10)).await;
        assert!((400..600).contains(&st), "attempt {attempt}: the request gets an error, got {st}: {v}");
        assert_error(st, &v, st, "adapter whose reader panicked");
        assert!(t.elapsed() < Duration::from_secs(5), "attempt {attempt}: answered after {:?}, not a hang", t.elapsed());
    }
    // Concurrently with requests on other adapters and the base model.
    let tasks = (0..6).map(|i| {
        let srv = srv.clone();
        async move { (i, srv.post(CHAT, &chat_body(["x", "y", "tiny"][i % 3], "hello", 10)).await) }
    });
    let t = tokio::time::timeout(Duration::from_secs(10), join_all(tasks)).await.expect("no request hangs");
    for (i, (st, v)) in t {
        match i % 3 {
            0 => assert!((400..600).contains(&st), "{st}: {v}"),
            1 => assert_eq!((st, text_of(&v, true)), (200, want_y.clone())),
            _ => assert_eq!((st, text_of(&v, true)), (200, base.clone())),
        }
    }
    assert_eq!(srv.get("/health").await.0, 200);
    Arc::into_inner(srv).unwrap().shutdown().await;
}

// 9. --------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unloading_an_adapter_in_use_finishes_running_requests_and_fails_waiting_ones() {
    let tmp = tempfile::tempdir().unwrap();
    copy_adapter(&fixture_adapter("llama", "a"), &tmp.path().join("a-copy"));
    let mut s = tiny_settings();
    s.max_num_seqs = 1;
    admin_settings(&mut s, tmp.path());
    let srv = Arc::new(TestServer::tiny("llama", s).await);
    let admin = Some("admin");
    let (st, v) = srv.post_key("/v1/load_lora_adapter", &json!({"lora_name": "ad", "lora_path": "a-copy"}), admin).await;
    assert_eq!(st, 200, "{v}");
    // The long request's text when it runs undisturbed.
    let (st, v) = srv.post(COMPLETIONS, &long_body("ad", false)).await;
    assert_eq!(st, 200, "{v}");
    let want = text_of(&v, false);

    let running = {
        let srv = srv.clone();
        tokio::spawn(async move { sse(&srv, COMPLETIONS, &{
            let mut b = long_body("ad", true);
            b["stream_options"] = json!({"include_usage": true});
            b
        }).await })
    };
    wait_metric(&srv, RUNNING, Duration::from_secs(10), |v| v >= 1.0).await;
    let waiting = {
        let srv = srv.clone();
        tokio::spawn(async move { srv.post(COMPLETIONS, &completion_body("ad", "queued", 4)).await })
    };
    wait_metric(&srv, WAITING, Duration::from_secs(10), |v| v >= 1.0).await;
    let (st, v) = srv.post_key("/v1/unload_lora_adapter", &json!({"lora_name": "ad"}), admin).await;
    assert_eq!(st, 200, "{v}");
    assert!(!running.is_finished(), "the long request was still running at the unload (the test needs it to be)");
    assert!(!listed(&srv.get_json("/v1/models").await.1, "ad"), "an unloaded adapter is not listed");

    let (st, v) = waiting.await.unwrap();
    assert_error(st, &v, 404, "a request waiting on the unloaded adapter");
    assert_eq!(v["error"]["code"], "model_not_found");
    let (st, frames) = running.await.unwrap();
    assert_eq!(st, 200);
    let s = parse_stream(&frames, false);
    assert!(s.error.is_none() && s.done, "the running request completes: {:?}", s.error);
    assert_eq!(s.completion_tokens, Some(LONG as u64), "with all its tokens");
    assert_eq!(s.finish.as_deref(), Some("length"));
    assert_eq!(s.text, want, "with the adapter's output throughout");

    assert!(!listed(&srv.get_json("/v1/models").await.1, "ad"));
    let (st, v) = srv.post(COMPLETIONS, &completion_body("ad", "x", 2)).await;
    assert_error(st, &v, 404, "a request after the unload");
    // Removed once its last request ended, and the metrics say so.
    wait_metric(&srv, "loramux_adapters_resident", Duration::from_secs(2), |v| v == 0.0).await;
    Arc::into_inner(srv).unwrap().shutdown().await;
}

// 10. -------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_an_adapter_in_place_works_when_idle_and_is_refused_while_it_runs() {
    let tmp = tempfile::tempdir().unwrap();
    copy_adapter(&fixture_adapter("llama", "a"), &tmp.path().join("wa"));
    copy_adapter(&fixture_adapter("llama", "b"), &tmp.path().join("wb"));
    let mut s = tiny_settings();
    admin_settings(&mut s, tmp.path());
    let srv = Arc::new(TestServer::tiny("llama", s).await);
    let admin = Some("admin");
    let load = |path: &str, inplace: bool| json!({"lora_name": "x", "lora_path": path, "load_inplace": inplace});
    let (st, v) = srv.post_key("/v1/load_lora_adapter", &json!({"lora_name": "ref-b", "lora_path": "wb"}), admin).await;
    assert_eq!(st, 200, "{v}");
    let want_b = srv.chat_text("ref-b", "hello", 12).await;
    let (st, v) = srv.post_key("/v1/load_lora_adapter", &load("wa", false), admin).await;
    assert_eq!(st, 200, "{v}");
    let want_a = srv.chat_text("x", "hello", 12).await;
    assert_ne!(want_a, want_b, "the two adapters give different text");

    // Idle: the new weights serve at once.
    let (st, v) = srv.post_key("/v1/load_lora_adapter", &load("wb", true), admin).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(srv.chat_text("x", "hello", 12).await, want_b, "in-place load gives the new weights");
    // 16 long choices: the adapter stays pinned for a while.
    let mut long = long_body("x", false);
    long["n"] = json!(16);
    let (st, v) = srv.post(COMPLETIONS, &long).await;
    assert_eq!(st, 200, "{v}");
    let long_b = text_of(&v, false);

    // Busy: refused with 409, and nothing changes, for the running request or after.
    let running = {
        let srv = srv.clone();
        tokio::spawn(async move { srv.post(COMPLETIONS, &long).await })
    };
    wait_metric(&srv, RUNNING, Duration::from_secs(10), |v| v >= 1.0).await;
    let (st, v) = srv.post_key("/v1/load_lora_adapter", &load("wa", true), admin).await;
    assert!(!running.is_finished(), "the long request was still running at the replace (the test needs it to be)");
    assert_error(st, &v, 409, "in-place load while a request runs on the adapter");
    let (st, v) = running.await.unwrap();
    assert_eq!(st, 200, "{v}");
    for c in v["choices"].as_array().unwrap() {
        assert_eq!(c["text"], long_b.as_str(), "the running request kept its weights");
    }
    assert_eq!(srv.chat_text("x", "hello", 12).await, want_b, "a refused replace changes nothing");

    // Idle again: replace back.
    let (st, v) = srv.post_key("/v1/load_lora_adapter", &load("wa", true), admin).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(srv.chat_text("x", "hello", 12).await, want_a);
    Arc::into_inner(srv).unwrap().shutdown().await;
}

// 11. -------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_waiting_queue_answers_429_at_once_and_recovers() {
    let mut s = tiny_settings();
    s.max_num_seqs = 1;
    s.max_waiting = 2;
    let srv = Arc::new(TestServer::tiny("llama", s).await);
    let spawn_long = |srv: &Arc<TestServer>| {
        let srv = srv.clone();
        tokio::spawn(async move { srv.post(COMPLETIONS, &long_body("tiny", false)).await })
    };
    let first = spawn_long(&srv);
    wait_metric(&srv, RUNNING, Duration::from_secs(10), |v| v >= 1.0).await;
    let queued = [spawn_long(&srv), spawn_long(&srv)];
    wait_metric(&srv, WAITING, Duration::from_secs(10), |v| v >= 2.0).await;

    let refused = (0..4).map(|i| {
        let srv = srv.clone();
        async move {
            let t = Instant::now();
            let path = if i % 2 == 0 { COMPLETIONS } else { CHAT };
            let body = if i % 2 == 0 { completion_body("tiny", "x", 4) } else { chat_body("tiny", "x", 4) };
            let r = srv.http.post(format!("{}{path}", srv.url)).header("content-type", "application/json").body(body.to_string()).send().await.unwrap();
            let status = r.status().as_u16();
            let retry = r.headers().get("retry-after").map(|h| h.to_str().unwrap().to_string());
            let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
            (status, retry, v, t.elapsed())
        }
    });
    for (status, retry, v, took) in join_all(refused).await {
        assert_error(status, &v, 429, "a request beyond --max-waiting");
        assert_eq!(v["error"]["type"], "rate_limit_error", "{v}");
        let retry: u64 = retry.expect("a Retry-After header").parse().expect("Retry-After in seconds");
        assert!(retry >= 1);
        assert!(took < Duration::from_secs(1), "refused at once, not queued: {took:?}");
    }
    assert!(!first.is_finished(), "the first request was still running (the test needs it to be)");

    for t in std::iter::once(first).chain(queued) {
        let (st, v) = t.await.unwrap();
        assert_eq!(st, 200, "admitted requests complete: {v}");
        assert_eq!(v["usage"]["completion_tokens"], LONG);
    }
    srv.completion_text("tiny", "x", 4).await;
    let burst = (0..2).map(|_| {
        let srv = srv.clone();
        async move { srv.post(COMPLETIONS, &completion_body("tiny", "x", 4)).await.0 }
    });
    assert_eq!(join_all(burst).await, vec![200, 200], "the queue has room again");
    assert!(srv.metric("loramux_request_errors_total{status=\"429\"}").await >= 4.0);
    Arc::into_inner(srv).unwrap().shutdown().await;
}

// 12. -------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_their_deadline_get_504_and_free_their_memory() {
    let mut s = tiny_settings();
    s.request_timeout = Some(Duration::from_millis(500));
    let srv = Arc::new(TestServer::tiny("llama", s).await);
    // Short requests finish well within the deadline.
    assert!(!srv.completion_text("tiny", "x", 8).await.is_empty());

    // 5 x 16 long choices, one request streamed: far more work than 500 ms holds (one such
    // request alone takes longer).
    let mut tasks = Vec::new();
    for i in 0..5 {
        let srv = srv.clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let mut body = long_body("tiny", i == 4);
            body["n"] = json!(16);
            if i == 4 {
                let (st, frames) = sse(&srv, COMPLETIONS, &body).await;
                (st, frames, t.elapsed())
            } else {
                let (st, v) = srv.post(COMPLETIONS, &body).await;
                (st, vec![v.to_string()], t.elapsed())
            }
        }));
    }
    // While they run, they hold KV cache (so that 0 afterwards means it was freed).
    let t = Instant::now();
    let (mut saw_running, mut saw_kv) = (false, false);
    while !(saw_running && saw_kv) {
        assert!(t.elapsed() < Duration::from_secs(5), "never saw the requests running ({saw_running}) with KV cache ({saw_kv})");
        let (_, text) = srv.get("/metrics").await;
        saw_running |= metric_value(&text, RUNNING) >= 1.0;
        saw_kv |= metric_value(&text, KV_USAGE) > 0.0;
    }
    for (i, t) in join_all(tasks).await.into_iter().enumerate() {
        let (st, frames, took) = t.unwrap();
        assert!(took >= Duration::from_millis(450), "request {i} answered before its deadline: {took:?}");
        assert!(took < Duration::from_secs(3), "request {i} answered {took:?} after arrival, long after its deadline");
        if i == 4 && st == 200 {
            let s = parse_stream(&frames, false);
            let e = s.error.unwrap_or_else(|| panic!("the stream ends with an error frame: {frames:?}"));
            assert_eq!(e["error"]["code"], "request_timeout", "{e}");
            assert!(s.done);
            assert!(s.finish.is_none(), "no finish reason for a cancelled stream");
        } else {
            let v: Value = serde_json::from_str(&frames[0]).unwrap();
            assert_error(st, &v, 504, &format!("long request {i}"));
            assert_eq!(v["error"]["code"], "request_timeout", "{v}");
        }
    }
    wait_metric(&srv, RUNNING, Duration::from_secs(2), |v| v == 0.0).await;
    wait_metric(&srv, KV_USAGE, Duration::from_secs(2), |v| v == 0.0).await;
    assert_eq!(srv.metric(WAITING).await, 0.0);
    assert!(!srv.completion_text("tiny", "x", 8).await.is_empty(), "the server serves after the deadlines");
    assert_eq!(srv.metric(KV_USAGE).await, 0.0);
    Arc::into_inner(srv).unwrap().shutdown().await;
}

// 13. -------------------------------------------------------------------------------------

/// What a raw connection got back until the server closed it or `within` passed:
/// the bytes, and whether it was closed.
fn read_until_closed(sock: &mut TcpStream, within: Duration) -> (Vec<u8>, bool) {
    let t = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = within.saturating_sub(t.elapsed());
        if left.is_zero() {
            return (got, false);
        }
        sock.set_read_timeout(Some(left)).unwrap();
        match sock.read(&mut buf) {
            Ok(0) => return (got, true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => return (got, false),
            Err(_) => return (got, true), // reset
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_others_still_served() {
    let mut s = tiny_settings();
    s.http_read_timeout = Duration::from_secs(1);
    let srv = Arc::new(TestServer::tiny("llama", s).await);
    let addr = srv.server.as_ref().unwrap().local_addr();
    let want = srv.completion_text("tiny", "x", 8).await;

    // Headers cut off mid-line, then silence.
    let partial = tokio::task::spawn_blocking(move || {
        let mut sock = TcpStream::connect(addr).unwrap();
        sock.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Ty").unwrap();
        let t = Instant::now();
        let (got, closed) = read_until_closed(&mut sock, Duration::from_secs(4));
        (got, closed, t.elapsed())
    });
    // Headers trickled a byte at a time, never finished.
    let trickle = tokio::task::spawn_blocking(move || {
        let sock = TcpStream::connect(addr).unwrap();
        let mut writer = sock.try_clone().unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writing = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let header = format!("GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: {}", "a".repeat(200));
                for b in header.bytes() {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) || writer.write_all(&[b]).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        let mut sock = sock;
        let t = Instant::now();
        let (got, closed) = read_until_closed(&mut sock, Duration::from_secs(4));
        let took = t.elapsed();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writing.join().unwrap();
        (got, closed, took)
    });
    // Whole headers announcing a body that never comes, or comes a byte at a time.
    let no_body = |trickle_body: bool| {
        tokio::task::spawn_blocking(move || {
            let mut sock = TcpStream::connect(addr).unwrap();
            sock.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n")
                .unwrap();
            let t = Instant::now();
            if trickle_body {
                let mut writer = sock.try_clone().unwrap();
                std::thread::spawn(move || {
                    for _ in 0..40 {
                        if writer.write_all(b" ").is_err() {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                });
            }
            let (got, closed) = read_until_closed(&mut sock, Duration::from_secs(4));
            (got, closed, t.elapsed())
        })
    };
    let silent_body = no_body(false);
    let slow_body = no_body(true);

    // Meanwhile, ordinary requests are served.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..3 {
        let t = Instant::now();
        assert_eq!(srv.completion_text("tiny", "x", 8).await, want);
        assert!(t.elapsed() < Duration::from_secs(1), "a normal request beside slow clients took {:?}", t.elapsed());
    }

    for (what, task) in [("partial headers", partial), ("trickled headers", trickle)] {
        let (got, closed, took) = task.await.unwrap();
        let text = String::from_utf8_lossy(&got);
        assert!(closed, "{what}: the connection is still open after {took:?} (got {text:?})");
        assert!(took < Duration::from_secs(3), "{what}: closed only after {took:?}");
        assert!(!text.starts_with("HTTP/1.1 2"), "{what}: {text:?}");
    }
    for (what, task) in [("a body that never comes", silent_body), ("a body trickled in", slow_body)] {
        let (got, closed, took) = task.await.unwrap();
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 408") || (closed && got.is_empty()), "{what}: 408 or a closed connection, got {text:?} (closed {closed})");
        assert!(closed || !got.is_empty(), "{what}: no answer within {took:?}");
        assert!(took < Duration::from_secs(3), "{what}: answered after {took:?}");
        if text.starts_with("HTTP/1.1 408") {
            let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
            let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{what}: 408 body is not JSON: {text:?}"));
            assert_error(408, &v, 408, what);
        }
    }
    assert_eq!(srv.completion_text("tiny", "x", 8).await, want);
    assert_eq!(srv.get("/health").await.0, 200);
    Arc::into_inner(srv).unwrap().shutdown().await;
}

// 14. -------------------------------------------------------------------------------------

/// A copy of the tiny SentencePiece GGUF with one u32/u64 metadata value set to `value`.
fn gguf_with(dir: &std::path::Path, key: &str, value: u64) -> std::path::PathBuf {
    let mut bytes = std::fs::read(fixture("spm").join("tiny-spm.gguf")).unwrap();
    // A metadata key is a u64 length and the bytes; its value type (u32) and value follow.
    let mut needle = (key.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(key.as_bytes());
    let at = bytes.windows(needle.len()).position(|w| w == needle).unwrap_or_else(|| panic!("{key} not in the GGUF")) + needle.len();
    let kind = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    let v = at + 4;
    match kind {
        4 | 5 => {
            assert_ne!(u32::from_le_bytes(bytes[v..v + 4].try_into().unwrap()), 0, "{key} is not zero already");
            bytes[v..v + 4].copy_from_slice(&(value as u32).to_le_bytes());
        }
        10 | 11 => bytes[v..v + 8].copy_from_slice(&value.to_le_bytes()),
        other => panic!("{key} has GGUF value type {other}, not an integer"),
    }
    let path = dir.join(format!("{key}-{value}.gguf"));
    std::fs::write(&path, bytes).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gguf_with_zero_attention_heads_is_refused_at_startup() {
    use loramux_engine::ModelLocation;
    init_logs();
    let tmp = tempfile::tempdir().unwrap();
    // The same edit with a valid value starts: the file itself is sound.
    let two = gguf_with(tmp.path(), "llama.attention.head_count", 2);
    let srv = TestServer::start(ModelLocation::Gguf(two), tiny_settings()).await;
    assert!(!srv.completion_text("tiny", "hello", 4).await.is_empty());
    srv.shutdown().await;

    let zero = gguf_with(tmp.path(), "llama.attention.head_count", 0);
    let e = match loramux_server::Server::start(ModelLocation::Gguf(zero), tiny_settings()).await {
        Ok(_) => panic!("a model with no attention heads started"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("head_count") || e.contains("head count"), "the error names the head count: {e}");
    assert!(e.contains('0'), "{e}");
    assert!(!e.contains("died") && !e.contains("panic"), "a clear error, not a crash: {e}");
}
