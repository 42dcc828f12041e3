//! GGUF LoRA adapters (llama.cpp's format, fixtures converted by llama.cpp's own
//! convert_lora_to_gguf.py) over HTTP: at startup (`--lora-modules name=x.gguf`), from a
//! `--lora-dir` (`x.gguf` served as `x`) and through `/v1/load_lora_adapter`, each answers
//! exactly as its PEFT original; broken or foreign GGUF files are refused, at startup too.

mod common;

use common::*;
use loramux_engine::ModelLocation;
use serde_json::json;

fn gguf_fixture(name: &str) -> std::path::PathBuf {
    fixture("llama").join("adapters_gguf").join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gguf_adapters_answer_as_their_peft_originals() {
    let tmp = tempfile::tempdir().unwrap();
    let lora_dir = tmp.path().join("lora-dir");
    let root = tmp.path().join("root");
    std::fs::create_dir_all(&lora_dir).unwrap();
    std::fs::create_dir_all(&root).unwrap();
    std::fs::copy(gguf_fixture("e.gguf"), lora_dir.join("e.gguf")).unwrap();
    std::fs::copy(gguf_fixture("e.gguf"), root.join("e-copy.gguf")).unwrap();
    let e = std::fs::read(gguf_fixture("e.gguf")).unwrap();
    std::fs::write(root.join("truncated.gguf"), &e[..e.len() / 2]).unwrap();
    std::fs::copy(fixture("spm").join("tiny-spm.gguf"), root.join("model.gguf")).unwrap();

    let mut s = tiny_settings();
    s.lora_modules = vec![
        ("a-peft".into(), fixture_adapter("llama", "a")),
        ("a-gguf".into(), gguf_fixture("a.gguf")),
        ("e-peft".into(), gguf_fixture("peft/e")),
    ];
    s.lora_dirs = vec![lora_dir.clone()];
    s.enable_lora_updates = true;
    s.admin_api_key = Some("admin".into());
    s.allowed_lora_roots = vec![root.clone()];
    let srv = TestServer::tiny("llama", s).await;
    let admin = Some("admin");

    // --lora-modules with a .gguf: loaded at startup, same answers as PEFT, listed.
    let peft_chat = srv.chat_text("a-peft", "hi there", 12).await;
    assert_ne!(peft_chat, srv.chat_text("tiny", "hi there", 12).await, "the adapter changes the answer");
    assert_eq!(srv.chat_text("a-gguf", "hi there", 12).await, peft_chat);
    assert_eq!(srv.completion_text("a-gguf", "The river", 12).await, srv.completion_text("a-peft", "The river", 12).await);
    let (_, models) = srv.get_json("/v1/models").await;
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().filter_map(|m| m["id"].as_str()).collect();
    assert!(ids.contains(&"a-gguf") && ids.contains(&"e"), "{ids:?}");

    // --lora-dir: e.gguf is adapter e, read on first use.
    let e_peft = srv.chat_text("e-peft", "tell me a story", 12).await;
    assert_eq!(srv.chat_text("e", "tell me a story", 12).await, e_peft);

    // /v1/load_lora_adapter with a GGUF file, relative to the root and absolute.
    let load = |name: &str, path: &str| json!({"lora_name": name, "lora_path": path});
    let (st, v) = srv.post_key("/v1/load_lora_adapter", &load("e-loaded", "e-copy.gguf"), admin).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(srv.chat_text("e-loaded", "tell me a story", 12).await, e_peft);
    let absolute = root.join("e-copy.gguf").display().to_string();
    let (st, v) = srv.post_key("/v1/load_lora_adapter", &load("e-absolute", &absolute), admin).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(srv.completion_text("e-absolute", "The river", 12).await, srv.completion_text("e-peft", "The river", 12).await);

    // Broken and foreign files are refused, naming the problem, and change nothing.
    for (path, needle) in [("truncated.gguf", "truncated"), ("model.gguf", "general.type"), ("missing.gguf", "no adapter directory or GGUF file")] {
        let (st, v) = srv.post_key("/v1/load_lora_adapter", &load("bad", path), admin).await;
        assert!(st == 400 || st == 404, "{path}: {st} {v}");
        assert!(v["error"]["message"].as_str().unwrap_or("").contains(needle), "{path}: {v}");
    }
    assert_eq!(srv.metric("loramux_adapter_load_failures_total").await, 2.0);
    assert_eq!(srv.chat_text("a-gguf", "hi there", 12).await, peft_chat);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_gguf_module_fails_startup_naming_it() {
    init_logs();
    let mut s = tiny_settings();
    s.lora_modules = vec![("model".into(), fixture("spm").join("tiny-spm.gguf"))];
    let err = match loramux_server::Server::start(ModelLocation::HfDir(fixture("llama")), s).await {
        Ok(_) => panic!("a model GGUF given as an adapter must fail startup"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("adapter model") && err.contains("general.type") && err.contains("not an adapter"), "{err}");
}
