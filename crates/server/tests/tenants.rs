//! Tenants (issue #21) over HTTP on loopback with the tiny Llama fixture and its adapters
//! a, b, c, d: a tenant's key can call, list and route to its adapters only (another's is a
//! 404 byte-identical to an unknown name), keys are checked (401), rate, token and
//! concurrency limits answer 429 with `Retry-After` for that tenant alone, and rewriting the
//! file (or SIGHUP) changes who may use what without a restart; a broken rewrite changes
//! nothing.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use loramux_server::tenants::key_digest;
use serde_json::{json, Value};

fn sha(key: &str) -> String {
    let hex: String = key_digest(key).iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// alpha: a (plain and hashed keys); beta: b and c, b by default (hashed key); slow: 2
/// requests a minute; tok: 150 tokens a minute; single: one request at a time.
fn tenants_toml(alpha_adapters: &str) -> String {
    format!(
        r#"
[[tenants]]
name = "alpha"
api_keys = ["alpha-plain", "{alpha}"]
adapters = [{alpha_adapters}]

[[tenants]]
name = "beta"
api_keys = ["{beta}"]
adapters = ["b", "c"]
default_adapter = "b"

[[tenants]]
name = "slow"
api_keys = ["slow-key"]
adapters = ["*"]
requests_per_minute = 2

[[tenants]]
name = "tok"
api_keys = ["tok-key"]
adapters = ["*"]
tokens_per_minute = 150

[[tenants]]
name = "single"
api_keys = ["single-key"]
adapters = ["*"]
max_concurrency = 1
"#,
        alpha = sha("alpha-hashed"),
        beta = sha("beta-key"),
    )
}

async fn server(file: &Path) -> TestServer {
    let mut s = tiny_settings();
    s.lora_modules = ["a", "b", "c", "d"].iter().map(|n| (n.to_string(), fixture_adapter("llama", n))).collect();
    s.tenants_file = Some(file.to_path_buf());
    s.admin_api_key = Some("admin".into());
    s.enable_lora_updates = true;
    TestServer::tiny("llama", s).await
}

/// POSTs with `key`; status, `Retry-After`, raw body.
async fn call(srv: &TestServer, path: &str, body: &Value, key: Option<&str>) -> (u16, Option<String>, String) {
    let mut rb = srv.http.post(format!("{}{path}", srv.url)).header("content-type", "application/json").body(body.to_string());
    if let Some(k) = key {
        rb = rb.header("authorization", format!("Bearer {k}"));
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
    (status, retry, r.text().await.unwrap())
}

async fn get(srv: &TestServer, path: &str, key: &str) -> (u16, String) {
    let r = srv.http.get(format!("{}{path}", srv.url)).header("authorization", format!("Bearer {key}")).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn model_ids(srv: &TestServer, key: &str) -> Vec<String> {
    let (st, text) = get(srv, "/v1/models", key).await;
    assert_eq!(st, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    v["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_string()).collect()
}

async fn status(srv: &TestServer, model: &str, key: &str) -> u16 {
    call(srv, "/v1/chat/completions", &chat_body(model, "hi", 2), Some(key)).await.0
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// Waits (up to 5 s, past the 1 s poll) until `model` answers `want` for `key`.
async fn until_status(srv: &TestServer, model: &str, key: &str, want: u16) {
    let t = Instant::now();
    loop {
        let got = status(srv, model, key).await;
        if got == want {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{key} on {model}: still {got}, want {want}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_bound_to_their_tenants_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tenants.toml");
    write(&file, &tenants_toml(r#""a", "ghost*""#));
    let srv = server(&file).await;
    let chat = |m: &str| chat_body(m, "hi", 4);

    // Missing or unknown key: 401, on generation and on the model list.
    for key in [None, Some("nope"), Some("sha256-of-nothing")] {
        let (st, _, body) = call(&srv, "/v1/chat/completions", &chat("a"), key).await;
        assert_eq!(st, 401, "{key:?}: {body}");
        assert!(body.contains("invalid_api_key"), "{body}");
    }
    for key in [None, Some("nope")] {
        let (st, _, body) = call(&srv, "/v1/route", &chat("auto"), key).await;
        assert_eq!(st, 401, "{key:?}: {body}");
    }
    assert_eq!(get(&srv, "/v1/models", "nope").await.0, 401);
    assert_eq!(srv.get("/v1/models").await.0, 401, "no key");

    // Plain and sha256 keys both work; the base model is every tenant's.
    for key in ["alpha-plain", "alpha-hashed"] {
        assert_eq!(status(&srv, "a", key).await, 200, "{key}");
        assert_eq!(status(&srv, "tiny", key).await, 200, "{key}");
    }
    // Another tenant's adapter: 404 model_not_found; the list and the card do not show it.
    let (st, _, forbidden) = call(&srv, "/v1/chat/completions", &chat("b"), Some("alpha-plain")).await;
    assert_eq!(st, 404, "{forbidden}");
    assert!(forbidden.contains("model_not_found"), "{forbidden}");
    let (st, _, allowed_unknown) = call(&srv, "/v1/chat/completions", &chat("ghost-1"), Some("alpha-plain")).await;
    assert_eq!((st, allowed_unknown.replace("ghost-1", "b")), (404, forbidden.clone()), "same answer as a name nobody knows");
    assert_eq!(model_ids(&srv, "alpha-plain").await, ["tiny", "a"]);
    let (st, card_b) = get(&srv, "/v1/models/b", "alpha-plain").await;
    let (_, card_zz) = get(&srv, "/v1/models/zz", "alpha-plain").await;
    assert_eq!((st, card_b.replace("`b`", "`zz`")), (404, card_zz));
    assert_eq!(get(&srv, "/v1/models/a", "alpha-plain").await.0, 200);

    // beta: its default adapter without a model, its own adapters, not alpha's.
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let (st, _, text) = call(&srv, "/v1/chat/completions", &body, Some("beta-key")).await;
    assert_eq!(st, 200, "{text}");
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["model"], "b");
    assert_eq!(status(&srv, "c", "beta-key").await, 200);
    assert_eq!(status(&srv, "a", "beta-key").await, 404);
    assert_eq!(model_ids(&srv, "beta-key").await, ["tiny", "b", "c"]);
    // The admin key: everything.
    assert_eq!(model_ids(&srv, "admin").await, ["tiny", "a", "b", "c", "d"]);
    assert_eq!(status(&srv, "d", "admin").await, 200);

    // A stream holds its tenant's in-flight slot until its end.
    let stream = json!({"model": "a", "prompt": "hi", "max_tokens": 3, "stream": true});
    let (st, _, text) = call(&srv, "/v1/completions", &stream, Some("alpha-plain")).await;
    assert!(st == 200 && text.ends_with("data: [DONE]\n\n"), "{text}");

    assert!(srv.metric("loramux_tenant_refusals_total{reason=\"adapter_not_allowed\",tenant=\"alpha\"}").await >= 1.0);
    assert!(srv.metric("loramux_tenant_requests_total{tenant=\"alpha\"}").await >= 5.0);
    assert!(srv.metric("loramux_tenant_generation_tokens_total{tenant=\"beta\"}").await >= 1.0);
    assert!(srv.metric("loramux_tenant_prompt_tokens_total{tenant=\"(admin)\"}").await >= 1.0);
    assert!(srv.metric("loramux_tenant_queue_seconds_count{tenant=\"alpha\"}").await >= 4.0);
    assert_eq!(srv.metric("loramux_tenant_in_flight{tenant=\"alpha\"}").await, 0.0);

    // Byte-identical to a truly unknown adapter: once b is unloaded, the admin's 404 for it.
    let (st, _, v) = call(&srv, "/v1/unload_lora_adapter", &json!({"lora_name": "b"}), Some("admin")).await;
    assert_eq!(st, 200, "{v}");
    let (st, _, unknown) = call(&srv, "/v1/chat/completions", &chat("b"), Some("admin")).await;
    assert_eq!((st, unknown), (404, forbidden));
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_refuse_one_tenant_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tenants.toml");
    write(&file, &tenants_toml(r#""a""#));
    let srv = server(&file).await;

    // Requests per minute: the third in a minute is a 429 with Retry-After; beta is served.
    for _ in 0..2 {
        assert_eq!(status(&srv, "a", "slow-key").await, 200);
    }
    let (st, retry, body) = call(&srv, "/v1/chat/completions", &chat_body("a", "hi", 2), Some("slow-key")).await;
    assert_eq!(st, 429, "{body}");
    assert!(body.contains("rate_limit_exceeded") && body.contains("\"type\":\"rate_limit_error\""), "{body}");
    let secs: u64 = retry.expect("Retry-After").parse().unwrap();
    assert!((50..=60).contains(&secs), "{secs}");
    assert_eq!(status(&srv, "b", "beta-key").await, 200, "other tenants are unaffected");

    // Tokens per minute: prompt plus max_tokens reserved; past 150 a 429, and one request
    // over the whole limit too.
    let body = json!({"model": "a", "prompt": "hi", "max_tokens": 100, "ignore_eos": true});
    assert_eq!(call(&srv, "/v1/completions", &body, Some("tok-key")).await.0, 200);
    let (st, retry, text) = call(&srv, "/v1/completions", &body, Some("tok-key")).await;
    assert_eq!(st, 429, "{text}");
    assert!(text.contains("token_limit_exceeded") && retry.is_some(), "{text}");
    let huge = json!({"model": "a", "prompt": "hi", "max_tokens": 400});
    let (st, _, text) = call(&srv, "/v1/completions", &huge, Some("tok-key")).await;
    assert!(st == 429 && text.contains("more than this key's 150 tokens per minute"), "{text}");
    assert_eq!(status(&srv, "c", "beta-key").await, 200);

    // Concurrency: while one stream runs, a second request is refused; the slot frees when
    // the client goes away.
    let long = json!({"model": "a", "prompt": "go", "max_tokens": 400, "ignore_eos": true, "stream": true});
    let mut open = srv
        .http
        .post(format!("{}/v1/completions", srv.url))
        .header("authorization", "Bearer single-key")
        .header("content-type", "application/json")
        .body(long.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(open.status(), 200);
    assert!(open.chunk().await.unwrap().is_some());
    assert_eq!(srv.metric("loramux_tenant_in_flight{tenant=\"single\"}").await, 1.0);
    let (st, retry, text) = call(&srv, "/v1/chat/completions", &chat_body("a", "hi", 2), Some("single-key")).await;
    assert!(st == 429 && text.contains("concurrency_limit_exceeded") && retry.as_deref() == Some("1"), "{st} {text}");
    assert_eq!(status(&srv, "b", "beta-key").await, 200);
    drop(open);
    until_status(&srv, "a", "single-key", 200).await;

    assert_eq!(srv.metric("loramux_tenant_refusals_total{reason=\"rate_limit\",tenant=\"slow\"}").await, 1.0);
    assert_eq!(srv.metric("loramux_tenant_refusals_total{reason=\"token_limit\",tenant=\"tok\"}").await, 2.0);
    assert!(srv.metric("loramux_tenant_refusals_total{reason=\"concurrency\",tenant=\"single\"}").await >= 1.0);
    assert_eq!(srv.metric("loramux_tenant_refusals_total{reason=\"rate_limit\",tenant=\"beta\"}").await, 0.0);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_changes_bindings_and_a_broken_file_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tenants.toml");
    write(&file, &tenants_toml(r#""a""#));
    let srv = server(&file).await;
    assert_eq!(status(&srv, "a", "alpha-plain").await, 200);
    assert_eq!(status(&srv, "b", "alpha-plain").await, 404);
    for _ in 0..2 {
        assert_eq!(status(&srv, "a", "slow-key").await, 200);
    }

    // Rewritten: alpha now has b, not a; the running server follows within the poll.
    write(&file, &tenants_toml(r#""b""#));
    until_status(&srv, "b", "alpha-plain", 200).await;
    assert_eq!(status(&srv, "a", "alpha-plain").await, 404);
    assert_eq!(model_ids(&srv, "alpha-plain").await, ["tiny", "b"]);
    // The rate-limit window survived the reload for the tenant that kept its name.
    assert_eq!(status(&srv, "a", "slow-key").await, 429);

    // Broken rewrites keep the previous tenants.
    for broken in ["[[tenants]\n", "[[tenants]]\nname = \"alpha\"\napi_keys = []\nadapters = [\"a\"]\nweight = 0.0\n"] {
        write(&file, broken);
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(status(&srv, "b", "alpha-plain").await, 200, "after {broken:?}");
        assert_eq!(status(&srv, "a", "alpha-plain").await, 404);
    }

    // SIGHUP: a change the poll cannot see (same length, same modification time).
    #[cfg(unix)]
    {
        write(&file, &tenants_toml(r#""c""#));
        until_status(&srv, "c", "alpha-plain", 200).await;
        let stamp = std::fs::metadata(&file).unwrap().modified().unwrap();
        write(&file, &tenants_toml(r#""d""#));
        std::fs::File::options().write(true).open(&file).unwrap().set_modified(stamp).unwrap();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(status(&srv, "d", "alpha-plain").await, 404, "the poll saw no change");
        let kill = std::process::Command::new("kill").args(["-HUP", &std::process::id().to_string()]).status().unwrap();
        assert!(kill.success());
        until_status(&srv, "d", "alpha-plain", 200).await;
        assert_eq!(status(&srv, "c", "alpha-plain").await, 404);
    }
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_refuses_a_broken_tenants_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tenants.toml");
    write(&file, "[[tenants]]\nname = \"x\"\napi_keys = [\"sha256:12\"]\nadapters = []\n");
    let mut s = tiny_settings();
    s.tenants_file = Some(file.clone());
    init_logs();
    let err = loramux_server::Server::start(loramux_engine::ModelLocation::HfDir(fixture("llama")), s).await.err().expect("refused").to_string();
    assert!(err.contains(&file.display().to_string()) && err.contains("tenant 'x'") && err.contains("api_keys"), "{err}");
}

/// Tiny adapters with routing examples, in a folder served as `--lora-dir`.
fn routable_adapters(dir: &Path) {
    for (name, topic) in [("a", "cooking pasta"), ("b", "sailing boats"), ("c", "tax forms"), ("d", "chess openings")] {
        let to = dir.join(name);
        copy_adapter(&fixture_adapter("llama", name), &to);
        let examples: Vec<String> = (0..4).map(|i| format!("Question {i} about {topic}?")).collect();
        write(&to.join("routing.json"), &json!({"description": topic, "examples": examples}).to_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_never_leaves_the_tenants_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let adapters = dir.path().join("adapters");
    routable_adapters(&adapters);
    let file = dir.path().join("tenants.toml");
    write(&file, &tenants_toml(r#""a", "b""#));
    let mut s = tiny_settings();
    s.lora_dirs = vec![adapters];
    s.tenants_file = Some(file);
    s.admin_api_key = Some("admin".into());
    s.router.fallback = Some("d".into());
    let srv = TestServer::tiny("llama", s).await;

    let prompts = ["Question 1 about sailing boats?", "Question 2 about tax forms?", "Question 3 about chess openings?", "pasta"];
    let mut everywhere = std::collections::BTreeSet::new();
    for p in prompts {
        let body = chat_body("auto", p, 1);
        let (st, _, text) = call(&srv, "/v1/route", &body, Some("admin")).await;
        assert_eq!(st, 200, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["candidates"].as_array().unwrap().len(), 4, "the admin ranks every adapter: {v}");
        everywhere.insert(v["model"].as_str().unwrap().to_string());

        let (st, _, text) = call(&srv, "/v1/route", &body, Some("alpha-plain")).await;
        assert_eq!(st, 200, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        let candidates: Vec<&str> = v["candidates"].as_array().unwrap().iter().map(|c| c["model"].as_str().unwrap()).collect();
        assert!(candidates.iter().all(|c| ["a", "b"].contains(c)) && !candidates.is_empty(), "{v}");
        assert!(["a", "b", "tiny"].contains(&v["model"].as_str().unwrap()), "never beta's c or the fallback d: {v}");
        assert_eq!(v["unroutable"], json!([]), "{v}");

        let (st, _, text) = call(&srv, "/v1/chat/completions", &body, Some("alpha-plain")).await;
        assert_eq!(st, 200, "{text}");
        let served = serde_json::from_str::<Value>(&text).unwrap()["model"].as_str().unwrap().to_string();
        assert!(["a", "b", "tiny"].contains(&served.as_str()), "{served}");
    }
    eprintln!("the admin's routes went to {everywhere:?}");
    srv.shutdown().await;
}
