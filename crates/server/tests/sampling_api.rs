//! The sampling controls over HTTP on the tiny fixture model: each field is accepted and
//! changes the output as it should (`logit_bias` +100 forces a token, `allowed_token_ids` and
//! `bad_words` restrict, `min_tokens` holds end-of-sequence and stop strings back, penalties
//! change the greedy output, `min_p` 1 is greedy, `best_of` returns the best `n`), streamed and
//! in mixed-adapter batches alike; out-of-range values are 400s naming the field.

mod common;

use common::*;
use serde_json::{json, Value};

/// The tiny model's end-of-sequence token (its generation_config.json).
const EOS: u32 = 2;

async fn server() -> TestServer {
    let mut s = tiny_settings();
    s.lora_modules = vec![("a".into(), fixture_adapter("llama", "a"))];
    TestServer::tiny("llama", s).await
}

/// One id of a single-token word.
async fn token(srv: &TestServer, word: &str) -> u32 {
    let (status, v) = srv.post("/tokenize", &json!({"prompt": word, "add_special_tokens": false})).await;
    assert_eq!(status, 200, "{v}");
    v["tokens"][0].as_u64().unwrap() as u32
}

async fn detokenize(srv: &TestServer, ids: &[u32]) -> String {
    let (status, v) = srv.post("/detokenize", &json!({"tokens": ids})).await;
    assert_eq!(status, 200, "{v}");
    v["prompt"].as_str().unwrap().to_string()
}

/// A completion with `extra` fields merged in: (text, finish_reason, completion_tokens).
async fn complete(srv: &TestServer, model: &str, extra: Value) -> (String, String, u64) {
    let mut body = completion_body(model, "The quick brown fox", 12);
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    let (status, v) = srv.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{body}: {v}");
    let c = &v["choices"][0];
    (c["text"].as_str().unwrap().into(), c["finish_reason"].as_str().unwrap().into(), v["usage"]["completion_tokens"].as_u64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_control_changes_the_output_as_it_should() {
    let srv = server().await;
    let t = token(&srv, "dog").await;
    let forced = detokenize(&srv, &[t; 12]).await;

    // logit_bias +100 forces the token, greedy or sampled; allowed_token_ids does too.
    for extra in [json!({"logit_bias": {t.to_string(): 100}}), json!({"logit_bias": {t.to_string(): 100}, "temperature": 1.0, "seed": 3}), json!({"allowed_token_ids": [t]})] {
        assert_eq!(complete(&srv, "tiny", extra.clone()).await.0, forced, "{extra}");
    }

    // End-of-sequence pushed to the top stops at once; min_tokens holds it back.
    let eos = json!({"logit_bias": {EOS.to_string(): 100}});
    let (_, finish, n) = complete(&srv, "tiny", eos.clone()).await;
    assert_eq!((finish.as_str(), n), ("stop", 1));
    let mut held = eos.clone();
    held["min_tokens"] = json!(5);
    let (_, finish, n) = complete(&srv, "tiny", held).await;
    assert_eq!((finish.as_str(), n), ("stop", 6), "five tokens, then end-of-sequence");

    // A stop string the greedy text starts with ends it at once; min_tokens looks for it later.
    let (greedy, _, _) = complete(&srv, "tiny", json!({})).await;
    let first: String = greedy.chars().take(1).collect();
    let (text, finish, _) = complete(&srv, "tiny", json!({"stop": [first.clone()]})).await;
    assert_eq!((text.as_str(), finish.as_str()), ("", "stop"));
    let (text, _, n) = complete(&srv, "tiny", json!({"stop": [first], "min_tokens": 3})).await;
    assert!(n >= 3 && !text.is_empty(), "{text:?} after {n} tokens");

    // Penalties change the greedy output; bad_words keeps the greedy first word out.
    for extra in [json!({"repetition_penalty": 1.8}), json!({"frequency_penalty": 2.0}), json!({"presence_penalty": 2.0})] {
        assert_ne!(complete(&srv, "tiny", extra.clone()).await.0, greedy, "{extra}");
    }
    let word = greedy.split_whitespace().next().unwrap().to_string();
    let (text, _, _) = complete(&srv, "tiny", json!({"bad_words": [word.clone()]})).await;
    assert!(!text.trim_start().starts_with(&word), "{word:?} in {text:?}");

    // min_p 1 keeps only the most likely token: sampling is greedy.
    assert_eq!(complete(&srv, "tiny", json!({"temperature": 1.0, "seed": 9, "min_p": 1.0})).await.0, greedy);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn best_of_returns_the_most_likely_n() {
    let srv = server().await;
    let body = json!({"prompt": "Once upon a time", "max_tokens": 6, "temperature": 1.0, "seed": 4, "n": 2, "best_of": 5, "logprobs": 0});
    let (status, v) = srv.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2, "{v}");
    let score = |c: &Value| c["logprobs"]["token_logprobs"].as_array().unwrap().iter().map(|l| l.as_f64().unwrap()).sum::<f64>();
    assert!(score(&choices[0]) >= score(&choices[1]), "{v}");
    assert_eq!((choices[0]["index"].as_u64(), choices[1]["index"].as_u64()), (Some(0), Some(1)));
    // The best of five is at least as likely as any of five seeded samples taken alone.
    let mut best = f64::NEG_INFINITY;
    for j in 0..5u64 {
        let one = json!({"prompt": "Once upon a time", "max_tokens": 6, "temperature": 1.0, "seed": 4 + j, "logprobs": 0});
        let (_, v) = srv.post("/v1/completions", &one).await;
        best = best.max(score(&v["choices"][0]));
    }
    assert!((score(&choices[0]) - best).abs() < 1e-4, "best_of's first {} vs best alone {best}", score(&choices[0]));
    // Without logprobs asked for, none are returned.
    let mut quiet = body.clone();
    quiet.as_object_mut().unwrap().remove("logprobs");
    let (status, v) = srv.post("/v1/completions", &quiet).await;
    assert_eq!(status, 200, "{v}");
    assert!(v["choices"][0]["logprobs"].is_null(), "{v}");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_controls_are_400s_naming_the_field() {
    let srv = server().await;
    for (extra, param) in [
        (json!({"presence_penalty": 3}), "presence_penalty"),
        (json!({"frequency_penalty": -2.5}), "frequency_penalty"),
        (json!({"repetition_penalty": 0}), "repetition_penalty"),
        (json!({"repetition_penalty": 2.5}), "repetition_penalty"),
        (json!({"min_p": -0.1}), "min_p"),
        (json!({"min_tokens": 13}), "min_tokens"),
        (json!({"logit_bias": {"5": 150}}), "logit_bias"),
        (json!({"logit_bias": {"100000": 1}}), "logit_bias"),
        (json!({"logit_bias": {"x": 1}}), "logit_bias"),
        (json!({"allowed_token_ids": [100000]}), "allowed_token_ids"),
        (json!({"best_of": 1, "n": 2}), "best_of"),
        (json!({"best_of": 3, "stream": true}), "best_of"),
    ] {
        for path in ["/v1/completions", "/v1/chat/completions"] {
            let mut body = if path == "/v1/completions" { completion_body("tiny", "hi", 12) } else { chat_body("tiny", "hi", 12) };
            body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            let (status, v) = srv.post(path, &body).await;
            assert_error(status, &v, 400, &format!("{path} {extra}"));
            assert_eq!(v["error"]["param"], param, "{path} {extra}: {v}");
        }
    }
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controls_hold_when_streamed_and_in_mixed_adapter_batches() {
    let srv = server().await;
    let t = token(&srv, "cat").await;
    let bodies: Vec<Value> = ["tiny", "a", "tiny", "a"]
        .iter()
        .enumerate()
        .map(|(i, model)| {
            let mut b = chat_body(model, "Tell me a story.", 10);
            let extra = match i {
                0 => json!({"repetition_penalty": 1.5, "frequency_penalty": 0.5}),
                1 => json!({"logit_bias": {t.to_string(): 100}}),
                2 => json!({"min_tokens": 10, "presence_penalty": -1.0}),
                _ => json!({"bad_words": ["the"], "repetition_penalty": 1.3}),
            };
            b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            b
        })
        .collect();
    // Alone, one at a time.
    let mut alone = Vec::new();
    for b in &bodies {
        let (status, v) = srv.post("/v1/chat/completions", b).await;
        assert_eq!(status, 200, "{v}");
        alone.push(v["choices"][0]["message"]["content"].as_str().unwrap().to_string());
    }
    assert_eq!(alone[1], detokenize(&srv, &[t; 10]).await);
    // All at once, in one batch of both adapters: the same texts.
    let together = futures_util::future::join_all(bodies.iter().map(|b| srv.post("/v1/chat/completions", b))).await;
    for (i, (status, v)) in together.iter().enumerate() {
        assert_eq!(*status, 200, "{v}");
        assert_eq!(v["choices"][0]["message"]["content"].as_str().unwrap(), alone[i], "request {i} batched");
    }
    // Streamed: the deltas add up to the whole answer.
    for (i, b) in bodies.iter().enumerate() {
        let mut s = b.clone();
        s["stream"] = json!(true);
        let (status, events) = srv.stream("/v1/chat/completions", &s).await;
        assert_eq!(status, 200, "{events:?}");
        let text: String = events
            .iter()
            .filter(|e| *e != "[DONE]")
            .map(|e| serde_json::from_str::<Value>(e).unwrap()["choices"][0]["delta"]["content"].as_str().unwrap_or("").to_string())
            .collect();
        assert_eq!(text, alone[i], "request {i} streamed");
    }
    srv.shutdown().await;
}
