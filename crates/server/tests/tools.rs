//! Tool calling over HTTP on the tiny fixture model, given a template that reads `tools` (the
//! Hermes system prompt alone would outgrow its 512-token context; that path runs on SmolLM2
//! in the openai client suite): `required` and a named function give a call whose arguments
//! validate against that tool's schema, whole and streamed; `none` gives text; a history with
//! a call and its result renders and is answered; bad tools and choices are 400 naming the
//! field.

mod common;

use common::*;
use loramux_engine::ModelLocation;
use serde_json::{json, Value};

/// Lists the tools' names, and renders history calls with their arguments as JSON objects.
const TOOLS_TEMPLATE: &str = "{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t.function.name }} {% endfor %}<|im_end|>\n{% endif %}\
{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }}\
{{ c.function.arguments | tojson }}</tool_call>{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// The tiny llama fixture with [`TOOLS_TEMPLATE`] (its files linked, not copied).
async fn server() -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("llama");
    for f in ["config.json", "model.safetensors", "tokenizer.json", "generation_config.json"] {
        std::os::unix::fs::symlink(src.join(f), dir.path().join(f)).unwrap();
    }
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer_config.json")).unwrap()).unwrap();
    cfg["chat_template"] = json!(TOOLS_TEMPLATE);
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    (TestServer::start(ModelLocation::HfDir(dir.path().to_path_buf()), tiny_settings()).await, dir)
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {
                "city": {"enum": ["Paris", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "days"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time",
            "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"], "additionalProperties": false}}}
    ])
}

fn body(choice: Value) -> Value {
    json!({"model": "tiny", "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": tools(),
           "tool_choice": choice, "max_tokens": 200, "temperature": 1.0, "seed": 3})
}

/// Checks one returned call against its tool's schema by hand; returns its name.
fn assert_call(call: &Value, what: &str) -> String {
    assert!(call["id"].as_str().is_some_and(|id| id.starts_with("call_")), "{what}: {call}");
    assert_eq!(call["type"], "function", "{what}: {call}");
    let name = call["function"]["name"].as_str().unwrap_or_else(|| panic!("{what}: no name in {call}"));
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().expect("arguments string")).expect("arguments JSON");
    match name {
        "get_weather" => {
            assert!(matches!(args["city"].as_str(), Some("Paris" | "Oslo")), "{what}: {args}");
            assert!(args["days"].as_u64().is_some_and(|d| (1..=7).contains(&d)), "{what}: {args}");
            assert_eq!(args.as_object().unwrap().len(), 2, "{what}: {args}");
        }
        "get_time" => assert!(matches!(args["zone"].as_str(), Some("UTC" | "CET")), "{what}: {args}"),
        other => panic!("{what}: unknown tool {other}"),
    }
    name.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_calls_follow_the_schema_and_none_gives_text() {
    let (srv, _dir) = server().await;
    for seed in 0..3 {
        let mut b = body(json!("required"));
        b["seed"] = json!(seed);
        let (status, v) = srv.post("/v1/chat/completions", &b).await;
        assert_eq!(status, 200, "{v}");
        let choice = &v["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
        assert!(choice["message"]["content"].is_null(), "{v}");
        assert_call(&choice["message"]["tool_calls"][0], "required");
    }
    let (status, v) = srv.post("/v1/chat/completions", &body(json!({"type": "function", "function": {"name": "get_time"}}))).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(assert_call(&v["choices"][0]["message"]["tool_calls"][0], "named"), "get_time");

    let mut none = body(json!("none"));
    none["max_tokens"] = json!(8);
    let (status, v) = srv.post("/v1/chat/completions", &none).await;
    assert_eq!(status, 200, "{v}");
    assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
    assert!(v["choices"][0]["message"].get("tool_calls").is_none(), "{v}");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_calls_stream_as_tool_call_deltas() {
    let (srv, _dir) = server().await;
    let mut b = body(json!("required"));
    b["stream"] = json!(true);
    b["stream_options"] = json!({"include_usage": true});
    let (status, events) = srv.stream("/v1/chat/completions", &b).await;
    assert_eq!(status, 200, "{events:?}");
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let calls: Vec<&Value> = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array()).flatten().collect();
    assert_eq!(calls.len(), 1, "{chunks:?}");
    assert_eq!(calls[0]["index"], 0);
    assert_call(calls[0], "streamed");
    assert!(chunks.iter().any(|c| c["choices"][0]["finish_reason"] == "tool_calls"), "{chunks:?}");
    assert!(chunks.last().unwrap()["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_streams_text_as_it_comes_and_matches_the_whole_answer() {
    let (srv, _dir) = server().await;
    let mut b = body(json!("auto"));
    b["temperature"] = json!(0);
    b["max_tokens"] = json!(24);
    let (status, whole) = srv.post("/v1/chat/completions", &b).await;
    assert_eq!(status, 200, "{whole}");
    b["stream"] = json!(true);
    let (status, events) = srv.stream("/v1/chat/completions", &b).await;
    assert_eq!(status, 200, "{events:?}");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    let message = &whole["choices"][0]["message"];
    assert_eq!(text, message["content"].as_str().unwrap_or_default(), "{chunks:?}");
    let finish = chunks.iter().find_map(|c| c["choices"][0]["finish_reason"].as_str()).unwrap();
    assert_eq!(finish, whole["choices"][0]["finish_reason"]);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_with_a_call_and_its_result_is_answered() {
    let (srv, _dir) = server().await;
    let messages = json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"days\": 1}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}
    ]);
    for choice in ["auto", "none"] {
        let b = json!({"messages": messages, "tools": tools(), "tool_choice": choice, "max_tokens": 8, "temperature": 0});
        let (status, v) = srv.post("/v1/chat/completions", &b).await;
        assert_eq!(status, 200, "{choice}: {v}");
        assert!(v["choices"][0]["message"]["content"].is_string() || v["choices"][0]["message"]["tool_calls"].is_array(), "{v}");
        // The rendered prompt holds the call and its result.
        assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 30, "{v}");
    }
    srv.shutdown().await;
    // A template that knows no tools: the call becomes <tool_call> text, the result a user turn.
    let srv = TestServer::tiny("llama", tiny_settings()).await;
    let (status, v) = srv.post("/v1/chat/completions", &json!({"messages": messages, "max_tokens": 4})).await;
    assert_eq!(status, 200, "{v}");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tools_and_choices_are_400_naming_the_field() {
    let (srv, _dir) = server().await;
    let m = json!([{"role": "user", "content": "hi"}]);
    let bad_schema = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "nosuchtype"}}}]);
    let cases = [
        ("unknown function", json!({"messages": m, "tools": tools(), "tool_choice": {"type": "function", "function": {"name": "nope"}}}), "tool_choice"),
        ("not a function tool", json!({"messages": m, "tools": [{"type": "code_interpreter"}]}), "tools[0].type"),
        ("no name", json!({"messages": m, "tools": [{"type": "function", "function": {}}]}), "tools[0].function.name"),
        ("parameters not an object", json!({"messages": m, "tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}), "tools[0].function.parameters"),
        ("schema that does not compile", json!({"messages": m, "tools": bad_schema, "tool_choice": "required"}), "tools"),
        ("schema that does not compile, auto", json!({"messages": m, "tools": bad_schema}), "tools"),
        ("required without tools", json!({"messages": m, "tool_choice": "required"}), "tool_choice"),
        ("unknown choice", json!({"messages": m, "tools": tools(), "tool_choice": "sometimes"}), "tool_choice"),
        ("tool message without id", json!({"messages": [{"role": "tool", "content": "x"}]}), "messages[0].tool_call_id"),
        ("user with tool_calls", json!({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}), "messages[0].tool_calls"),
        (
            "forced call with response_format",
            json!({"messages": m, "tools": tools(), "tool_choice": "required", "response_format": {"type": "json_object"}}),
            "tool_choice",
        ),
    ];
    for (what, b, param) in cases {
        let (status, v) = srv.post("/v1/chat/completions", &b).await;
        assert_error(status, &v, 400, what);
        assert_eq!(v["error"]["param"], param, "{what}: {v}");
    }
    srv.chat_text("tiny", "hello", 4).await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_counts_the_tools_as_generation_prefills_them() {
    let (srv, _dir) = server().await;
    let messages = json!([{"role": "user", "content": "Weather in Paris?"}]);
    let (st, bare) = srv.post("/tokenize", &json!({"messages": messages})).await;
    assert_eq!(st, 200, "{bare}");
    let (st, with) = srv.post("/tokenize", &json!({"messages": messages, "tools": tools()})).await;
    assert_eq!(st, 200, "{with}");
    assert!(with["count"].as_u64() > bare["count"].as_u64(), "the tools are rendered: {with} vs {bare}");
    let (st, served) = srv.post("/v1/chat/completions", &json!({"messages": messages, "tools": tools(), "max_tokens": 1})).await;
    assert_eq!(st, 200, "{served}");
    assert_eq!(with["count"], served["usage"]["prompt_tokens"], "the same prompt as generation");
    let (st, v) = srv.post("/tokenize", &json!({"messages": messages, "tools": [{"type": "code_interpreter"}]})).await;
    assert_error(st, &v, 400, "a bad tool");
    assert_eq!(v["error"]["param"], "tools[0].type");
    srv.shutdown().await;
}
