//! `/v1/responses` over HTTP on the tiny fixture model: string and message-list input,
//! `instructions`, `max_output_tokens`, `text.format` json_schema, an adapter by `model`,
//! the streamed events adding up to the whole response, and the stateless refusals.

mod common;

use common::*;
use serde_json::{json, Value};

fn text_of(v: &Value) -> &str {
    v["output"][0]["content"][0]["text"].as_str().unwrap_or_else(|| panic!("no output text in {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_answer_like_chat() {
    let mut s = tiny_settings();
    s.lora_modules = vec![("a".into(), fixture_adapter("llama", "a"))];
    let srv = TestServer::tiny("llama", s).await;
    let (status, v) = srv.post("/v1/responses", &json!({"model": "tiny", "input": "hello there", "max_output_tokens": 6, "temperature": 0})).await;
    assert_eq!(status, 200, "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("resp"), "{v}");
    assert_eq!(v["object"], "response");
    assert_eq!(v["output"][0]["type"], "message");
    assert_eq!(v["output"][0]["role"], "assistant");
    assert_eq!(v["output"][0]["content"][0]["type"], "output_text");
    assert!(v["usage"]["input_tokens"].as_u64().unwrap() > 0 && v["usage"]["output_tokens"].as_u64().unwrap() <= 6, "{v}");
    assert!(matches!(v["status"].as_str(), Some("completed" | "incomplete")), "{v}");
    // The same text as the chat request it means.
    assert_eq!(text_of(&v), srv.chat_text("tiny", "hello there", 6).await);

    let list = json!({"model": "a", "instructions": "Be brief.", "temperature": 0, "max_output_tokens": 6,
                      "input": [{"role": "user", "content": [{"type": "input_text", "text": "hello "}, {"type": "input_text", "text": "there"}]}]});
    let (status, v) = srv.post("/v1/responses", &list).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["model"], "a");
    assert_eq!(v["instructions"], "Be brief.");
    let chat = json!({"model": "a", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}], "max_tokens": 6, "temperature": 0});
    let (_, c) = srv.post("/v1/chat/completions", &chat).await;
    assert_eq!(text_of(&v), c["choices"][0]["message"]["content"].as_str().unwrap());

    let schema = json!({"type": "object", "properties": {"pet": {"enum": ["cat", "dog"]}}, "required": ["pet"], "additionalProperties": false});
    let b = json!({"input": "A pet?", "max_output_tokens": 100, "text": {"format": {"type": "json_schema", "name": "pet", "schema": schema, "strict": true}}});
    let (status, v) = srv.post("/v1/responses", &b).await;
    assert_eq!(status, 200, "{v}");
    let out: Value = serde_json::from_str(text_of(&v)).unwrap();
    assert!(matches!(out["pet"].as_str(), Some("cat" | "dog")), "{out}");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_events_add_up_to_the_response() {
    let srv = TestServer::tiny("llama", tiny_settings()).await;
    let b = json!({"input": "hello there", "max_output_tokens": 8, "temperature": 0});
    let (_, whole) = srv.post("/v1/responses", &b).await;
    let mut sb = b.clone();
    sb["stream"] = json!(true);
    let (status, frames) = srv.stream_events("/v1/responses", &sb).await;
    assert_eq!(status, 200, "{frames:?}");
    let kinds: Vec<&str> = frames.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds[..3], ["response.created", "response.output_item.added", "response.content_part.added"], "{kinds:?}");
    let last = kinds.last().unwrap();
    assert!(*last == "response.completed" || *last == "response.incomplete", "{kinds:?}");
    let deltas: String = frames.iter().filter(|(k, _)| k == "response.output_text.delta").map(|(_, d)| d["delta"].as_str().unwrap()).collect();
    assert_eq!(deltas, text_of(&whole));
    let done = frames.iter().find(|(k, _)| k == "response.output_text.done").unwrap();
    assert_eq!(done.1["text"], text_of(&whole));
    for (i, (k, d)) in frames.iter().enumerate() {
        assert_eq!(d["type"], k.as_str());
        assert_eq!(d["sequence_number"], i, "{d}");
    }
    assert_eq!(text_of(&frames.last().unwrap().1["response"]), text_of(&whole));
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stateful_and_unknown_fields_are_400_naming_the_field() {
    let srv = TestServer::tiny("llama", tiny_settings()).await;
    let cases = [
        (json!({"input": "x", "store": true}), "store"),
        (json!({"input": "x", "previous_response_id": "resp_1"}), "previous_response_id"),
        (json!({"input": "x", "bogus": 1}), "bogus"),
        (json!({"input": "x", "max_output_tokens": 0}), "max_output_tokens"),
        (json!({"input": "x", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nosuchtype"}}}}), "text.format"),
        (json!({"input": [{"role": "user"}]}), "input[0].content"),
        (json!({"input": 3}), "input"),
        (json!({"input": [{"role": "wizard", "content": "x"}]}), "input[0].role"),
    ];
    for (b, param) in cases {
        let (status, v) = srv.post("/v1/responses", &b).await;
        assert_error(status, &v, 400, &b.to_string());
        assert_eq!(v["error"]["param"], param, "{b}: {v}");
    }
    let (status, _) = srv.post("/v1/responses", &json!({"input": "x", "store": false, "max_output_tokens": 2})).await;
    assert_eq!(status, 200);
    srv.shutdown().await;
}
