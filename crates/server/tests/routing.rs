//! Semantic routing (issue #20) over HTTP on the real SmolLM2-135M with the five task
//! adapters of adapters/tasks (each with its routing.json): `model: "auto"` lands a request
//! on its domain's adapter, `/v1/route` ranks, unsure requests fall back, bad routing data is
//! refused naming the field, and the metrics move. Skipped when the model is not cached.

mod common;

use common::*;
use loramux_engine::registry::{cached_model_path, known_model};
use loramux_engine::ModelLocation;
use loramux_server::{Server, Settings};
use serde_json::{json, Value};

const BASE: &str = "smollm2-135m";
const TASKS: [&str; 5] = ["sql", "json", "date", "sentiment", "numbers"];

fn model() -> Option<ModelLocation> {
    let path = cached_model_path(known_model(BASE).unwrap());
    if !path.exists() {
        eprintln!("skipped: {} is not cached (loramux models pull {BASE})", path.display());
        return None;
    }
    Some(ModelLocation::Gguf(path))
}

fn settings() -> Settings {
    let mut s = tiny_settings();
    s.served_model_name = BASE.into();
    s.max_model_len = Some(512);
    s
}

/// Held-out prompts of a task the router's defaults were not measured on (lines 50..55).
fn heldout(task: &str) -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("adapters/tasks").join(task).join("heldout.jsonl")).unwrap();
    text.lines().skip(50).take(5).map(|l| serde_json::from_str::<Value>(l).unwrap()["prompt"].as_str().unwrap().to_string()).collect()
}

fn chat(model: &str, content: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 1, "temperature": 0})
}

async fn post_with_headers(srv: &TestServer, path: &str, body: &Value) -> (u16, Option<String>, Value) {
    let r = srv.http.post(format!("{}{path}", srv.url)).header("content-type", "application/json").body(serde_json::to_vec(body).unwrap()).send().await.unwrap();
    let status = r.status().as_u16();
    let h = r.headers().get("x-loramux-route").map(|v| v.to_str().unwrap().to_string());
    let text = r.text().await.unwrap();
    (status, h, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_routes_each_domain_to_its_adapter() {
    let Some(loc) = model() else { return };
    let mut s = settings();
    s.lora_dirs = vec![repo().join("adapters/tasks")];
    s.lora_modules = vec![("pirate".into(), repo().join("adapters/pirate"))];
    let srv = TestServer::start(loc, s).await;

    // Held-out prompts land on their domain's adapter (chat, through /v1/route).
    let mut times = Vec::new();
    for task in TASKS {
        let mut hits = 0;
        for p in heldout(task) {
            let t = std::time::Instant::now();
            let (st, v) = srv.post("/v1/route", &chat("auto", &p)).await;
            times.push(t.elapsed().as_secs_f64() * 1e3);
            assert_eq!(st, 200, "{v}");
            if v["model"] == task {
                hits += 1;
            } else {
                eprintln!("{task}: {p:?} -> {v}");
            }
        }
        eprintln!("{task}: {hits}/5 held-out prompts routed to it");
        assert!(hits >= 4, "{task}: {hits}/5 held-out prompts routed to it");
    }

    times.sort_by(|a, b| a.total_cmp(b));
    eprintln!("/v1/route p50 {:.1} ms, max {:.1} ms", times[times.len() / 2], times[times.len() - 1]);
    // An exact repeat is answered from the prompt-embedding cache.
    let t = std::time::Instant::now();
    let (_, again) = srv.post("/v1/route", &chat("auto", &heldout("json")[0])).await;
    eprintln!("/v1/route repeat: {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    assert_eq!(again["model"], "json");

    // Generation with model "auto": served by the adapter, which the answer and header name.
    let prompt = &heldout("sql")[0];
    let (st, h, v) = post_with_headers(&srv, "/v1/chat/completions", &chat("auto", prompt)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["model"], "sql");
    let h = h.expect("x-loramux-route header");
    assert!(h.starts_with("adapter=sql; score=") && h.contains("; margin=") && !h.contains("fallback"), "{h}");
    // Completions too (the prompt as generation would see it: plain text).
    let body = json!({"model": "auto", "prompt": "Convert to ISO 8601: March the third, 1999", "max_tokens": 1});
    let (st, h, v) = post_with_headers(&srv, "/v1/completions", &body).await;
    assert_eq!(st, 200, "{v}");
    eprintln!("completions routed: {h:?}");
    assert!(h.is_some() && v["model"].is_string(), "{v}");

    // /v1/route: every routable adapter ranked, best first; the unroutable one listed apart.
    let (st, v) = srv.post("/v1/route", &chat("auto", &heldout("date")[1])).await;
    assert_eq!(st, 200, "{v}");
    let c = v["candidates"].as_array().unwrap();
    assert_eq!(c.len(), 5, "{v}");
    assert_eq!(c[0]["model"], v["model"]);
    let scores: Vec<f64> = c.iter().map(|x| x["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{v}");
    assert!((v["confidence"].as_f64().unwrap() - (scores[0] - scores[1])).abs() < 1e-4, "{v}");
    assert_eq!(v["fallback"], false);
    assert_eq!(v["unroutable"], json!(["pirate"]));

    // Clear 4xx for an empty prompt and one over the context.
    let (st, v) = srv.post("/v1/chat/completions", &json!({"model": "auto", "prompt": ""})).await;
    assert_error(st, &v, 400, "a chat body without messages");
    let (st, v) = srv.post("/v1/completions", &json!({"model": "auto", "prompt": "", "max_tokens": 1})).await;
    assert_error(st, &v, 400, "empty prompt");
    let long = "word ".repeat(2000);
    let (st, v) = srv.post("/v1/route", &chat("auto", &long)).await;
    assert_error(st, &v, 400, "prompt over the context");
    assert!(v["error"]["message"].as_str().unwrap().contains("context length"), "{v}");

    // Metrics moved.
    assert!(srv.metric("loramux_route_requests_total{adapter=\"sql\"}").await >= 5.0);
    assert!(srv.metric("loramux_route_seconds_count").await >= 28.0);
    // At the default threshold (0.1) a rare close call falls back (the plain-text completions
    // prompt, rendered unlike the chat examples, is the likeliest).
    assert!(srv.metric("loramux_route_fallbacks_total").await <= 2.0);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsure_requests_fall_back() {
    let Some(loc) = model() else { return };
    let mut s = settings();
    s.lora_dirs = vec![repo().join("adapters/tasks")];
    s.router.min_confidence = 10.0;
    let srv = TestServer::start(loc, s).await;
    let (st, h, v) = post_with_headers(&srv, "/v1/chat/completions", &chat("auto", "Tell me a joke about penguins.")).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["model"], BASE);
    assert!(h.unwrap().ends_with("; fallback=true"));
    let (_, v) = srv.post("/v1/route", &chat("auto", "Write a haiku about autumn leaves.")).await;
    assert_eq!(v["fallback"], true);
    assert_eq!(v["model"], BASE);
    assert_eq!(v["candidates"].as_array().unwrap().len(), 5);
    assert_eq!(srv.metric("loramux_route_fallbacks_total").await, 2.0);
    assert_eq!(srv.metric(&format!("loramux_route_requests_total{{adapter=\"{BASE}\"}}")).await, 2.0);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_loads_and_unroutable_servers() {
    let Some(loc) = model() else { return };
    let mut s = settings();
    s.lora_modules = vec![("pirate".into(), repo().join("adapters/pirate"))];
    s.enable_lora_updates = true;
    s.admin_api_key = Some("admin".into());
    s.allowed_lora_roots = vec![repo().join("adapters")];
    let srv = TestServer::start(loc, s).await;
    let admin = Some("admin");

    // No adapter has routing data: "auto" is a 400 that says why.
    let (st, v) = srv.post("/v1/chat/completions", &chat("auto", "List employees in Paris.")).await;
    assert_error(st, &v, 400, "auto with nothing routable");
    assert!(v["error"]["message"].as_str().unwrap().contains("routing"), "{v}");

    // A bad "routing" object: 400 naming the field; nothing loaded.
    let bad = json!({"lora_name": "sql2", "lora_path": repo().join("adapters/tasks/sql"), "routing": {"examples": []}});
    let (st, v) = srv.post_key("/v1/load_lora_adapter", &bad, admin).await;
    assert_error(st, &v, 400, "empty examples");
    assert!(v["error"]["message"].as_str().unwrap().contains("'examples'"), "{v}");
    let (_, models) = srv.get_json("/v1/models").await;
    assert!(!models.to_string().contains("sql2"));

    // A good one makes the adapter routable at once; unloading removes it.
    let good = json!({"lora_name": "talk", "lora_path": repo().join("adapters/pirate"),
        "routing": {"description": "pirate talk", "examples": ["Talk like a pirate about the sea.", "Say ahoy, matey!"]}});
    let (st, v) = srv.post_key("/v1/load_lora_adapter", &good, admin).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = srv.post("/v1/route", &chat("auto", "Talk like a pirate about ships.")).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["candidates"][0]["model"], "talk");
    assert_eq!(v["unroutable"], json!(["pirate"]));
    // A routing.json beside the adapter counts for runtime loads too.
    let (st, v) = srv.post_key("/v1/load_lora_adapter", &json!({"lora_name": "sql", "lora_path": repo().join("adapters/tasks/sql")}), admin).await;
    assert_eq!(st, 200, "{v}");
    let (_, v) = srv.post("/v1/route", &chat("auto", &heldout("sql")[0])).await;
    assert_eq!(v["model"], "sql", "{v}");
    for name in ["talk", "sql"] {
        let (st, v) = srv.post_key("/v1/unload_lora_adapter", &json!({"lora_name": name}), admin).await;
        assert_eq!(st, 200, "{v}");
    }
    let (st, v) = srv.post("/v1/route", &chat("auto", "Talk like a pirate.")).await;
    assert_error(st, &v, 400, "auto after unloading every routable adapter");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_routing_file_fails_startup() {
    let Some(loc) = model() else { return };
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("sql");
    copy_adapter(&repo().join("adapters/tasks/sql"), &dir);
    let long = "x".repeat(2001);
    std::fs::write(dir.join("routing.json"), json!({"examples": ["ok", long]}).to_string()).unwrap();
    let mut s = settings();
    s.lora_dirs = vec![t.path().to_path_buf()];
    init_logs();
    let err = Server::start(loc, s).await.err().expect("startup refused").to_string();
    assert!(err.contains("routing.json") && err.contains("examples[1]") && err.contains("2001 characters"), "{err}");
}

/// `--router-model all-minilm-l6-v2`: the sentence-embedding router, over HTTP, lands each
/// domain on its adapter too and says nothing else changed for the client. Skipped when the
/// model is not pulled (scripts/test.sh pulls it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentence_model_router() {
    let Some(loc) = model() else { return };
    if loramux_engine::registry::resolve_folder_model("all-minilm-l6-v2").is_err() {
        eprintln!("skipped: all-minilm-l6-v2 is not pulled");
        return;
    }
    let mut s = settings();
    s.lora_dirs = vec![repo().join("adapters/tasks")];
    s.router.model = Some("all-minilm-l6-v2".into());
    let srv = TestServer::start(loc, s).await;
    for task in TASKS {
        let hits = {
            let mut hits = 0;
            for p in heldout(task) {
                let (st, v) = srv.post("/v1/route", &chat("auto", &p)).await;
                assert_eq!(st, 200, "{v}");
                hits += usize::from(v["model"] == task);
            }
            hits
        };
        assert!(hits >= 4, "{task}: {hits}/5 held-out prompts routed to it by MiniLM");
    }
    let (st, h, v) = post_with_headers(&srv, "/v1/chat/completions", &chat("auto", &heldout("sentiment")[2])).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["model"], "sentiment");
    assert!(h.unwrap().starts_with("adapter=sentiment;"));
    // It reads text: a token-id prompt is a clear 400, and the server keeps serving.
    let (st, v) = srv.post("/v1/route", &json!({"model": "auto", "prompt": [1, 2, 3]})).await;
    assert_error(st, &v, 400, "token ids to the sentence router");
    let (st, _) = srv.post("/v1/route", &chat("auto", &heldout("sql")[1])).await;
    assert_eq!(st, 200);
    srv.shutdown().await;
}
