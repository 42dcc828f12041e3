//! vLLM's tokenizer endpoints: `POST /tokenize` (a prompt, or chat messages through the
//! model's template), `POST /detokenize` and `GET /tokenizer_info`. Clients that count
//! tokens or score text against the server (lm-eval-harness's remote tokenizer) use them,
//! so they answer with the served model's own tokenizer and template.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::{json, Value};

use super::{json_response, AppState};
use crate::error::ApiError;
use crate::openai::messages::parse_messages;

/// A body's field as a boolean, `default` when absent.
fn flag(body: &Value, key: &str, default: bool) -> Result<bool, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::invalid_param(key, format!("'{key}' must be a boolean"))),
    }
}

/// The JSON object of a request body.
async fn body_object(st: &AppState, headers: &HeaderMap, body: Body) -> Result<Value, ApiError> {
    st.auth.check(headers)?;
    let bytes = st.read_body(headers, body).await?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    Ok(v)
}

/// `POST /tokenize`: `{"prompt": text, "add_special_tokens": true}` or `{"messages": [...],
/// "add_generation_prompt": true, "tools": [...]}`; answers `{"count", "max_model_len", "tokens", "token_strs"}`.
pub(super) async fn tokenize(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        let v = body_object(&st, &headers, body).await?;
        let input = &st.sched.input;
        let tokenizer = input.tokenizer();
        let tokens = match (v.get("prompt"), v.get("messages")) {
            (Some(Value::String(text)), None) => {
                let special = flag(&v, "add_special_tokens", true)?;
                tokenizer.encode(text, special).map_err(|e| ApiError::invalid_param("prompt", e.to_string()))?
            }
            (None, Some(messages)) => {
                let template = input
                    .chat_template()
                    .ok_or_else(|| ApiError::bad_request("this model has no chat template: tokenize a 'prompt' instead"))?;
                let mut messages = parse_messages(messages.clone())?;
                // Tools and tool turns rendered as chat renders them.
                let mut tools = crate::openai::tools::from_tokenize_request(&v)?;
                crate::openai::tools::prepare(&mut messages, tools.as_mut(), template.handles_tools());
                let text = template
                    .render_with_tools(&messages, tools.as_ref().and_then(|t| t.template_tools()), flag(&v, "add_generation_prompt", true)?)
                    .map_err(|e| ApiError::invalid_param("messages", e.to_string()))?;
                let special = flag(&v, "add_special_tokens", false)?;
                tokenizer.encode(&text, special).map_err(|e| ApiError::invalid_param("messages", e.to_string()))?
            }
            (Some(_), Some(_)) => return Err(ApiError::bad_request("give either 'prompt' or 'messages', not both")),
            (Some(_), None) => return Err(ApiError::invalid_param("prompt", "'prompt' must be a string")),
            (None, None) => return Err(ApiError::invalid_param("prompt", "'prompt' (or 'messages') is required")),
        };
        let token_strs = if flag(&v, "return_token_strs", false)? {
            let strs: Vec<String> = tokens.iter().map(|&t| tokenizer.decode(&[t], false).unwrap_or_default()).collect();
            json!(strs)
        } else {
            Value::Null
        };
        Ok(json_response(&json!({
            "count": tokens.len(),
            "max_model_len": input.max_model_len(),
            "tokens": tokens,
            "token_strs": token_strs,
        })))
    }
    .await;
    st.respond(r)
}

/// `POST /detokenize`: `{"tokens": [ids]}` answers `{"prompt": text}`.
pub(super) async fn detokenize(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        let v = body_object(&st, &headers, body).await?;
        let tokenizer = st.sched.input.tokenizer();
        let Some(Value::Array(items)) = v.get("tokens") else {
            return Err(ApiError::invalid_param("tokens", "'tokens' (an array of token ids) is required"));
        };
        let vocab = tokenizer.vocab_size();
        let mut ids = Vec::with_capacity(items.len());
        for (i, t) in items.iter().enumerate() {
            match t.as_u64() {
                Some(id) if (id as usize) < vocab => ids.push(id as u32),
                _ => return Err(ApiError::invalid_param("tokens", format!("tokens[{i}] is not a token id below {vocab}: {t}"))),
            }
        }
        let prompt = tokenizer.decode(&ids, false).map_err(|e| ApiError::invalid_param("tokens", e.to_string()))?;
        Ok(json_response(&json!({ "prompt": prompt })))
    }
    .await;
    st.respond(r)
}

/// `GET /tokenizer_info`: the special tokens, the chat template and the context length.
pub(super) async fn tokenizer_info(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let r = (|| {
        st.auth.check(&headers)?;
        let input = &st.sched.input;
        let tokenizer = input.tokenizer();
        Ok(json_response(&json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
            "pad_token": Value::Null,
            "chat_template": input.chat_template().map(|t| t.source()),
            "model_max_length": input.max_model_len(),
            "vocab_size": tokenizer.vocab_size(),
        })))
    })();
    st.respond(r)
}
