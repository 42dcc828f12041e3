//! Adapter uploads (issue #21) over HTTP on loopback with the tiny Llama fixture: a tenant
//! uploads an adapter's files and it is served as `<tenant>/<name>` to that tenant alone
//! (another tenant cannot call, list, route to, delete or overwrite it: a 404 identical to
//! an unknown name, even with a `*` glob); quotas (count 429, bytes 413, rank 400 naming
//! `r`); refused uploads leave nothing on disk; no path is ever read; uploads survive a
//! restart; and concurrent overwrites, deletes and requests never serve another adapter's
//! weights. The SIGKILL test is `crates/loramux/tests/upload_crash.rs`.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};

const TENANTS: &str = r#"
[[tenants]]
name = "alpha"
api_keys = ["alpha-key"]
adapters = ["*"]
max_uploads = 2

[[tenants]]
name = "beta"
api_keys = ["beta-key"]
adapters = ["*"]
max_upload_rank = 4
max_upload_bytes = 100000
"#;

async fn server(dir: &Path) -> TestServer {
    let tenants = dir.join("tenants.toml");
    std::fs::write(&tenants, TENANTS).unwrap();
    let mut s = tiny_settings();
    s.lora_modules = ["a", "b"].iter().map(|n| (n.to_string(), fixture_adapter("llama", n))).collect();
    s.tenants_file = Some(tenants);
    s.admin_api_key = Some("admin".into());
    s.adapter_store = dir.join("store");
    TestServer::tiny("llama", s).await
}

fn adapter(name: &str) -> (Vec<u8>, Vec<u8>) {
    peft_parts(&fixture_adapter("llama", name))
}

async fn upload_peft(srv: &TestServer, key: &str, from: &str, name: &str, extra: &[Part<'_>]) -> (u16, Value) {
    let (config, weights) = adapter(from);
    let mut parts: Vec<Part> = vec![("adapter_config.json", None, &config), ("adapter_model.safetensors", None, &weights), ("name", None, name.as_bytes())];
    parts.extend_from_slice(extra);
    srv.upload(key, &parts).await
}

/// Greedy chat with `key`: status and raw body.
async fn chat_as(srv: &TestServer, key: &str, model: &str) -> (u16, String) {
    let r = srv
        .http
        .post(format!("{}/v1/chat/completions", srv.url))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(chat_body(model, "Hello there", 6).to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.text().await.unwrap())
}

fn text(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap();
    v["choices"][0]["message"]["content"].as_str().unwrap().to_string()
}

/// Files under the store's blobs and tmp folders.
fn store_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for sub in ["blobs", "tmp"] {
        for e in std::fs::read_dir(dir.join("store").join(sub)).into_iter().flatten().flatten() {
            out.push(format!("{sub}/{}", e.file_name().to_string_lossy()));
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uploads_are_served_to_their_tenant_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = server(tmp.path()).await;
    let (_, ref_a) = chat_as(&srv, "admin", "a").await;
    let routing = br#"{"description": "greetings", "examples": ["Hello there", "Good morning"]}"#;
    let (st, v) = upload_peft(&srv, "alpha-key", "a", "mine", &[("routing.json", None, routing)]).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!((v["id"].as_str(), v["object"].as_str(), v["owned_by"].as_str()), (Some("alpha/mine"), Some("adapter"), Some("alpha")));
    assert!(v["sha256"].as_str().unwrap().len() == 64 && v["bytes"].as_u64().unwrap() > 12000 && v["rank"].as_u64().unwrap() > 0, "{v}");
    let (st, body) = chat_as(&srv, "alpha-key", "alpha/mine").await;
    assert_eq!((st, text(&body)), (200, text(&ref_a)), "the upload serves adapter a's weights");

    // Routable for alpha (and the admin), never a candidate for beta.
    let auto = chat_body("auto", "Hello there", 4);
    for key in ["alpha-key", "admin"] {
        let (st, v) = srv.post_key("/v1/route", &auto, Some(key)).await;
        assert_eq!((st, v["model"].as_str()), (200, Some("alpha/mine")), "{key}: {v}");
    }
    let (_, v) = srv.post_key("/v1/route", &auto, Some("beta-key")).await;
    assert!(!v.to_string().contains("alpha/mine"), "route: {v}");
    let (_, v) = srv.post_key("/v1/chat/completions", &auto, Some("beta-key")).await;
    assert!(!v.to_string().contains("alpha/mine"), "auto: {v}");

    // Beta (whose glob is "*") is answered exactly as for a name nobody has.
    let (st, mine) = chat_as(&srv, "beta-key", "alpha/mine").await;
    let (_, unknown) = chat_as(&srv, "beta-key", "alpha/nope").await;
    assert_eq!((st, mine), (404, unknown.replace("alpha/nope", "alpha/mine")), "call");
    let (st, list) = srv.call_key(Method::GET, "/v1/adapters", "beta-key").await;
    assert_eq!((st, serde_json::from_str::<Value>(&list).unwrap()), (200, json!({"object": "list", "data": []})), "list");
    let (_, models) = srv.call_key(Method::GET, "/v1/models", "beta-key").await;
    assert!(!models.contains("alpha/mine"), "models: {models}");
    let (st, card) = srv.call_key(Method::GET, "/v1/models/alpha/mine", "beta-key").await;
    let (_, none) = srv.call_key(Method::GET, "/v1/models/alpha/nope", "beta-key").await;
    assert_eq!((st, card), (404, none.replace("alpha/nope", "alpha/mine")), "model card");
    let (st, del) = srv.call_key(Method::DELETE, "/v1/adapters/alpha/mine", "beta-key").await;
    let (_, del_none) = srv.call_key(Method::DELETE, "/v1/adapters/alpha/nope", "beta-key").await;
    assert_eq!((st, del), (404, del_none.replace("alpha/nope", "alpha/mine")), "delete");
    // Beta's own "mine" is beta/mine: alpha's is untouched; naming alpha is refused.
    let (st, v) = upload_peft(&srv, "beta-key", "b", "mine", &[("tenant", None, b"alpha")]).await;
    assert_error(st, &v, 400, "tenant field");
    assert_eq!(v["error"]["param"], "tenant");
    let (st, v) = srv.upload("beta-key", &[("adapter", Some("a.gguf"), &std::fs::read(fixture("llama").join("adapters_gguf/a.gguf")).unwrap()), ("name", None, b"mine")]).await;
    assert_eq!((st, v["id"].as_str()), (200, Some("beta/mine")), "{v}");
    assert_eq!(text(&chat_as(&srv, "alpha-key", "alpha/mine").await.1), text(&ref_a));
    let (st, _) = chat_as(&srv, "beta-key", "beta/mine").await;
    assert_eq!(st, 200);
    // A GGUF upload without a name is named after its file.
    let gguf = std::fs::read(fixture("llama").join("adapters_gguf/a.gguf")).unwrap();
    let (st, v) = srv.upload("alpha-key", &[("adapter", Some("some/dir/a.gguf"), &gguf)]).await;
    assert_eq!((st, v["id"].as_str()), (200, Some("alpha/a")), "{v}");
    let (_, list) = srv.call_key(Method::GET, "/v1/adapters", "alpha-key").await;
    let ids: Vec<String> = serde_json::from_str::<Value>(&list).unwrap()["data"].as_array().unwrap().iter().map(|a| a["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, ["alpha/a", "alpha/mine"]);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quotas_refusals_and_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = server(tmp.path()).await;
    assert_eq!(upload_peft(&srv, "alpha-key", "a", "one", &[]).await.0, 200);
    let before = store_files(tmp.path());
    // A name taken: 409 unless overwrite=true.
    let (st, v) = upload_peft(&srv, "alpha-key", "b", "one", &[]).await;
    assert_error(st, &v, 409, "existing name");
    assert_eq!(upload_peft(&srv, "alpha-key", "a", "two", &[]).await.0, 200);
    // Count quota: 429; bytes quota: 413; rank cap: 400 naming r.
    let (st, v) = upload_peft(&srv, "alpha-key", "a", "three", &[]).await;
    assert_error(st, &v, 429, "max_uploads");
    let routing = br#"{"examples": ["Hello there"]}"#;
    let overwrite = [("overwrite", None, &b"true"[..]), ("routing.json", None, &routing[..])];
    assert_eq!(upload_peft(&srv, "alpha-key", "b", "one", &overwrite).await.0, 200, "overwrite stays within the count");
    let (st, v) = upload_peft(&srv, "beta-key", "b", "r", &[]).await;
    assert_error(st, &v, 400, "max_upload_rank (b has rank 8)");
    assert_eq!(v["error"]["param"], "r");
    assert!(v["error"]["message"].as_str().unwrap().starts_with("adapter_config.json: r: "), "{v}");
    let (config, weights) = adapter("b");
    let big = [weights.clone(), weights.clone(), weights].concat();
    let (st, v) = srv.upload("beta-key", &[("adapter_config.json", None, &config), ("adapter_model.safetensors", None, &big), ("name", None, b"big")]).await;
    assert_error(st, &v, 413, "max_upload_bytes");
    // Bad uploads: 400 naming the part; no path is read.
    let (st, v) = srv.upload("beta-key", &[("adapter_config.json", None, b"{\"r\": \"x\"}"), ("adapter_model.safetensors", None, b"junk"), ("name", None, b"bad")]).await;
    assert_error(st, &v, 400, "bad config");
    assert!(v["error"]["message"].as_str().unwrap().starts_with("adapter_config.json"), "{v}");
    let (st, v) = srv.upload("alpha-key", &[("lora_path", None, b"/etc"), ("name", None, b"evil")]).await;
    assert_error(st, &v, 400, "lora_path");
    assert_eq!(v["error"]["param"], "lora_path");
    let (st, v) = upload_peft(&srv, "alpha-key", "a", "../x", &[]).await;
    assert_error(st, &v, 400, "name");
    let (st, v) = srv.upload("alpha-key", &[("routing.json", None, b"{}"), ("adapter", Some("x.gguf"), b"GGUF")]).await;
    assert_error(st, &v, 400, "routing.json");
    let mut after = store_files(tmp.path());
    after.retain(|f| !before.contains(f));
    assert_eq!(after.len(), 1, "only the blobs of two/one's overwrite are new, nothing of the refusals: {after:?}");

    // Delete: 404 afterwards; restart: the other is served again.
    let (st, _) = srv.call_key(Method::DELETE, "/v1/adapters/two", "alpha-key").await;
    assert_eq!(st, 200);
    assert_eq!(chat_as(&srv, "alpha-key", "alpha/two").await.0, 404);
    let (_, ref_b) = chat_as(&srv, "admin", "b").await;
    srv.shutdown().await;
    let srv = server(tmp.path()).await;
    let (st, body) = chat_as(&srv, "alpha-key", "alpha/one").await;
    assert_eq!((st, text(&body)), (200, text(&ref_b)), "overwritten with b, then restarted");
    let (st, v) = srv.post_key("/v1/route", &chat_body("auto", "Hello there", 4), Some("alpha-key")).await;
    assert_eq!((st, v["candidates"][0]["model"].as_str()), (200, Some("alpha/one")), "routable again after the restart: {v}");
    assert_eq!(chat_as(&srv, "alpha-key", "alpha/two").await.0, 404);
    assert_eq!(store_files(tmp.path()).len(), 1, "one blob left: {:?}", store_files(tmp.path()));
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_global_upload_cap_is_a_413() {
    let tmp = tempfile::tempdir().unwrap();
    let tenants = tmp.path().join("tenants.toml");
    std::fs::write(&tenants, TENANTS).unwrap();
    let mut s = tiny_settings();
    s.tenants_file = Some(tenants);
    s.adapter_store = tmp.path().join("store");
    s.max_upload_bytes = 4096;
    let srv = TestServer::tiny("llama", s).await;
    let (st, v) = upload_peft(&srv, "alpha-key", "a", "x", &[]).await;
    assert_error(st, &v, 413, "--max-upload-bytes");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 6)]
async fn overwrites_deletes_and_requests_never_mix_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = std::sync::Arc::new(server(tmp.path()).await);
    let (_, a) = chat_as(&srv, "admin", "a").await;
    let (_, b) = chat_as(&srv, "admin", "b").await;
    let (a, b) = (text(&a), text(&b));
    assert_ne!(a, b, "the two fixtures answer differently");
    assert_eq!(upload_peft(&srv, "alpha-key", "a", "x", &[]).await.0, 200);

    let writer = {
        let srv = srv.clone();
        tokio::spawn(async move {
            let mut overwrites = [0, 0];
            for i in 0..16 {
                if i % 5 == 4 {
                    let (st, _) = srv.call_key(Method::DELETE, "/v1/adapters/x", "alpha-key").await;
                    assert!(st == 200 || st == 404, "delete: {st}");
                }
                let from = if i % 2 == 0 { "b" } else { "a" };
                let (st, v) = upload_peft(&srv, "alpha-key", from, "x", &[("overwrite", None, b"true")]).await;
                assert!(st == 200 || st == 409, "overwrite: {st} {v}");
                overwrites[usize::from(st == 409)] += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            overwrites
        })
    };
    let mut readers = Vec::new();
    for _ in 0..4 {
        let (srv, a, b) = (srv.clone(), a.clone(), b.clone());
        readers.push(tokio::spawn(async move {
            let mut served = [0, 0];
            for _ in 0..12 {
                let (st, body) = chat_as(&srv, "alpha-key", "alpha/x").await;
                match st {
                    200 => {
                        let t = text(&body);
                        assert!(t == a || t == b, "a response from neither adapter: {t:?}");
                        served[0] += 1;
                    }
                    404 => served[1] += 1,
                    _ => panic!("unexpected {st}: {body}"),
                }
            }
            served
        }));
    }
    let overwrites = writer.await.unwrap();
    let mut served = [0, 0];
    for r in readers {
        let [ok, gone] = r.await.unwrap();
        served = [served[0] + ok, served[1] + gone];
    }
    eprintln!("overwrites 200/409: {overwrites:?}; requests 200/404: {served:?}");
    assert!(served[0] > 0, "some requests were served");
    // Once an overwrite has completed, the new weights are what is served.
    loop {
        let (st, v) = upload_peft(&srv, "alpha-key", "b", "x", &[("overwrite", None, b"true")]).await;
        if st == 200 {
            break;
        }
        assert_eq!(st, 409, "{v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(text(&chat_as(&srv, "alpha-key", "alpha/x").await.1), b);
    std::sync::Arc::try_unwrap(srv).ok().unwrap().shutdown().await;
}

/// Adapter a's safetensors with `pad` bytes of `__metadata__` in its header: the same
/// tensors (offsets are relative to the data), a bigger file.
fn padded_weights(pad: usize) -> Vec<u8> {
    let bytes = adapter("a").1;
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header.insert("__metadata__".into(), json!({"pad": "x".repeat(pad)}));
    let mut h = serde_json::to_vec(&header).unwrap();
    h.resize(h.len().div_ceil(8) * 8, b' ');
    [&(h.len() as u64).to_le_bytes()[..], &h, &bytes[8 + n..]].concat()
}

/// Upload-to-first-token of a ~10 MB adapter: from the start of the upload to the answer of
/// a one-token request on it, p50 of 5 (a new name each time); and whether another tenant's
/// streams stall meanwhile: the gaps between their streamed chunks during the uploads
/// against those between uploads. Prints the numbers; run with
/// `cargo test --release -p loramux-server --test uploads -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a measurement, not a check"]
async fn upload_to_first_token_of_a_10_mb_adapter() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let tmp = tempfile::tempdir().unwrap();
    let srv = Arc::new(server(tmp.path()).await);
    let (config, weights) = (adapter("a").0, padded_weights(10 << 20));
    // Tenant beta streams all along; each gap between chunks is filed under whether an
    // upload was in progress when it ended.
    let (uploading, done) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let gaps: Arc<Mutex<(Vec<f64>, Vec<f64>)>> = Arc::default();
    let streamer = {
        let (srv, uploading, done, gaps) = (srv.clone(), uploading.clone(), done.clone(), gaps.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                let body = json!({"model": "a", "prompt": "Hello", "max_tokens": 64, "ignore_eos": true, "stream": true});
                let mut r = srv.http.post(format!("{}/v1/completions", srv.url)).header("authorization", "Bearer beta-key").header("content-type", "application/json").body(body.to_string()).send().await.unwrap();
                let mut last = std::time::Instant::now();
                while let Some(_chunk) = r.chunk().await.unwrap() {
                    let gap = last.elapsed().as_secs_f64() * 1e3;
                    last = std::time::Instant::now();
                    let mut g = gaps.lock().unwrap();
                    if uploading.load(Ordering::Relaxed) { g.0.push(gap) } else { g.1.push(gap) }
                }
            }
        })
    };
    let mut times = Vec::new();
    for i in 0..5 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let name = format!("big{i}");
        let t = std::time::Instant::now();
        uploading.store(true, Ordering::Relaxed);
        let (st, v) = srv.upload("alpha-key", &[("adapter_config.json", None, &config), ("adapter_model.safetensors", None, &weights), ("name", None, name.as_bytes())]).await;
        assert_eq!(st, 200, "{v}");
        let uploaded = t.elapsed();
        let (st, body) = srv.post_key("/v1/completions", &completion_body(&format!("alpha/{name}"), "Hello", 1), Some("alpha-key")).await;
        uploading.store(false, Ordering::Relaxed);
        assert_eq!(st, 200, "{body}");
        times.push((t.elapsed(), uploaded));
        let (st, _) = srv.call_key(Method::DELETE, &format!("/v1/adapters/{name}"), "alpha-key").await;
        assert_eq!(st, 200);
    }
    done.store(true, Ordering::Relaxed);
    streamer.await.unwrap();
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    eprintln!("upload of {} bytes to first token, ms (upload part): {:?}", config.len() + weights.len(), times.iter().map(|(a, u)| format!("{:.1} ({:.1})", ms(*a), ms(*u))).collect::<Vec<_>>());
    eprintln!("p50 upload-to-first-token: {:.1} ms", ms(times[2].0));
    let (mut during, mut between) = std::mem::take(&mut *gaps.lock().unwrap());
    let describe = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        format!("{} gaps, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms", v.len(), q(0.5), q(0.99), v[v.len() - 1])
    };
    eprintln!("tenant beta's stream during uploads: {}", describe(&mut during));
    eprintln!("tenant beta's stream between uploads: {}", describe(&mut between));
    Arc::try_unwrap(srv).ok().unwrap().shutdown().await;
}
