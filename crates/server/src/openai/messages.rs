//! Chat `messages`: roles, text content (a string or text parts), tool calls and tool
//! results in the history, and a refusal for every part or field this text-only server
//! does not handle.

use loramux_engine::ChatMessage;
use serde_json::Value;

use super::fields::{is_empty_collection, wrong_type};
use super::tools::history_calls;
use crate::error::ApiError;

fn message_content(i: usize, v: Value) -> Result<String, ApiError> {
    let param = format!("messages[{i}].content");
    match v {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s),
        Value::Array(parts) => {
            let mut text = String::new();
            for (j, p) in parts.into_iter().enumerate() {
                let kind = p.get("type").and_then(Value::as_str).unwrap_or("");
                match kind {
                    "text" => match p.get("text") {
                        Some(Value::String(s)) => text.push_str(s),
                        _ => return Err(ApiError::invalid_param(&format!("{param}[{j}].text"), "a text part needs a string 'text'")),
                    },
                    "" => return Err(ApiError::invalid_param(&format!("{param}[{j}]"), "each content part needs a 'type'")),
                    other => {
                        return Err(ApiError::unsupported(
                            &format!("{param}[{j}].type"),
                            format!("content parts of type '{other}' are not supported: this is a text-only model"),
                        ))
                    }
                }
            }
            Ok(text)
        }
        other => Err(wrong_type(&param, "a string or an array of content parts", &other)),
    }
}

/// Chat `messages`: text content, `developer` read as `system`, assistant `tool_calls` and
/// `tool` results (with their `tool_call_id`).
pub(crate) fn parse_messages(v: Value) -> Result<Vec<ChatMessage>, ApiError> {
    let Value::Array(list) = v else {
        return Err(wrong_type("messages", "an array of messages", &v));
    };
    if list.is_empty() {
        return Err(ApiError::invalid_param("messages", "'messages' must hold at least one message"));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.into_iter().enumerate() {
        let Value::Object(mut m) = m else {
            return Err(wrong_type(&format!("messages[{i}]"), "an object", &m));
        };
        let role = match m.remove("role") {
            Some(Value::String(r)) => r,
            Some(other) => return Err(wrong_type(&format!("messages[{i}].role"), "a string", &other)),
            None => return Err(ApiError::invalid_param(&format!("messages[{i}].role"), format!("messages[{i}] has no 'role'"))),
        };
        let role = match role.as_str() {
            "system" | "user" | "assistant" | "tool" => role,
            "developer" => "system".to_string(),
            "function" => {
                return Err(ApiError::unsupported(&format!("messages[{i}].role"), "the legacy 'function' role is not supported: use 'tool'"))
            }
            other => {
                return Err(ApiError::invalid_param(
                    &format!("messages[{i}].role"),
                    format!("unknown role '{other}' (expected system, developer, user, assistant or tool)"),
                ))
            }
        };
        if !m.contains_key("content") && role != "assistant" {
            return Err(ApiError::invalid_param(&format!("messages[{i}].content"), format!("messages[{i}] has no 'content'")));
        }
        let content = message_content(i, m.remove("content").unwrap_or(Value::Null))?;
        m.remove("name");
        let tool_calls = match m.remove("tool_calls") {
            Some(v) if role == "assistant" && !v.is_null() => Some(history_calls(i, v)?),
            Some(v) if !v.is_null() => return Err(ApiError::invalid_param(&format!("messages[{i}].tool_calls"), "only assistant messages have 'tool_calls'")),
            _ => None,
        };
        let tool_call_id = match (role.as_str(), m.remove("tool_call_id")) {
            ("tool", Some(Value::String(id))) => Some(id),
            ("tool", other) => return Err(ApiError::invalid_param(&format!("messages[{i}].tool_call_id"), format!("a tool message needs a string 'tool_call_id', got {}", other.unwrap_or(Value::Null)))),
            (_, v) => {
                if v.is_some_and(|v| !v.is_null()) {
                    return Err(ApiError::invalid_param(&format!("messages[{i}].tool_call_id"), "only tool messages have 'tool_call_id'"));
                }
                None
            }
        };
        for (k, v) in m {
            let neutral = v.is_null() || is_empty_collection(&v);
            if !neutral {
                return Err(ApiError::unsupported(&format!("messages[{i}].{k}"), format!("message field '{k}' is not supported")));
            }
        }
        out.push(ChatMessage { role, content, tool_calls, tool_call_id });
    }
    Ok(out)
}
