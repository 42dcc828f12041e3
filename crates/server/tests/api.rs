//! Integration tests: the real server (router + batch loop + engine) on the tiny fixture
//! models, on a loopback port, over HTTP.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::future::join_all;
use serde_json::{json, Value};

const PROMPTS: [&str; 2] = ["hello there", "one two three four"];

fn with_modules(arch: &str, names: &[&str]) -> loramux_server::Settings {
    let mut s = tiny_settings();
    s.lora_modules = names.iter().map(|n| (n.to_string(), fixture_adapter(arch, n))).collect();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_adapter_concurrent_requests_match_each_alone() {
    for arch in ["llama", "qwen2", "qwen3"] {
        let srv = Arc::new(TestServer::tiny(arch, with_modules(arch, &["a", "b", "c"])).await);
        let models = ["tiny", "a", "b", "c"];
        let mut alone = HashMap::new();
        for m in models {
            for p in PROMPTS {
                alone.insert((m, p), srv.chat_text(m, p, 12).await);
            }
        }
        for p in PROMPTS {
            assert!(
                ["a", "b", "c"].iter().any(|m| alone[&(*m, p)] != alone[&("tiny", p)]),
                "{arch}: adapters do not change the output at all"
            );
        }
        // Everything at once, twice over, chat and completions interleaved.
        let mut tasks = Vec::new();
        for round in 0..2 {
            for m in models {
                for p in PROMPTS {
                    let srv = srv.clone();
                    tasks.push(tokio::spawn(async move { ((m, p), srv.chat_text(m, p, 12).await, round) }));
                }
            }
        }
        for r in join_all(tasks).await {
            let (key, text, _) = r.unwrap();
            assert_eq!(text, alone[&key], "{arch}: {key:?} batched with other adapters differs from alone");
        }
        let mut completions = Vec::new();
        for m in models {
            completions.push((m, srv.completion_text(m, "the cat", 10).await));
        }
        let batch = join_all(models.iter().map(|m| {
            let srv = srv.clone();
            async move { srv.completion_text(m, "the cat", 10).await }
        }))
        .await;
        for ((m, alone), batched) in completions.iter().zip(batch) {
            assert_eq!(&batched, alone, "{arch}: completion for {m}");
        }
        Arc::into_inner(srv).unwrap().shutdown().await;
    }
}

fn content_of(events: &[String], api_chat: bool) -> (String, Vec<Value>) {
    let mut text = String::new();
    let mut chunks = Vec::new();
    for e in events.iter().filter(|e| e.as_str() != "[DONE]") {
        let v: Value = serde_json::from_str(e).unwrap_or_else(|_| panic!("chunk is not JSON: {e}"));
        if let Some(c) = v["choices"].get(0) {
            let piece = if api_chat { &c["delta"]["content"] } else { &c["text"] };
            text.push_str(piece.as_str().unwrap_or(""));
        }
        chunks.push(v);
    }
    (text, chunks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_matches_non_streaming() {
    let srv = TestServer::tiny("llama", with_modules("llama", &["a", "b"])).await;
    for model in ["tiny", "b"] {
        // Chat.
        let body = json!({"model": model, "messages": [{"role": "user", "content": "tell me"}], "max_tokens": 16, "temperature": 0});
        let (status, full) = srv.post("/v1/chat/completions", &body).await;
        assert_eq!(status, 200, "{full}");
        assert_eq!(full["object"], "chat.completion");
        assert_eq!(full["model"], model);
        assert!(full["id"].as_str().unwrap().starts_with("chatcmpl-"));
        let mut sbody = body.clone();
        sbody["stream"] = json!(true);
        sbody["stream_options"] = json!({"include_usage": true});
        let (status, events) = srv.stream("/v1/chat/completions", &sbody).await;
        assert_eq!(status, 200);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let (text, chunks) = content_of(&events, true);
        assert_eq!(text, full["choices"][0]["message"]["content"].as_str().unwrap());
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
        let finish = &chunks[chunks.len() - 2];
        assert_eq!(finish["choices"][0]["finish_reason"], full["choices"][0]["finish_reason"]);
        let usage = chunks.last().unwrap();
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"], full["usage"]);
        assert!(chunks[..chunks.len() - 1].iter().all(|c| c["usage"].is_null()), "usage: null on every other chunk");

        // Completions.
        let body = json!({"model": model, "prompt": "once upon", "max_tokens": 16, "temperature": 0});
        let (status, full) = srv.post("/v1/completions", &body).await;
        assert_eq!(status, 200, "{full}");
        assert_eq!(full["object"], "text_completion");
        assert_eq!(full["usage"]["completion_tokens"], 16);
        assert_eq!(full["choices"][0]["finish_reason"], "length");
        let mut sbody = body.clone();
        sbody["stream"] = json!(true);
        let (_, events) = srv.stream("/v1/completions", &sbody).await;
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let (text, chunks) = content_of(&events, false);
        assert_eq!(text, full["choices"][0]["text"].as_str().unwrap());
        assert!(chunks.iter().all(|c| c.get("usage").is_none()), "no usage without include_usage");
    }

    // Logprobs: the same tokens streamed and not.
    let body = json!({"model": "a", "messages": [{"role": "user", "content": "x"}], "max_tokens": 6, "temperature": 0, "logprobs": true, "top_logprobs": 2});
    let (_, full) = srv.post("/v1/chat/completions", &body).await;
    let content = full["choices"][0]["logprobs"]["content"].as_array().unwrap().clone();
    assert_eq!(content.len(), 6);
    for t in &content {
        assert!(t["logprob"].as_f64().unwrap() <= 0.0);
        assert_eq!(t["top_logprobs"].as_array().unwrap().len(), 2);
        assert!(t["bytes"].is_array());
        // Greedy: the chosen token is the most likely one.
        assert!((t["top_logprobs"][0]["logprob"].as_f64().unwrap() - t["logprob"].as_f64().unwrap()).abs() < 1e-5);
    }
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let (_, events) = srv.stream("/v1/chat/completions", &sbody).await;
    let (_, chunks) = content_of(&events, true);
    let streamed: Vec<Value> = chunks.iter().filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array()).flatten().cloned().collect();
    assert_eq!(streamed, content);
    let (_, full) = srv.post("/v1/completions", &json!({"model": "a", "prompt": "x y", "max_tokens": 5, "temperature": 0, "logprobs": 3})).await;
    let lp = &full["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 5);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 5);
    assert_eq!(lp["text_offset"][0], 0);
    assert!(lp["top_logprobs"][0].as_object().unwrap().len() <= 3);

    // n > 1: independent choices (identical under greedy), usage adds up.
    let (status, v) = srv.post("/v1/completions", &json!({"model": "b", "prompt": "abc", "max_tokens": 5, "temperature": 0, "n": 2})).await;
    assert_eq!(status, 200, "{v}");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!(choices[1]["index"], 1);
    assert_eq!(choices[0]["text"], choices[1]["text"]);
    assert_eq!(v["usage"]["completion_tokens"], 10);
    let (_, events) = srv.stream("/v1/chat/completions", &json!({"model": "b", "messages": [{"role": "user", "content": "q"}], "max_tokens": 4, "temperature": 0, "n": 2, "stream": true})).await;
    let (_, chunks) = content_of(&events, true);
    let finished: Vec<i64> = chunks.iter().filter(|c| !c["choices"][0]["finish_reason"].is_null()).map(|c| c["choices"][0]["index"].as_i64().unwrap()).collect();
    assert_eq!(finished.len(), 2, "{events:?}");

    // Seeded sampling repeats; stop strings cut the text.
    let sampled = json!({"model": "a", "prompt": "abc", "max_tokens": 12, "temperature": 0.9, "top_p": 0.95, "top_k": 50, "seed": 7});
    let (_, x) = srv.post("/v1/completions", &sampled).await;
    let (_, y) = srv.post("/v1/completions", &sampled).await;
    assert_eq!(x["choices"][0]["text"], y["choices"][0]["text"]);
    let text = srv.completion_text("tiny", "once upon", 16).await;
    if let Some((i, c)) = text.char_indices().skip(2).find(|(_, c)| c.is_ascii_alphanumeric()) {
        let stop = c.to_string();
        let want = &text[..text.find(&stop).unwrap()];
        assert!(text.find(&stop).unwrap() <= i);
        for stream in [false, true] {
            let body = json!({"model": "tiny", "prompt": "once upon", "max_tokens": 16, "temperature": 0, "stop": [stop.clone(), "\u{1}zz"], "stream": stream});
            let got = if stream {
                let (_, events) = srv.stream("/v1/completions", &body).await;
                let (t, chunks) = content_of(&events, false);
                assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "stop");
                t
            } else {
                let (_, v) = srv.post("/v1/completions", &body).await;
                assert_eq!(v["choices"][0]["finish_reason"], "stop");
                v["choices"][0]["text"].as_str().unwrap().to_string()
            };
            assert_eq!(got, want, "stop {stop:?} in {text:?}");
        }
    }
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_use_unload_reuse_and_path_escapes() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let outside = tmp.path().join("outside");
    copy_adapter(&fixture_adapter("llama", "a"), &root.join("a-copy"));
    copy_adapter(&fixture_adapter("llama", "b"), &outside.join("evil"));
    std::os::unix::fs::symlink(outside.join("evil"), root.join("link")).unwrap();
    // Broken: truncated weights. Mismatched: the config's rank does not fit the tensors.
    copy_adapter(&fixture_adapter("llama", "a"), &root.join("broken"));
    std::fs::write(root.join("broken/adapter_model.safetensors"), b"\x10\x00\x00\x00garbage").unwrap();
    copy_adapter(&fixture_adapter("llama", "a"), &root.join("mismatched"));
    let cfg = std::fs::read_to_string(root.join("mismatched/adapter_config.json")).unwrap().replace("\"r\": 4", "\"r\": 8");
    std::fs::write(root.join("mismatched/adapter_config.json"), cfg).unwrap();

    let mut s = with_modules("llama", &["a"]);
    s.enable_lora_updates = true;
    s.admin_api_key = Some("admin".into());
    s.allowed_lora_roots = vec![root.clone()];
    let srv = TestServer::tiny("llama", s).await;
    let want = srv.chat_text("a", "hi", 10).await;
    let base = srv.chat_text("tiny", "hi", 10).await;
    let load = |name: &str, path: &str| json!({"lora_name": name, "lora_path": path});
    let admin = Some("admin");

    let (st, v) = srv.post_key("/v1/load_lora_adapter", &load("x", "a-copy"), None).await;
    assert_error(st, &v, 401, "load without a key");
    let (st, v) = srv.post_key("/v1/load_lora_adapter", &load("x", "a-copy"), Some("user")).await;
    assert_error(st, &v, 403, "load with a non-admin key");

    let (st, v) = srv.post_key("/v1/load_lora_adapter", &load("x", "a-copy"), admin).await;
    assert_eq!(st, 200, "{v}");
    assert!(v.as_str().unwrap().starts_with("Success"));
    let (_, models) = srv.get_json("/v1/models").await;
    let x = models["data"].as_array().unwrap().iter().find(|m| m["id"] == "x").cloned().expect("x listed");
    assert_eq!(x["parent"], "tiny");
    assert_eq!(srv.chat_text("x", "hi", 10).await, want);
    let (st, v) = srv.post_key("/v1/load_lora_adapter", &load("x", "a-copy"), admin).await;
    assert_error(st, &v, 400, "loading a name twice");

    // Broken and mismatched adapters are refused and change nothing.
    let before_models = srv.get_json("/v1/models").await.1;
    let resident = srv.metric("loramux_adapters_resident").await;
    for (name, what) in [("broken", "truncated weights"), ("mismatched", "rank mismatch")] {
        let (st, v) = srv.post_key("/v1/load_lora_adapter", &load(name, name), admin).await;
        assert_error(st, &v, 400, what);
        assert_eq!(srv.chat_text("x", "hi", 10).await, want, "x still serves after {what}");
    }
    assert_eq!(srv.get_json("/v1/models").await.1, before_models);
    assert_eq!(srv.metric("loramux_adapters_resident").await, resident);
    assert_eq!(srv.metric("loramux_adapter_load_failures_total").await, 2.0);

    // Paths outside the roots.
    let outside_abs = outside.join("evil").display().to_string();
    let fixture_abs = fixture_adapter("llama", "b").display().to_string();
    let escape_cases = [
        ("../outside/evil", 403),
        ("a-copy/../a-copy", 403),
        (outside_abs.as_str(), 403),
        (fixture_abs.as_str(), 403),
        ("link", 403),
        ("missing", 404),
        ("", 400),
    ];
    for (path, want_status) in escape_cases {
        let (st, v) = srv.post_key("/v1/load_lora_adapter", &load("y", path), admin).await;
        assert_error(st, &v, want_status, &format!("lora_path {path:?}"));
    }
    let (st, v) = srv.post_key("/v1/load_lora_adapter", &json!({"lora_name": "y"}), admin).await;
    assert_error(st, &v, 400, "missing lora_path");
    let (st, v) = srv.post_key("/v1/load_lora_adapter", &load("tiny", "a-copy"), admin).await;
    assert_error(st, &v, 400, "the base model's name");

    // Unload, then the name is gone; load again and it serves again.
    let (st, v) = srv.post_key("/v1/unload_lora_adapter", &json!({"lora_name": "x"}), admin).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = srv.post("/v1/chat/completions", &chat_body("x", "hi", 4)).await;
    assert_error(st, &v, 404, "unloaded adapter");
    assert_eq!(v["error"]["code"], "model_not_found");
    let (st, v) = srv.post_key("/v1/unload_lora_adapter", &json!({"lora_name": "x"}), admin).await;
    assert_error(st, &v, 404, "unloading twice");
    let abs = root.join("a-copy").display().to_string();
    let (st, v) = srv.post_key("/v1/load_lora_adapter", &load("x", &abs), admin).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(srv.chat_text("x", "hi", 10).await, want);
    assert_eq!(srv.chat_text("tiny", "hi", 10).await, base);
    srv.shutdown().await;

    // Off unless enabled.
    let srv = TestServer::tiny("llama", tiny_settings()).await;
    let (st, v) = srv.post_key("/v1/load_lora_adapter", &load("x", "a-copy"), admin).await;
    assert_error(st, &v, 404, "runtime loading disabled");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_dir_lazy_loading_beyond_max_loras() {
    // Expected texts from adapters a, b, c loaded the ordinary way.
    let reference = TestServer::tiny("llama", with_modules("llama", &["a", "b", "c"])).await;
    let mut want = HashMap::new();
    for src in ["a", "b", "c"] {
        want.insert(src, reference.chat_text(src, "hello", 10).await);
    }
    reference.shutdown().await;

    let tmp = tempfile::tempdir().unwrap();
    let names: Vec<(String, &str)> = (1..=3).flat_map(|i| ["a", "b", "c"].map(|s| (format!("{s}{i}"), s))).collect();
    for (name, src) in &names {
        copy_adapter(&fixture_adapter("llama", src), &tmp.path().join(name));
    }
    std::fs::create_dir_all(tmp.path().join("not-an-adapter")).unwrap();
    copy_adapter(&fixture_adapter("llama", "a"), &tmp.path().join("broken"));
    std::fs::write(tmp.path().join("broken/adapter_model.safetensors"), b"not safetensors").unwrap();
    let mut s = tiny_settings();
    s.lora_dirs = vec![tmp.path().to_path_buf()];
    s.lora.max_loras = 2;
    let srv = Arc::new(TestServer::tiny("llama", s).await);

    let (_, models) = srv.get_json("/v1/models").await;
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 2 + names.len(), "{ids:?}");
    assert!(!ids.contains(&"not-an-adapter"));
    assert_eq!(srv.metric("loramux_adapters_resident").await, 0.0, "nothing loaded before use");

    // Round robin, one at a time.
    for (name, src) in names.iter().chain(names.iter()) {
        assert_eq!(srv.chat_text(name, "hello", 10).await, want[src], "{name}");
    }
    // All at once: more adapters wanted than fit; some wait for a slot, none starve.
    let tasks = names.iter().cycle().take(names.len() * 3).map(|(name, src)| {
        let srv = srv.clone();
        let name = name.clone();
        let src = *src;
        async move { (srv.chat_text(&name, "hello", 10).await, name, src) }
    });
    for (text, name, src) in join_all(tasks).await {
        assert_eq!(text, want[src], "{name} under contention");
    }
    assert!(srv.metric("loramux_adapters_resident").await <= 2.0);
    assert!(srv.metric("loramux_adapter_loads_total").await >= names.len() as f64);
    assert!(srv.metric("loramux_adapter_evictions_total").await >= (names.len() - 2) as f64);
    assert!(srv.metric("loramux_adapter_load_seconds_total").await > 0.0);

    // A broken adapter in the directory fails its requests with 400 (streaming or not) and
    // nothing else.
    for stream in [false, true] {
        let mut body = chat_body("broken", "hello", 4);
        body["stream"] = json!(stream);
        let (st, text) = srv.post_raw("/v1/chat/completions", body.to_string(), None).await;
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_error(st, &v, 400, "lazily loaded broken adapter");
        assert_eq!(v["error"]["code"], "invalid_adapter");
    }
    assert_eq!(srv.chat_text("a1", "hello", 10).await, want["a"]);

    // An adapter copied in after startup is found by its folder name.
    copy_adapter(&fixture_adapter("llama", "c"), &tmp.path().join("late"));
    assert_eq!(srv.chat_text("late", "hello", 10).await, want["c"]);
    let (_, models) = srv.get_json("/v1/models").await;
    assert!(models["data"].as_array().unwrap().iter().any(|m| m["id"] == "late" && m["parent"] == "tiny"));
    let (st, v) = srv.post("/v1/chat/completions", &chat_body("../late", "x", 2)).await;
    assert_error(st, &v, 404, "a path as model name");
    Arc::into_inner(srv).unwrap().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_adapter_is_never_evicted_and_per_adapter_gauges_follow_use() {
    // Two slots, three adapters, one pinned: b and c take turns in the other slot.
    let mut settings = with_modules("llama", &["a", "b", "c"]);
    settings.lora.max_loras = 2;
    settings.pinned_loras = vec!["a".into()];
    let srv = TestServer::tiny("llama", settings).await;
    let gauges = |text: &str, name: &str| {
        [
            metric_value(text, &format!("loramux_adapter_resident{{adapter=\"{name}\"}}")),
            metric_value(text, &format!("loramux_adapter_pinned{{adapter=\"{name}\"}}")),
            metric_value(text, &format!("loramux_adapter_requests_total{{adapter=\"{name}\"}}")),
        ]
    };
    let (_, text) = srv.get("/metrics").await;
    assert_eq!(gauges(&text, "a"), [1.0, 1.0, 0.0]);
    assert!(metric_value(&text, "loramux_adapter_resident_bytes{adapter=\"a\"}") > 0.0);
    assert!(!text.contains("loramux_adapter_last_used_timestamp_seconds{adapter=\"a\"}"), "never used: no last-use time");
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    for m in ["b", "c", "b", "c", "b"] {
        srv.chat_text(m, "hello", 2).await;
        let (_, text) = srv.get("/metrics").await;
        assert_eq!(gauges(&text, "a")[..2], [1.0, 1.0], "pinned adapter evicted after a request on {m}");
    }
    let (_, text) = srv.get("/metrics").await;
    assert_eq!(gauges(&text, "b"), [1.0, 0.0, 3.0]);
    assert_eq!(gauges(&text, "c"), [0.0, 0.0, 2.0]);
    assert_eq!(metric_value(&text, "loramux_adapter_resident_bytes{adapter=\"c\"}"), 0.0);
    assert!(metric_value(&text, "loramux_adapter_evictions_total") >= 4.0);
    let last_b = metric_value(&text, "loramux_adapter_last_used_timestamp_seconds{adapter=\"b\"}");
    assert!(last_b >= before.floor(), "last use of b {last_b} is after the test started {before}");
    srv.shutdown().await;

    // Pinning every slot, or an adapter nobody registered, fails startup with a clear message.
    for (pins, max_loras, want) in [(vec!["a", "b"], 2, "one slot must stay free"), (vec!["zzz"], 4, "no adapter of that name")] {
        let mut settings = with_modules("llama", &["a", "b"]);
        settings.lora.max_loras = max_loras;
        settings.pinned_loras = pins.iter().map(|s| s.to_string()).collect();
        let err = loramux_server::Server::start(loramux_engine::ModelLocation::HfDir(fixture("llama")), settings)
            .await
            .err()
            .expect("startup refused");
        assert!(err.to_string().contains(want), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_system_prompt_is_prefilled_once_per_adapter() {
    let srv = TestServer::tiny("llama", with_modules("llama", &["a", "b"])).await;
    let mut no_cache = with_modules("llama", &["a", "b"]);
    no_cache.prefix_cache_bytes = 0;
    let cold = TestServer::tiny("llama", no_cache).await;
    let system = "the quick brown fox jumps over the lazy dog and then it runs far away ".repeat(12);
    let body = |model: &str, question: &str| {
        json!({"model": model, "max_tokens": 8, "temperature": 0,
               "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]})
    };
    let counters = |text: &str| {
        (
            metric_value(text, "vllm:prefix_cache_queries_total{model_name=\"tiny\"}"),
            metric_value(text, "vllm:prefix_cache_hits_total{model_name=\"tiny\"}"),
        )
    };
    let text_of = |v: &Value| v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    for (model, question, want_hit) in [("a", "who?", false), ("a", "why?", true), ("b", "why?", false), ("tiny", "why?", false), ("b", "how?", true)] {
        let (_, before) = srv.get("/metrics").await;
        let (st, v) = srv.post("/v1/chat/completions", &body(model, question)).await;
        assert_eq!(st, 200, "{v}");
        let (_, after) = srv.get("/metrics").await;
        let ((q0, h0), (q1, h1)) = (counters(&before), counters(&after));
        let prompt_tokens = v["usage"]["prompt_tokens"].as_f64().unwrap();
        assert_eq!(q1 - q0, prompt_tokens, "every prompt token is queried");
        assert_eq!(h1 > h0, want_hit, "{model} {question}: hit {h0} -> {h1}");
        assert!(h1 - h0 <= prompt_tokens - 1.0, "the last prompt token is always computed");
        let (_, want) = cold.post("/v1/chat/completions", &body(model, question)).await;
        assert_eq!(text_of(&v), text_of(&want), "{model} {question}: a cached prefix changed the output");
    }
    let (_, text) = cold.get("/metrics").await;
    assert_eq!(counters(&text), (0.0, 0.0), "--enable-prefix-caching false looks nothing up");
    srv.shutdown().await;
    cold.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_merge_folds_a_sole_adapter_unfolds_for_others_and_answers_the_same() {
    let mut settings = with_modules("llama", &["a", "b"]);
    settings.auto_merge_after = Some(Duration::ZERO);
    let srv = TestServer::tiny("llama", settings).await;
    let plain = TestServer::tiny("llama", with_modules("llama", &["a", "b"])).await;
    let series = |text: &str, kind: &str, name: &str| metric_value(text, &format!("loramux_lora_{kind}_total{{adapter=\"{name}\"}}"));
    // Idle, the fold stays; the base unfolds it; b then a each fold in turn.
    for (model, merges_a, unmerges_a) in [("a", 1.0, 0.0), ("a", 1.0, 0.0), ("tiny", 1.0, 1.0), ("b", 1.0, 1.0), ("a", 2.0, 1.0)] {
        let got = srv.chat_text(model, "hello there", 8).await;
        assert_eq!(got, plain.chat_text(model, "hello there", 8).await, "{model}: merged weights changed the answer");
        let (_, text) = srv.get("/metrics").await;
        assert_eq!((series(&text, "merges", "a"), series(&text, "unmerges", "a")), (merges_a, unmerges_a), "after a request on {model}");
    }
    let (_, text) = srv.get("/metrics").await;
    assert_eq!(metric_value(&text, "loramux_lora_merged{adapter=\"a\"}"), 1.0);
    assert_eq!(metric_value(&text, "loramux_lora_merges_total{adapter=\"b\"}"), 1.0);
    assert_eq!(metric_value(&text, "loramux_lora_unmerges_total{adapter=\"b\"}"), 1.0);
    assert_eq!(metric_value(&text, "loramux_lora_merge_seconds_count"), 3.0);
    srv.shutdown().await;
    plain.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move() {
    let srv = TestServer::tiny("llama", with_modules("llama", &["a"])).await;
    let (st, text) = srv.get("/metrics").await;
    assert_eq!(st, 200);
    for name in [
        "vllm:num_requests_running{model_name=\"tiny\"} 0",
        "vllm:num_requests_waiting{model_name=\"tiny\"} 0",
        "vllm:kv_cache_usage_perc{model_name=\"tiny\"} 0",
        "vllm:gpu_cache_usage_perc{model_name=\"tiny\"} 0",
        "vllm:lora_requests_info{max_lora=\"8\",running_lora_adapters=\"\",waiting_lora_adapters=\"\"} ",
        "loramux_adapter_resident{adapter=\"a\"} 1",
        "loramux_adapters_resident 1",
        "loramux_max_loras 8",
    ] {
        assert!(text.contains(name), "missing {name} in {text}");
    }
    if cfg!(target_os = "linux") {
        let rss = metric_value(&text, "process_resident_memory_bytes");
        let peak = metric_value(&text, "loramux_process_peak_resident_memory_bytes");
        assert!(rss > 0.0 && peak >= rss, "process memory: rss {rss}, peak {peak}");
    }
    let info_time = text.lines().find(|l| l.starts_with("vllm:lora_requests_info")).unwrap().rsplit(' ').next().unwrap().parse::<f64>().unwrap();
    assert!(info_time > 1.7e9, "lora_requests_info value is a Unix time");
    assert!(metric_value(&text, "loramux_adapter_resident_bytes{adapter=\"a\"}") > 0.0);

    let series = [
        "loramux_requests_total{adapter=\"a\",finish_reason=\"length\"}",
        "loramux_generation_tokens_total{adapter=\"a\"}",
        "loramux_prompt_tokens_total{adapter=\"a\"}",
        "loramux_time_to_first_token_seconds_count{adapter=\"a\"}",
        "loramux_inter_token_latency_seconds_count{adapter=\"a\"}",
        "loramux_e2e_request_latency_seconds_count{adapter=\"a\"}",
        "loramux_requests_total{adapter=\"tiny\",finish_reason=\"length\"}",
        "vllm:generation_tokens_total{model_name=\"tiny\"}",
        "vllm:time_to_first_token_seconds_count{model_name=\"tiny\"}",
        "loramux_batch_size_count",
        "loramux_request_errors_total{status=\"404\"}",
    ];
    let before: Vec<f64> = series.iter().map(|s| metric_value(&text, s)).collect();
    srv.chat_text("a", "count", 5).await;
    srv.completion_text("tiny", "count", 3).await;
    let (st, _) = srv.post("/v1/completions", &completion_body("nope", "x", 1)).await;
    assert_eq!(st, 404);
    let (_, text) = srv.get("/metrics").await;
    let after: Vec<f64> = series.iter().map(|s| metric_value(&text, s)).collect();
    let delta: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert_eq!(delta[0], 1.0);
    assert_eq!(delta[1], 5.0);
    assert!(delta[2] > 0.0);
    assert_eq!(delta[3], 1.0);
    assert_eq!(delta[4], 4.0);
    assert_eq!(delta[5], 1.0);
    assert_eq!(delta[6], 1.0);
    assert_eq!(delta[7], 8.0);
    assert_eq!(delta[8], 2.0);
    assert!(delta[9] >= 5.0);
    assert_eq!(delta[10], 1.0);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_4xx_and_good_requests_still_complete() {
    let mut s = with_modules("llama", &["a"]);
    s.max_request_bytes = 64 * 1024;
    let srv = Arc::new(TestServer::tiny("llama", s).await);
    let good_chat = srv.chat_text("tiny", "good", 12).await;
    let good_chat_a = srv.chat_text("a", "good", 12).await;
    let good_completion = srv.completion_text("a", "good", 12).await;

    // A long request keeps running through all of it.
    let long = {
        let srv = srv.clone();
        tokio::spawn(async move {
            srv.stream("/v1/completions", &json!({"model": "a", "prompt": "long", "max_tokens": 300, "temperature": 0, "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}})).await
        })
    };

    let msgs = json!([{"role": "user", "content": "x"}]);
    let long_prompt = "word ".repeat(2000);
    let chat = "/v1/chat/completions";
    let comp = "/v1/completions";
    let cases: Vec<(&str, &str, Vec<u8>, u16)> = vec![
        ("malformed JSON", chat, b"{\"model\": \"tiny\", \"messages\": [".to_vec(), 400),
        ("not an object", chat, b"[1, 2, 3]".to_vec(), 400),
        ("binary body", chat, vec![0xff, 0xfe, 0x00, 0x01], 400),
        ("empty body", chat, Vec::new(), 400),
        ("missing messages", chat, json!({"model": "tiny"}).to_string().into_bytes(), 400),
        ("messages not a list", chat, json!({"model": "tiny", "messages": "hi"}).to_string().into_bytes(), 400),
        ("empty messages", chat, json!({"model": "tiny", "messages": []}).to_string().into_bytes(), 400),
        ("message without content", chat, json!({"messages": [{"role": "user"}]}).to_string().into_bytes(), 400),
        ("unknown role", chat, json!({"messages": [{"role": "wizard", "content": "x"}]}).to_string().into_bytes(), 400),
        ("image part", chat, json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}).to_string().into_bytes(), 400),
        ("temperature as string", chat, json!({"messages": msgs, "temperature": "hot"}).to_string().into_bytes(), 400),
        ("negative temperature", chat, json!({"messages": msgs, "temperature": -1}).to_string().into_bytes(), 400),
        ("top_p 0", chat, json!({"messages": msgs, "top_p": 0}).to_string().into_bytes(), 400),
        ("max_tokens 0", chat, json!({"messages": msgs, "max_tokens": 0}).to_string().into_bytes(), 400),
        ("max_tokens negative", chat, json!({"messages": msgs, "max_tokens": -5}).to_string().into_bytes(), 400),
        ("max_tokens huge", chat, json!({"messages": msgs, "max_tokens": 1_000_000}).to_string().into_bytes(), 400),
        ("max_tokens fractional", chat, json!({"messages": msgs, "max_tokens": 2.5}).to_string().into_bytes(), 400),
        ("max_tokens as string", chat, json!({"messages": msgs, "max_tokens": "10"}).to_string().into_bytes(), 400),
        ("max_completion_tokens 0", chat, json!({"messages": msgs, "max_completion_tokens": 0}).to_string().into_bytes(), 400),
        ("n too large", chat, json!({"messages": msgs, "n": 100}).to_string().into_bytes(), 400),
        ("n zero", chat, json!({"messages": msgs, "n": 0}).to_string().into_bytes(), 400),
        ("stop as number", chat, json!({"messages": msgs, "stop": 5}).to_string().into_bytes(), 400),
        ("unknown parameter", chat, json!({"messages": msgs, "frobnicate": true}).to_string().into_bytes(), 400),
        ("penalty out of range", chat, json!({"messages": msgs, "frequency_penalty": 2.5}).to_string().into_bytes(), 400),
        ("tool of an unsupported type", chat, json!({"messages": msgs, "tools": [{"type": "retrieval"}]}).to_string().into_bytes(), 400),
        ("logit_bias out of range", chat, json!({"messages": msgs, "logit_bias": {"1": 500}}).to_string().into_bytes(), 400),
        ("invalid JSON schema", chat, json!({"messages": msgs, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nosuchtype"}}}}).to_string().into_bytes(), 400),
        ("stream_options without stream", chat, json!({"messages": msgs, "stream_options": {"include_usage": true}}).to_string().into_bytes(), 400),
        ("top_logprobs without logprobs", chat, json!({"messages": msgs, "top_logprobs": 3}).to_string().into_bytes(), 400),
        ("top_logprobs above 20", chat, json!({"messages": msgs, "logprobs": true, "top_logprobs": 21}).to_string().into_bytes(), 400),
        ("unknown model", chat, json!({"model": "nope", "messages": msgs}).to_string().into_bytes(), 404),
        ("model as number", chat, json!({"model": 3, "messages": msgs}).to_string().into_bytes(), 400),
        ("prompt too long (chat)", chat, json!({"messages": [{"role": "user", "content": long_prompt}]}).to_string().into_bytes(), 400),
        ("prompt too long", comp, json!({"prompt": long_prompt}).to_string().into_bytes(), 400),
        ("prompt plus max_tokens too long", comp, json!({"prompt": "word ".repeat(100), "max_tokens": 500}).to_string().into_bytes(), 400),
        ("missing prompt", comp, json!({"model": "tiny"}).to_string().into_bytes(), 400),
        ("prompt as number", comp, json!({"prompt": 12}).to_string().into_bytes(), 400),
        ("token outside the vocabulary", comp, json!({"prompt": [1, 99999]}).to_string().into_bytes(), 400),
        ("negative token", comp, json!({"prompt": [-1]}).to_string().into_bytes(), 400),
        ("empty prompt", comp, json!({"prompt": ""}).to_string().into_bytes(), 400),
        ("echo", comp, json!({"prompt": "x", "echo": true, "stream": true}).to_string().into_bytes(), 400),
        ("best_of under n", comp, json!({"prompt": "x", "n": 2, "best_of": 1}).to_string().into_bytes(), 400),
        ("logprobs above 20", comp, json!({"prompt": "x", "logprobs": 50}).to_string().into_bytes(), 400),
        ("unknown adapter (completions)", comp, json!({"model": "missing-adapter", "prompt": "x"}).to_string().into_bytes(), 404),
        ("oversized body", comp, json!({"prompt": "x".repeat(100 * 1024)}).to_string().into_bytes(), 413),
        ("adapter load while disabled", "/v1/load_lora_adapter", json!({"lora_name": "q", "lora_path": "/tmp"}).to_string().into_bytes(), 404),
    ];
    for (i, (what, path, body, want_status)) in cases.iter().enumerate() {
        let (status, text) = if *want_status == 413 {
            // The server answers before reading the whole body and closes the connection: sent
            // on a connection of its own, so the next request does not find the pooled one cut.
            let r = srv.http.post(format!("{}{path}", srv.url)).header("connection", "close").header("content-type", "application/json").body(body.clone()).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap_or_default())
        } else {
            srv.post_raw(path, body.clone(), None).await
        };
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{what}: error body is not JSON: {text}"));
        assert_error(status, &v, *want_status, what);
        // Interleaved good requests.
        match i % 3 {
            0 => assert_eq!(srv.chat_text("tiny", "good", 12).await, good_chat, "after {what}"),
            1 => assert_eq!(srv.chat_text("a", "good", 12).await, good_chat_a, "after {what}"),
            _ => assert_eq!(srv.completion_text("a", "good", 12).await, good_completion, "after {what}"),
        }
    }
    let (status, _) = srv.get("/v1/chat/completions").await;
    assert_eq!(status, 405);
    let (status, text) = srv.get("/v1/nothing").await;
    assert_eq!(status, 404, "{text}");

    // The same bad requests all at once, mixed with good ones.
    let mut tasks = Vec::new();
    for (what, path, body, want_status) in cases.iter().cloned() {
        let s1 = srv.clone();
        tasks.push(tokio::spawn(async move {
            match s1.try_post_raw(path, body, None).await {
                Ok((status, _)) => assert_eq!(status, want_status, "concurrent {what}"),
                // Only the oversized body may be cut off mid-write (the sequential pass above
                // already checked its 413).
                Err(e) => assert!(want_status == 413 && e.is_request(), "concurrent {what}: {e}"),
            }
        }));
        let s2 = srv.clone();
        let want = good_chat_a.clone();
        tasks.push(tokio::spawn(async move { assert_eq!(s2.chat_text("a", "good", 12).await, want) }));
    }
    for t in join_all(tasks).await {
        t.unwrap();
    }

    let (status, events) = long.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 300);
    assert!(srv.metric("loramux_request_errors_total{status=\"400\"}").await >= 40.0);
    let (status, _) = srv.get("/health").await;
    assert_eq!(status, 200);
    Arc::into_inner(srv).unwrap().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_and_per_user_adapters() {
    let mut s = with_modules("llama", &["a", "b"]);
    s.api_keys = vec![
        loramux_server::auth::ApiKey::parse("k1").unwrap(),
        loramux_server::auth::ApiKey::parse("k2:b").unwrap(),
    ];
    let srv = TestServer::tiny("llama", s).await;
    let (st, v) = srv.post("/v1/chat/completions", &chat_body("tiny", "hi", 4)).await;
    assert_error(st, &v, 401, "no key");
    assert_eq!(v["error"]["code"], "invalid_api_key");
    let (st, v) = srv.post_key("/v1/chat/completions", &chat_body("tiny", "hi", 4), Some("wrong")).await;
    assert_error(st, &v, 401, "wrong key");
    let (st, _) = srv.get("/v1/models").await;
    assert_eq!(st, 401);
    let (st, _) = srv.get("/health").await;
    assert_eq!(st, 200, "health needs no key");
    let (st, _) = srv.get("/metrics").await;
    assert_eq!(st, 200, "metrics need no key");

    let srv = srv.with_key("k1");
    let base = srv.chat_text("tiny", "hi", 8).await;
    let a = srv.chat_text("a", "hi", 8).await;
    let b = srv.chat_text("b", "hi", 8).await;
    assert_ne!(base, b);
    let (st, _) = srv.get("/v1/models").await;
    assert_eq!(st, 200);

    // k2 carries adapter b: no model, or the base model's name, means b.
    let srv = srv.with_key("k2");
    let (st, v) = srv.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], b.as_str());
    assert_eq!(v["model"], "b");
    assert_eq!(srv.chat_text("tiny", "hi", 8).await, b);
    // Naming another adapter still works.
    assert_eq!(srv.chat_text("a", "hi", 8).await, a);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_budget_full_queues_and_preempts_without_failing() {
    let mut s = with_modules("llama", &["a", "b"]);
    // Tiny llama: 768 bytes of KV per token, 64-token blocks: room for 6 blocks only.
    s.max_model_len = Some(256);
    s.kv_cache_bytes = 6 * 64 * 768;
    let srv = Arc::new(TestServer::tiny("llama", s).await);
    let body = |m: &str, p: &str| json!({"model": m, "prompt": p, "max_tokens": 180, "temperature": 0, "ignore_eos": true});
    let jobs: Vec<(&str, String)> = (0..8).map(|i| (["tiny", "a", "b"][i % 3], format!("p{i}"))).collect();
    let mut want = Vec::new();
    for (m, p) in &jobs {
        let (st, v) = srv.post("/v1/completions", &body(m, p)).await;
        assert_eq!(st, 200, "{v}");
        want.push(v["choices"][0]["text"].as_str().unwrap().to_string());
    }
    let tasks = jobs.iter().map(|(m, p)| {
        let srv = srv.clone();
        let b = body(m, p);
        async move { srv.post("/v1/completions", &b).await }
    });
    for (i, (st, v)) in join_all(tasks).await.into_iter().enumerate() {
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["choices"][0]["text"].as_str().unwrap(), want[i], "job {i} under memory pressure");
        assert_eq!(v["usage"]["completion_tokens"], 180);
    }
    let preempted = srv.metric("loramux_preemptions_total").await;
    assert!(preempted > 0.0, "8 sequences of up to 3 blocks in 6 blocks must preempt");
    assert_eq!(srv.metric("loramux_kv_cache_capacity_bytes").await, (6 * 64 * 768) as f64);
    Arc::into_inner(srv).unwrap().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let srv = TestServer::tiny("llama", tiny_settings()).await;
    let url = srv.url.clone();
    let inflight = tokio::spawn({
        let url = url.clone();
        async move {
            let body = json!({"prompt": "go", "max_tokens": 400, "temperature": 0, "ignore_eos": true, "stream": true});
            let mut r = reqwest::Client::new().post(format!("{url}/v1/completions")).body(body.to_string()).send().await.unwrap();
            let status = r.status().as_u16();
            let mut text = String::new();
            while let Some(c) = r.chunk().await.unwrap() {
                text.push_str(std::str::from_utf8(&c).unwrap());
            }
            (status, text)
        }
    });
    // Shut down while it streams: it still completes, then the port closes.
    let t = Instant::now();
    while srv.metric("loramux_generation_tokens_total{adapter=\"tiny\"}").await < 1.0 {
        assert!(t.elapsed() < Duration::from_secs(10), "the request never started");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let t = Instant::now();
    srv.shutdown().await;
    assert!(t.elapsed() < Duration::from_secs(8), "shutdown is bounded");
    let (status, text) = inflight.await.unwrap();
    assert_eq!(status, 200);
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(text.contains("\"finish_reason\":\"length\""), "the in-flight request ran to its end");
    assert!(reqwest::Client::new().get(format!("{url}/health")).send().await.is_err(), "no longer accepting");
}

/// The fixture's reference outputs: prompts as token ids and greedy tokens per case.
fn expected(arch: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(arch).join("expected.json")).unwrap()).unwrap()
}

/// Greedy completion of token-id prompts, EOS ignored (as the reference outputs were made).
async fn greedy_texts(srv: &TestServer, model: &str, prompts: &Value, max_tokens: u64) -> Vec<String> {
    let mut out = Vec::new();
    for p in prompts.as_array().unwrap() {
        let body = json!({"model": model, "prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true});
        let (st, v) = srv.post("/v1/completions", &body).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], max_tokens);
        out.push(v["choices"][0]["text"].as_str().unwrap().to_string());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_lora_serves_the_merged_model_under_the_base_name() {
    let exp = expected("llama");
    let prompts = &exp["prompts"];
    let n = exp["max_new_tokens"].as_u64().unwrap();
    let tokenizer = loramux_engine::tokenizer::Tokenizer::from_dir(&fixture("llama")).unwrap();
    let reference = TestServer::tiny("llama", with_modules("llama", &["a", "c"])).await;
    let base = greedy_texts(&reference, "tiny", prompts, n).await;
    let mut unmerged = HashMap::new();
    for x in ["a", "c"] {
        unmerged.insert(x, greedy_texts(&reference, x, prompts, n).await);
    }
    let chat_a = reference.chat_text("a", "hello", 10).await;
    reference.shutdown().await;

    for x in ["a", "c"] {
        let mut s = tiny_settings();
        s.merge_lora = Some(fixture_adapter("llama", x));
        let srv = TestServer::tiny("llama", s).await;
        assert!(srv.server.as_ref().unwrap().info().merged_lora.is_some());
        let merged = greedy_texts(&srv, "tiny", prompts, n).await;
        assert_eq!(merged, unmerged[x], "--merge-lora {x}: base output equals adapter {x} served unmerged");
        assert_ne!(merged, base, "--merge-lora {x} changes the base output");
        let case = exp["cases"].as_array().unwrap().iter().find(|c| c["name"] == format!("{x}_merged")).unwrap();
        for (i, ids) in case["greedy"].as_array().unwrap().iter().enumerate() {
            let ids: Vec<u32> = ids.as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
            assert_eq!(merged[i], tokenizer.decode(&ids, true).unwrap(), "--merge-lora {x}: peft's merged tokens, prompt {i}");
        }
        if x == "a" {
            assert_eq!(srv.chat_text("tiny", "hello", 10).await, chat_a, "chat on the merged model");
            let (_, models) = srv.get_json("/v1/models").await;
            assert_eq!(models["data"].as_array().unwrap().len(), 1, "the merged adapter is not listed as an adapter: {models}");
        }
        srv.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_lora_with_other_adapters_on_top() {
    let mut s = with_modules("llama", &["b"]);
    s.merge_lora = Some(fixture_adapter("llama", "a"));
    let srv = Arc::new(TestServer::tiny("llama", s).await);
    let merged = srv.chat_text("tiny", "hello", 10).await;
    let on_top = srv.chat_text("b", "hello", 10).await;
    assert_ne!(on_top, merged, "adapter b applies on top of the merged weights");
    let tasks = (0..6).map(|i| {
        let srv = srv.clone();
        async move { (i, srv.chat_text(if i % 2 == 0 { "tiny" } else { "b" }, "hello", 10).await) }
    });
    for (i, text) in join_all(tasks).await {
        assert_eq!(&text, if i % 2 == 0 { &merged } else { &on_top }, "mixed batch, request {i}");
    }
    Arc::into_inner(srv).unwrap().shutdown().await;
}

/// `Server::start`'s error, for settings that must not start.
async fn start_error(location: loramux_engine::ModelLocation, settings: loramux_server::Settings) -> String {
    init_logs();
    match loramux_server::Server::start(location, settings).await {
        Ok(_) => panic!("the server started"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_lora_startup_errors_are_clear() {
    use loramux_engine::ModelLocation;
    let mut s = tiny_settings();
    s.merge_lora = Some(fixture_adapter("llama", "a"));
    // Refused before any weight is read: the file need not even exist.
    let e = start_error(ModelLocation::Gguf("/nonexistent/model-q4_1.gguf".into()), s.clone()).await;
    assert!(e.contains("--merge-lora") && e.contains("--dequantize"), "{e}");

    let tmp = tempfile::tempdir().unwrap();
    s.merge_lora = Some(tmp.path().join("missing"));
    let e = start_error(ModelLocation::HfDir(fixture("llama")), s.clone()).await;
    assert!(e.contains("--merge-lora") && e.contains("does not exist"), "{e}");

    copy_adapter(&fixture_adapter("llama", "a"), &tmp.path().join("mismatched"));
    let cfg = std::fs::read_to_string(tmp.path().join("mismatched/adapter_config.json")).unwrap().replace("\"r\": 4", "\"r\": 8");
    std::fs::write(tmp.path().join("mismatched/adapter_config.json"), cfg).unwrap();
    s.merge_lora = Some(tmp.path().join("mismatched"));
    let e = start_error(ModelLocation::HfDir(fixture("llama")), s.clone()).await;
    assert!(e.starts_with("--merge-lora") && e.contains("mismatched"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unloading_a_lora_dir_adapter_sticks_until_it_is_loaded_again() {
    let tmp = tempfile::tempdir().unwrap();
    copy_adapter(&fixture_adapter("llama", "a"), &tmp.path().join("da"));
    copy_adapter(&fixture_adapter("llama", "b"), &tmp.path().join("db"));
    let mut s = tiny_settings();
    s.lora_dirs = vec![tmp.path().to_path_buf()];
    s.enable_lora_updates = true;
    s.admin_api_key = Some("admin".into());
    let srv = TestServer::tiny("llama", s).await;
    let admin = Some("admin");
    let listed = |models: &Value, id: &str| models["data"].as_array().unwrap().iter().any(|m| m["id"] == id);
    let want = srv.chat_text("da", "hi", 10).await;
    let want_b = srv.chat_text("db", "hi", 10).await;

    let (st, v) = srv.post_key("/v1/unload_lora_adapter", &json!({"lora_name": "da"}), admin).await;
    assert_eq!(st, 200, "{v}");
    for round in 0..2 {
        // Still on disk, but gone: not listed, 404 on both endpoints, streamed or not.
        assert!(!listed(&srv.get_json("/v1/models").await.1, "da"), "round {round}");
        let (st, v) = srv.get_json("/v1/models/da").await;
        assert_error(st, &v, 404, "model card of an unloaded adapter");
        let (st, v) = srv.post("/v1/chat/completions", &chat_body("da", "hi", 4)).await;
        assert_error(st, &v, 404, "chat with an unloaded --lora-dir adapter");
        assert_eq!(v["error"]["code"], "model_not_found");
        let (st, v) = srv.post("/v1/completions", &completion_body("da", "hi", 4)).await;
        assert_error(st, &v, 404, "completion with an unloaded --lora-dir adapter");
        let mut body = chat_body("da", "hi", 4);
        body["stream"] = json!(true);
        let (st, text) = srv.post_raw("/v1/chat/completions", body.to_string(), None).await;
        assert_error(st, &serde_json::from_str(&text).unwrap(), 404, "streamed request for an unloaded adapter");
    }
    let (st, v) = srv.post_key("/v1/unload_lora_adapter", &json!({"lora_name": "da"}), admin).await;
    assert_error(st, &v, 404, "unloading twice");
    // The other adapter of the directory is untouched.
    assert_eq!(srv.chat_text("db", "hi", 10).await, want_b);

    // load_lora_adapter brings the name back (a path relative to the --lora-dir).
    let (st, v) = srv.post_key("/v1/load_lora_adapter", &json!({"lora_name": "da", "lora_path": "da"}), admin).await;
    assert_eq!(st, 200, "{v}");
    assert!(listed(&srv.get_json("/v1/models").await.1, "da"));
    assert_eq!(srv.chat_text("da", "hi", 10).await, want);

    // Unloaded before it was ever used (known from the startup scan only): same.
    let (st, v) = srv.post_key("/v1/unload_lora_adapter", &json!({"lora_name": "db"}), admin).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = srv.post("/v1/completions", &completion_body("db", "hi", 4)).await;
    assert_error(st, &v, 404, "unloaded adapter");
    assert!(!listed(&srv.get_json("/v1/models").await.1, "db"));
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignore_eos_runs_to_max_tokens_and_usage_counts_tokens() {
    let srv = TestServer::tiny("llama", with_modules("llama", &["a"])).await;
    const N: u64 = 48;
    // Prompts the tiny model ends with its EOS token after a few tokens.
    let cases = [
        ("/v1/completions", json!({"model": "tiny", "prompt": [42]})),
        ("/v1/completions", json!({"model": "a", "prompt": [32]})),
        ("/v1/chat/completions", json!({"model": "tiny", "messages": [{"role": "user", "content": "1"}]})),
    ];
    for (path, mut body) in cases {
        let chat = path.contains("chat");
        let what = format!("{path} {}", body["model"]);
        body["max_tokens"] = json!(N);
        body["temperature"] = json!(0);
        let (st, v) = srv.post(path, &body).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{what}: the model stops on its own: {v}");
        assert!(v["usage"]["completion_tokens"].as_u64().unwrap() < N, "{what}: {v}");

        body["ignore_eos"] = json!(true);
        let (st, v) = srv.post(path, &body).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], N, "{what}: {v}");
        assert_eq!(v["choices"][0]["finish_reason"], "length", "{what}");
        let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
        assert!(prompt_tokens > 0);
        assert_eq!(v["usage"]["total_tokens"], prompt_tokens + N);

        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let (st, events) = srv.stream(path, &body).await;
        assert_eq!(st, 200);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let (text, chunks) = content_of(&events, chat);
        let full = if chat { &v["choices"][0]["message"]["content"] } else { &v["choices"][0]["text"] };
        assert_eq!(text, full.as_str().unwrap(), "{what}: streamed text");
        assert_eq!(chunks.last().unwrap()["usage"], v["usage"], "{what}: streamed usage");
        assert_eq!(chunks[chunks.len() - 2]["choices"][0]["finish_reason"], "length", "{what}: streamed");
    }
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_cards_name_models_without_server_paths() {
    let tmp = tempfile::tempdir().unwrap();
    copy_adapter(&fixture_adapter("llama", "b"), &tmp.path().join("db"));
    let mut s = with_modules("llama", &["a"]);
    s.lora_dirs = vec![tmp.path().to_path_buf()];
    let srv = TestServer::tiny("llama", s).await;

    let (st, models) = srv.get_json("/v1/models").await;
    assert_eq!(st, 200, "{models}");
    fn strings(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) => out.push(s.clone()),
            Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
            Value::Object(o) => o.values().for_each(|x| strings(x, out)),
            _ => {}
        }
    }
    let mut values = Vec::new();
    strings(&models, &mut values);
    assert!(values.iter().all(|s| !s.contains('/') && !s.contains('\\')), "a path leaks: {models}");

    let list: loramux_server::protocol::ModelList = serde_json::from_value(models.clone()).expect("a model list");
    let ids: Vec<&str> = list.data.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["tiny", "a", "db"], "{models}");
    for card in &list.data {
        assert_eq!(card.root, card.id, "{models}");
        let want_parent = if card.id == "tiny" { None } else { Some("tiny") };
        assert_eq!(card.parent.as_deref(), want_parent, "{models}");
    }
    let (st, one) = srv.get_json("/v1/models/db").await;
    assert_eq!(st, 200, "{one}");
    assert_eq!(one, models["data"][2]);
    srv.shutdown().await;
}
