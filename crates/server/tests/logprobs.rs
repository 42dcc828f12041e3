//! Prompt log-probabilities over HTTP (what lm-eval-harness needs from a server): completions'
//! `echo` with `logprobs` and `max_tokens: 0` in OpenAI's legacy shape, vLLM's
//! `prompt_logprobs` field on chat and completions, the tokenizer endpoints, and the bad
//! forms of each, on the tiny Llama fixture, whose logits transformers wrote.

mod common;

use common::*;
use serde_json::{json, Value};

/// Transformers' logits for the fixture's base model on prompt `i`: rows × vocab.
fn reference_logits(i: usize) -> Vec<Vec<f32>> {
    let bytes = std::fs::read(fixture("llama").join("expected.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(&format!("base.{i}")).unwrap();
    let vocab = t.shape()[1];
    let values: Vec<f32> = t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    values.chunks(vocab).map(<[f32]>::to_vec).collect()
}

fn reference_prompt(i: usize) -> Vec<u32> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(fixture("llama").join("expected.json")).unwrap()).unwrap();
    serde_json::from_value(v["prompts"][i].clone()).unwrap()
}

fn log_softmax(row: &[f32], id: u32) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&l| (l as f64 - max).exp()).sum();
    row[id as usize] as f64 - max - sum.ln()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_logprobs_score_the_prompt_as_transformers_does() {
    let srv = TestServer::tiny("llama", tiny_settings()).await;
    let prompt = reference_prompt(2);
    let logits = reference_logits(2);
    // lm-eval-harness's loglikelihood request, with max_tokens 0 and with 1.
    for max_tokens in [0, 1] {
        let (status, body) = srv
            .post("/v1/completions", &json!({"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "logprobs": 1, "echo": true, "temperature": 0}))
            .await;
        assert_eq!(status, 200, "{body}");
        let lp = &body["choices"][0]["logprobs"];
        let token_logprobs = lp["token_logprobs"].as_array().unwrap();
        assert_eq!(token_logprobs.len(), prompt.len() + max_tokens, "{lp}");
        assert!(token_logprobs[0].is_null() && lp["top_logprobs"][0].is_null(), "the first prompt token has nulls: {lp}");
        for p in 1..prompt.len() {
            let want = log_softmax(&logits[p - 1], prompt[p]);
            let got = token_logprobs[p].as_f64().unwrap();
            assert!((got - want).abs() < 1e-4, "position {p}: {got} vs transformers {want}");
            assert_eq!(lp["top_logprobs"][p].as_object().unwrap().len(), 1);
        }
        let offsets: Vec<u64> = lp["text_offset"].as_array().unwrap().iter().map(|o| o.as_u64().unwrap()).collect();
        assert!(offsets.windows(2).all(|w| w[0] <= w[1]) && offsets[0] == 0, "{offsets:?}");
        let text = body["choices"][0]["text"].as_str().unwrap();
        let tokens: String = lp["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
        assert_eq!(text, tokens, "echo: the text is the prompt's tokens then the completion's");
        assert_eq!(body["usage"]["completion_tokens"], max_tokens);
    }
    // A text prompt is echoed as sent, before the completion.
    let (status, body) = srv.post("/v1/completions", &json!({"prompt": "hello world", "max_tokens": 3, "echo": true, "temperature": 0})).await;
    assert_eq!(status, 200, "{body}");
    let plain = srv.post("/v1/completions", &json!({"prompt": "hello world", "max_tokens": 3, "temperature": 0})).await.1;
    assert_eq!(body["choices"][0]["text"].as_str().unwrap(), format!("hello world{}", plain["choices"][0]["text"].as_str().unwrap()));
    assert!(body["choices"][0]["logprobs"].is_null());
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_prompt_logprobs_on_chat_and_completions() {
    let srv = TestServer::tiny("llama", tiny_settings()).await;
    let prompt = reference_prompt(1);
    let logits = reference_logits(1);
    let (status, body) = srv.post("/v1/completions", &json!({"prompt": prompt, "max_tokens": 2, "prompt_logprobs": 2})).await;
    assert_eq!(status, 200, "{body}");
    let pl = body["choices"][0]["prompt_logprobs"].as_array().unwrap();
    assert_eq!(pl.len(), prompt.len());
    assert!(pl[0].is_null());
    for p in 1..prompt.len() {
        let entry = &pl[p][prompt[p].to_string()];
        let want = log_softmax(&logits[p - 1], prompt[p]);
        assert!((entry["logprob"].as_f64().unwrap() - want).abs() < 1e-4, "{entry} vs {want}");
        let rank = 1 + logits[p - 1].iter().filter(|&&l| l > logits[p - 1][prompt[p] as usize]).count();
        assert_eq!(entry["rank"], rank, "position {p}");
        assert!(pl[p].as_object().unwrap().values().any(|e| e["rank"] == 1), "the top alternative is listed");
    }
    let (status, chat) = srv.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "prompt_logprobs": 0})).await;
    assert_eq!(status, 200, "{chat}");
    let n = chat["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    assert_eq!(chat["choices"][0]["prompt_logprobs"].as_array().unwrap().len(), n);
    // Streamed: in the choice's last chunk.
    let (status, chunks) = srv.stream("/v1/completions", &json!({"prompt": prompt, "max_tokens": 2, "prompt_logprobs": 0, "stream": true})).await;
    assert_eq!(status, 200);
    let chunks: Vec<Value> = chunks.iter().filter_map(|c| serde_json::from_str(c).ok()).collect();
    let with: Vec<&Value> = chunks.iter().filter(|c| c["choices"][0].get("prompt_logprobs").is_some()).collect();
    assert_eq!(with.len(), 1, "{chunks:?}");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenizer_endpoints_round_trip() {
    let srv = TestServer::tiny("llama", tiny_settings()).await;
    let (status, t) = srv.post("/tokenize", &json!({"prompt": "hello world", "add_special_tokens": false})).await;
    assert_eq!(status, 200, "{t}");
    let ids = t["tokens"].clone();
    assert_eq!(t["count"], ids.as_array().unwrap().len());
    let (status, d) = srv.post("/detokenize", &json!({"tokens": ids})).await;
    assert_eq!((status, d["prompt"].as_str()), (200, Some("hello world")));
    let (status, chat) = srv.post("/tokenize", &json!({"messages": [{"role": "user", "content": "hi"}]})).await;
    assert_eq!(status, 200, "{chat}");
    let served = srv.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})).await.1;
    assert_eq!(chat["count"], served["usage"]["prompt_tokens"], "the chat template is applied as for generation");
    let (status, info) = srv.get_json("/tokenizer_info").await;
    assert_eq!(status, 200);
    assert!(info.get("eos_token").is_some() && info["chat_template"].is_string(), "{info}");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_prompt_logprob_requests_name_their_parameter() {
    let srv = TestServer::tiny("llama", tiny_settings()).await;
    let cases = [
        ("/v1/completions", json!({"prompt": "x", "echo": true, "n": 2}), "echo"),
        ("/v1/completions", json!({"prompt": "x", "echo": true, "stream": true}), "echo"),
        ("/v1/completions", json!({"prompt": "x", "echo": true, "best_of": 2}), "best_of"),
        ("/v1/completions", json!({"prompt": "x", "logprobs": 21, "echo": true}), "logprobs"),
        ("/v1/completions", json!({"prompt": "x", "max_tokens": 0}), "max_tokens"),
        ("/v1/completions", json!({"prompt": "x", "prompt_logprobs": 21}), "prompt_logprobs"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}), "max_tokens"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "prompt_logprobs": -1}), "prompt_logprobs"),
        ("/detokenize", json!({"tokens": [1, 99999]}), "tokens"),
        ("/tokenize", json!({"prompt": 5}), "prompt"),
    ];
    for (path, body, param) in cases {
        let (status, answer) = srv.post(path, &body).await;
        assert_eq!(status, 400, "{path} {body}: {answer}");
        assert_eq!(answer["error"]["param"], param, "{path} {body}: {answer}");
    }
    // And it still serves.
    assert_eq!(srv.post("/v1/completions", &json!({"prompt": "x", "max_tokens": 1})).await.0, 200);
    srv.shutdown().await;
}
