//! Structured output over HTTP on the tiny fixture model: `response_format` json_schema and
//! json_object on chat and completions, whole, streamed and with several choices, every
//! output parsed and checked against its schema; malformed formats and schemas that cannot
//! compile answered 400 `invalid_request_error` with param `response_format`, before
//! anything is queued (the server goes on serving).

mod common;

use common::*;
use serde_json::{json, Value};

/// Bounded in every string, number and list, so even the tiny random model completes it.
fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 10},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "pet": {"enum": ["cat", "dog"]},
            "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}
        },
        "required": ["name", "age", "pet", "tags"],
        "additionalProperties": false
    })
}

fn json_schema_format() -> Value {
    json!({"type": "json_schema", "json_schema": {"name": "person", "schema": schema(), "strict": true}})
}

/// Parses an output and checks it against [`schema`] by hand.
fn assert_person(text: &str, what: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text:?}"));
    let o = v.as_object().unwrap_or_else(|| panic!("{what}: not an object: {v}"));
    let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["age", "name", "pet", "tags"], "{what}: {v}");
    assert!(v["name"].as_str().is_some_and(|n| n.chars().count() <= 10), "{what}: name {v}");
    assert!(v["age"].as_u64().is_some_and(|a| a <= 120), "{what}: age {v}");
    assert!(matches!(v["pet"].as_str(), Some("cat" | "dog")), "{what}: pet {v}");
    let tags = v["tags"].as_array().unwrap_or_else(|| panic!("{what}: tags {v}"));
    assert!(tags.len() <= 3 && tags.iter().all(Value::is_boolean), "{what}: tags {v}");
}

fn messages() -> Value {
    json!([{"role": "user", "content": "Describe a person."}])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_schema_and_json_object_outputs_parse_and_validate() {
    let mut s = tiny_settings();
    s.lora_modules = vec![("a".into(), fixture_adapter("llama", "a"))];
    let srv = TestServer::tiny("llama", s).await;

    // Chat, several sampled choices, on the base and on an adapter.
    for model in ["tiny", "a"] {
        let body = json!({"model": model, "messages": messages(), "max_tokens": 300, "temperature": 1.0, "seed": 5, "n": 4, "response_format": json_schema_format()});
        let (status, v) = srv.post("/v1/chat/completions", &body).await;
        assert_eq!(status, 200, "{v}");
        for c in v["choices"].as_array().unwrap() {
            assert_eq!(c["finish_reason"], "stop", "{c}");
            assert_person(c["message"]["content"].as_str().unwrap(), &format!("{model} chat choice {}", c["index"]));
        }
    }

    // Completions accept response_format too (as vLLM's do).
    let body = json!({"prompt": "A person:", "max_tokens": 300, "temperature": 0, "response_format": json_schema_format()});
    let (status, v) = srv.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    assert_person(v["choices"][0]["text"].as_str().unwrap(), "completion");

    // Streamed: the deltas add up to the same valid JSON as the whole answer.
    let body = json!({"messages": messages(), "max_tokens": 300, "temperature": 0, "response_format": json_schema_format()});
    let (_, whole) = srv.post("/v1/chat/completions", &body).await;
    let whole = whole["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (status, events) = srv.stream("/v1/chat/completions", &streamed).await;
    assert_eq!(status, 200, "{events:?}");
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let (mut text, mut finish) = (String::new(), Value::Null);
    for e in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(e).unwrap();
        let choice = &chunk["choices"][0];
        text.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
        if !choice["finish_reason"].is_null() {
            finish = choice["finish_reason"].clone();
        }
    }
    assert_eq!(finish, "stop");
    assert_eq!(text, whole, "streamed and whole outputs differ");
    assert_person(&text, "streamed chat");

    // json_object: a JSON object (the tiny model's may be long: only complete ones are parsed).
    let body = json!({"messages": messages(), "max_tokens": 400, "temperature": 1.0, "seed": 1, "n": 4, "response_format": {"type": "json_object"}});
    let (status, v) = srv.post("/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    let mut complete = 0;
    for c in v["choices"].as_array().unwrap() {
        let text = c["message"]["content"].as_str().unwrap();
        assert!(text.starts_with('{'), "json_object output does not start an object: {text:?}");
        if c["finish_reason"] == "stop" {
            let parsed: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
            assert!(parsed.is_object(), "{parsed}");
            complete += 1;
        }
    }
    assert!(complete > 0, "no json_object output completed: {v}");

    // {"type": "text"} is free text, as without response_format.
    let mut text_body = chat_body("tiny", "hello", 12);
    text_body["response_format"] = json!({"type": "text"});
    let (status, v) = srv.post("/v1/chat/completions", &text_body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"].as_str().unwrap(), srv.chat_text("tiny", "hello", 12).await);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_formats_and_schemas_are_400_on_response_format() {
    let srv = TestServer::tiny("llama", tiny_settings()).await;
    let with_schema = |schema: Value| json!({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}});
    let cases = [
        ("unknown schema type", with_schema(json!({"type": "nosuchtype"}))),
        ("schema not an object", with_schema(json!([1, 2]))),
        ("dangling $ref", with_schema(json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/none"}}, "required": ["a"]}))),
        ("no type", json!({"json_schema": {"name": "x", "schema": {}}})),
        ("unknown type", json!({"type": "yaml"})),
        ("json_schema missing", json!({"type": "json_schema"})),
        ("no name", json!({"type": "json_schema", "json_schema": {"schema": {}}})),
        ("bad name", json!({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}})),
        ("strict not a boolean", json!({"type": "json_schema", "json_schema": {"name": "x", "strict": "yes"}})),
        ("unknown field", json!({"type": "json_object", "schema": {}})),
        ("not an object", json!("json_object")),
    ];
    for (what, format) in cases {
        for (path, mut body) in [("/v1/chat/completions", json!({"messages": messages()})), ("/v1/completions", json!({"prompt": "x"}))] {
            body["response_format"] = format.clone();
            let (status, v) = srv.post(path, &body).await;
            assert_error(status, &v, 400, what);
            assert_eq!(v["error"]["type"], "invalid_request_error", "{what}: {v}");
            assert_eq!(v["error"]["param"], "response_format", "{what}: {v}");
        }
    }
    // Refused before queueing: the server goes on answering (chat_text asserts a 200).
    srv.chat_text("tiny", "hello", 4).await;
    srv.shutdown().await;
}
