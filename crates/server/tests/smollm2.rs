//! The server on the real SmolLM2-135M GGUF (skipped when it is not cached; `loramux models
//! pull smollm2-135m` fetches it), with the shipped example adapters when present.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::future::join_all;
use loramux_engine::registry::{cached_model_path, known_model};
use loramux_engine::ModelLocation;
use serde_json::json;

const BASE: &str = "smollm2-135m";

/// A SmolLM2-shaped rank-8 adapter on q_proj and v_proj with fixed pseudo-random weights,
/// for when the trained example adapters are not in the repository.
fn synthetic_adapter(dir: &std::path::Path) {
    use safetensors::tensor::{Dtype, TensorView};
    std::fs::create_dir_all(dir).unwrap();
    let config = json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": false, "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
    });
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let mut state = 0x2545F4914F6CDD1Du64;
    let mut rand = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let (hidden, r) = (576usize, 8usize);
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for layer in 0..30 {
        for (module, out) in [("q_proj", 576usize), ("v_proj", 192usize)] {
            let prefix = format!("base_model.model.model.layers.{layer}.self_attn.{module}");
            let a: Vec<f32> = (0..r * hidden).map(|_| rand() * 0.6).collect();
            let b: Vec<f32> = (0..out * r).map(|_| rand() * 0.6).collect();
            tensors.push((format!("{prefix}.lora_A.weight"), vec![r, hidden], a.iter().flat_map(|x| x.to_le_bytes()).collect()));
            tensors.push((format!("{prefix}.lora_B.weight"), vec![out, r], b.iter().flat_map(|x| x.to_le_bytes()).collect()));
        }
    }
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|(n, shape, bytes)| (n.clone(), TensorView::new(Dtype::F32, shape.clone(), bytes).unwrap())).collect();
    let data = safetensors::serialize(views, None).unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), data).unwrap();
}

async fn start() -> Option<(TestServer, Vec<String>, Option<tempfile::TempDir>)> {
    let path = cached_model_path(known_model(BASE).unwrap());
    if !path.exists() {
        eprintln!("skipped: {} is not cached (loramux models pull {BASE})", path.display());
        return None;
    }
    let mut s = tiny_settings();
    s.served_model_name = BASE.into();
    s.max_model_len = Some(2048);
    let adapters = repo().join("adapters");
    let mut names = Vec::new();
    for n in ["pirate", "cowboy"] {
        if adapters.join(n).join("adapter_config.json").is_file() && adapters.join(n).join("adapter_model.safetensors").is_file() {
            names.push(n.to_string());
        }
    }
    let mut tmp = None;
    if !names.is_empty() {
        s.lora_dirs = vec![adapters];
    } else {
        eprintln!("adapters/pirate not present: using a synthetic SmolLM2 adapter");
        let t = tempfile::tempdir().unwrap();
        synthetic_adapter(&t.path().join("synthetic"));
        s.lora_dirs = vec![t.path().to_path_buf()];
        names.push("synthetic".into());
        tmp = Some(t);
    }
    Some((TestServer::start(ModelLocation::Gguf(path), s).await, names, tmp))
}

async fn wait_for(srv: &TestServer, what: &str, cond: impl Fn(&str) -> bool, within: Duration) {
    let t = Instant::now();
    loop {
        let (_, text) = srv.get("/metrics").await;
        if cond(&text) {
            return;
        }
        assert!(t.elapsed() < within, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_adapters_batched_match_alone_and_disconnects_cancel() {
    let Some((srv, adapters, _tmp)) = start().await else { return };
    let srv = Arc::new(srv);
    let question = "What is the capital of France? Answer in one sentence.";
    let mut models = vec![BASE.to_string()];
    models.extend(adapters.iter().cloned());
    let mut alone = Vec::new();
    for m in &models {
        let text = srv.chat_text(m, question, 24).await;
        assert!(!text.trim().is_empty(), "{m}: empty answer");
        alone.push(text);
    }
    assert_ne!(alone[0], alone[1], "the {} adapter changes the answer", adapters[0]);
    let batched = join_all(models.iter().cycle().take(models.len() * 3).map(|m| {
        let srv = srv.clone();
        let m = m.clone();
        async move { (srv.chat_text(&m, question, 24).await, m) }
    }))
    .await;
    for (text, m) in batched {
        let i = models.iter().position(|x| *x == m).unwrap();
        assert_eq!(text, alone[i], "{m} batched with the others");
    }

    // A streaming client that goes away cancels its request and frees its cache.
    let model = models.last().unwrap().clone();
    let abort = format!("loramux_requests_total{{adapter=\"{model}\",finish_reason=\"abort\"}}");
    let body = json!({"model": model, "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 1500, "temperature": 0, "ignore_eos": true, "stream": true});
    let mut r = srv.http.post(format!("{}/v1/chat/completions", srv.url)).body(body.to_string()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Wait for generated text (the first chunk only carries the role).
    let mut seen = String::new();
    while seen.matches("data: ").count() < 3 {
        seen.push_str(std::str::from_utf8(&r.chunk().await.unwrap().unwrap()).unwrap());
    }
    if model != BASE {
        // Gateways see which adapter is running.
        let want = format!("running_lora_adapters=\"{model}\"");
        wait_for(&srv, "lora_requests_info to show the running adapter", |t| t.contains(&want), Duration::from_secs(10)).await;
    }
    drop(r);
    let running = format!("vllm:num_requests_running{{model_name=\"{BASE}\"}} 0");
    let t = Instant::now();
    wait_for(&srv, "the cancelled stream to leave the batch", |t| t.contains(&running), Duration::from_secs(3)).await;
    assert!(t.elapsed() < Duration::from_secs(3));
    assert_eq!(srv.metric(&abort).await, 1.0);
    assert_eq!(srv.metric(&format!("vllm:kv_cache_usage_perc{{model_name=\"{BASE}\"}}")).await, 0.0);

    // So does a non-streaming client that times out.
    let slow = reqwest::Client::builder().timeout(Duration::from_millis(500)).build().unwrap();
    let mut body = body.clone();
    body["stream"] = json!(false);
    assert!(slow.post(format!("{}/v1/chat/completions", srv.url)).body(body.to_string()).send().await.is_err());
    wait_for(&srv, "the timed-out request to leave the batch", |t| t.contains(&running), Duration::from_secs(3)).await;
    assert_eq!(srv.metric(&abort).await, 2.0);

    // And the server still answers as before.
    assert_eq!(srv.chat_text(&models[0], question, 24).await, alone[0]);
    Arc::into_inner(srv).unwrap().shutdown().await;
}
