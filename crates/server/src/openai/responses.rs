//! `/v1/responses` requests (OpenAI's Responses API, stateless as vLLM serves it) rewritten
//! as the chat request they mean, so one parser checks every field and one path generates;
//! errors are renamed back to the Responses fields ([`response_param`]).

use serde_json::{json, Map, Value};

use super::fields::{is_empty_collection, wrong_type, Fields};
use crate::error::ApiError;

/// Chat fields and the Responses fields they come from.
const RENAMED: [(&str, &str); 3] = [("messages", "input"), ("max_tokens", "max_output_tokens"), ("response_format", "text.format")];

/// An error on the chat request, naming the Responses field it came from.
pub fn response_param(mut e: ApiError) -> ApiError {
    if let Some(p) = e.param.take() {
        let renamed = RENAMED.iter().find_map(|(from, to)| (p == *from || p.starts_with(&format!("{from}["))).then(|| p.replacen(from, to, 1)));
        e.param = Some(renamed.unwrap_or(p));
    }
    e
}

/// One content part: input or output text.
fn part_text(p: &str, part: &Value) -> Result<String, ApiError> {
    match part.get("type").and_then(Value::as_str) {
        Some("input_text" | "output_text" | "text") => match part.get("text") {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(ApiError::invalid_param(&format!("{p}.text"), "a text part needs a string 'text'")),
        },
        Some(other) => Err(ApiError::unsupported(&format!("{p}.type"), format!("content of type '{other}' is not supported: this is a text-only model"))),
        None => Err(ApiError::invalid_param(&format!("{p}.type"), "each content part needs a 'type'")),
    }
}

/// One `input` item: a message (`type` absent or `message`) with string or part content.
fn input_message(i: usize, item: Value) -> Result<Value, ApiError> {
    let p = format!("input[{i}]");
    let Value::Object(mut m) = item else { return Err(wrong_type(&p, "a message object", &item)) };
    match m.remove("type") {
        None => {}
        Some(Value::String(t)) if t == "message" => {}
        Some(other) => return Err(ApiError::unsupported(&format!("{p}.type"), format!("input items of type {other} are not supported (messages only)"))),
    }
    let role = m.remove("role").unwrap_or(Value::Null);
    if !role.is_string() {
        return Err(ApiError::invalid_param(&format!("{p}.role"), "a message needs a string 'role'"));
    }
    let content = match m.remove("content") {
        Some(Value::String(s)) => s,
        Some(Value::Array(parts)) => {
            let texts: Result<Vec<String>, ApiError> = parts.iter().enumerate().map(|(j, part)| part_text(&format!("{p}.content[{j}]"), part)).collect();
            texts?.concat()
        }
        other => return Err(wrong_type(&format!("{p}.content"), "a string or an array of content parts", &other.unwrap_or(Value::Null))),
    };
    m.remove("id");
    m.remove("status");
    if let Some(k) = m.keys().next() {
        return Err(ApiError::unsupported(&format!("{p}.{k}"), format!("input field '{k}' is not supported")));
    }
    Ok(json!({"role": role, "content": content}))
}

/// `text.format` as chat's `response_format`.
fn text_format(text: Value) -> Result<Option<Value>, ApiError> {
    let Value::Object(mut text) = text else { return Err(wrong_type("text", "an object", &text)) };
    let format = text.remove("format");
    text.remove("verbosity");
    if let Some(k) = text.keys().next() {
        return Err(ApiError::unsupported(&format!("text.{k}"), format!("'text.{k}' is not supported")));
    }
    let Some(Value::Object(mut format)) = format else { return Ok(None) };
    if format.get("type").and_then(Value::as_str) != Some("json_schema") {
        return Ok(Some(Value::Object(format)));
    }
    // Responses flatten the schema's fields into the format; chat nests them.
    let kind = format.remove("type").unwrap_or_default();
    Ok(Some(json!({"type": kind, "json_schema": Value::Object(format)})))
}

/// The chat request a Responses request means.
pub fn chat_body(body: &[u8]) -> Result<Vec<u8>, ApiError> {
    let mut f = Fields::parse(body)?;
    if f.bool("store")? == Some(true) {
        return Err(ApiError::invalid_param("store", "this server is stateless: responses are not stored (send 'store': false)"));
    }
    f.unsupported_unless("previous_response_id", Value::is_null, "this server is stateless: send the whole conversation in 'input'")?;
    f.unsupported_unless("conversation", Value::is_null, "this server is stateless: send the whole conversation in 'input'")?;
    let mut messages = Vec::new();
    match f.take("instructions") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => messages.push(json!({"role": "system", "content": s})),
        Some(other) => return Err(wrong_type("instructions", "a string", &other)),
    }
    match f.take("input") {
        Some(Value::String(s)) => messages.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) => {
            for (i, item) in items.into_iter().enumerate() {
                messages.push(input_message(i, item)?);
            }
        }
        Some(other) => return Err(wrong_type("input", "a string or an array of messages", &other)),
        None => return Err(ApiError::invalid_param("input", "'input' is required")),
    }
    let mut chat = Map::new();
    chat.insert("messages".into(), Value::Array(messages));
    for (from, to) in [("model", "model"), ("stream", "stream"), ("temperature", "temperature"), ("top_p", "top_p"), ("max_output_tokens", "max_tokens"), ("user", "user")] {
        if let Some(v) = f.take(from).filter(|v| !v.is_null()) {
            chat.insert(to.into(), v);
        }
    }
    if let Some(format) = f.take("text").map(text_format).transpose()?.flatten() {
        chat.insert("response_format".into(), format);
    }
    f.unsupported_unless("tools", is_empty_collection, "tools are not supported on /v1/responses: use /v1/chat/completions")?;
    f.unsupported_unless("include", is_empty_collection, "'include' is not supported")?;
    f.unsupported_unless("reasoning", Value::is_null, "this model does not reason")?;
    f.unsupported_unless("background", |v| v == &Value::Bool(false), "background responses need stored state: this server is stateless")?;
    f.unsupported_unless("truncation", |v| v.as_str() == Some("disabled"), "input is never truncated: a too-long input is a 400")?;
    f.ignore(&["metadata", "tool_choice", "parallel_tool_calls", "service_tier", "safety_identifier", "prompt_cache_key"]);
    f.finish()?;
    Ok(serde_json::to_vec(&Value::Object(chat)).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: Value) -> Result<Value, ApiError> {
        chat_body(&serde_json::to_vec(&body).unwrap()).map(|b| serde_json::from_slice(&b).unwrap())
    }

    #[test]
    fn requests_become_chat_and_errors_name_the_responses_field() {
        let c = chat(json!({"model": "m", "input": "hi", "instructions": "Be brief.", "max_output_tokens": 5})).unwrap();
        assert_eq!(c["messages"], json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]));
        assert_eq!(c["max_tokens"], 5);
        let c = chat(json!({"input": [{"role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]}],
                            "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}}}))
        .unwrap();
        assert_eq!(c["messages"][0]["content"], "ab");
        assert_eq!(c["response_format"], json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}));
        for (body, param) in [
            (json!({"input": "x", "store": true}), "store"),
            (json!({"input": "x", "previous_response_id": "resp_1"}), "previous_response_id"),
            (json!({"input": "x", "bogus": 1}), "bogus"),
            (json!({"input": "x", "background": true}), "background"),
            (json!({"input": "x", "truncation": "auto"}), "truncation"),
            (json!({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}), "input[0].content[0].type"),
            (json!({}), "input"),
        ] {
            assert_eq!(chat(body.clone()).unwrap_err().param.as_deref(), Some(param), "{body}");
        }
        let e = response_param(ApiError::invalid_param("messages[0].role", "x"));
        assert_eq!(e.param.as_deref(), Some("input[0].role"));
        assert_eq!(response_param(ApiError::invalid_param("max_tokens", "x")).param.as_deref(), Some("max_output_tokens"));
    }
}
