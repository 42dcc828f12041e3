//! `POST /v1/embeddings` (OpenAI's shape): one vector per input, the L2-normalised mean of
//! the base model's last decoder layer over the input's tokens, the first skipped (the
//! router's `Pooling::MeanSkipFirst`: the first token's attention-sink state would dominate
//! every mean alike). The pass runs on a blocking thread over a base-only view of the model
//! that shares the batch loop's weights, never on the loop. Adapters are refused: that view
//! runs no LoRA, and an adapter's vectors from the base would be wrong, not approximate.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use base64::Engine as _;
use loramux_engine::routing::Embedder;
use loramux_engine::Prompt;
use serde_json::{json, Value};

use super::{json_response, AppState};
use crate::error::ApiError;
use crate::openai::Fields;

/// Most inputs one request may embed (OpenAI's limit is 2048).
const MAX_INPUTS: usize = 2048;

/// How the vectors are written.
#[derive(Clone, Copy, PartialEq)]
enum Encoding {
    Float,
    /// Little-endian f32 bytes, base64 (what the `openai` client asks for by default).
    Base64,
}

pub(super) async fn embeddings(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let r = embed(&st, &headers, body).await;
    st.respond(r)
}

async fn embed(st: &Arc<AppState>, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
    st.auth.check(headers)?;
    let bytes = st.read_body(headers, body).await?;
    let mut f = Fields::parse(&bytes)?;
    let model = f.string("model")?.unwrap_or_else(|| st.base_name.clone());
    if model != st.base_name {
        return Err(ApiError::invalid_param(
            "model",
            format!(
                "embeddings are served for the base model '{}' only: the embedding pass runs on a base-only view of the \
                 weights that applies no adapter, so '{model}' cannot be embedded",
                st.base_name
            ),
        ));
    }
    let inputs = inputs(f.take("input").ok_or_else(|| ApiError::invalid_param("input", "'input' is required"))?)?;
    let encoding = match f.string("encoding_format")?.as_deref() {
        None | Some("float") => Encoding::Float,
        Some("base64") => Encoding::Base64,
        Some(other) => return Err(ApiError::invalid_param("encoding_format", format!("'encoding_format' must be float or base64, got {other:?}"))),
    };
    f.unsupported_unless("dimensions", |_| false, "vectors have the model's hidden size")?;
    f.ignore(&["user"]);
    f.finish()?;
    let ids = tokenized(st, inputs)?;
    let embedder = st.sched.embedder.clone();
    let prompt_tokens: usize = ids.iter().map(Vec::len).sum();
    let vectors = tokio::task::spawn_blocking(move || ids.iter().map(|i| embedder.embed(i)).collect::<Result<Vec<_>, _>>())
        .await
        .map_err(|e| ApiError::internal(format!("the embedding pass failed: {e}")))?
        .map_err(|e| ApiError::from_engine(&e))?;
    let data: Vec<Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(index, v)| json!({"object": "embedding", "index": index, "embedding": encode(normalized(v), encoding)}))
        .collect();
    Ok(json_response(&json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    })))
}

/// `input`: a string, a list of strings, a list of token ids, or a list of such lists.
fn inputs(v: Value) -> Result<Vec<Prompt>, ApiError> {
    let ids = |a: &[Value], param: &str| -> Result<Vec<u32>, ApiError> {
        a.iter()
            .map(|t| t.as_u64().filter(|&x| x <= u32::MAX as u64).map(|x| x as u32))
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| ApiError::invalid_param(param, format!("'{param}' must hold token ids")))
    };
    let out = match v {
        Value::String(s) => vec![Prompt::Text(s)],
        Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_number) => vec![Prompt::Tokens(ids(&a, "input")?)],
        Value::Array(a) => a
            .into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Ok(Prompt::Text(s)),
                Value::Array(t) => Ok(Prompt::Tokens(ids(&t, &format!("input[{i}]"))?)),
                _ => Err(ApiError::invalid_param(&format!("input[{i}]"), "each input must be a string or a list of token ids")),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(ApiError::invalid_param("input", "'input' must be a string, a list of strings, or token ids")),
    };
    if out.is_empty() || out.len() > MAX_INPUTS {
        return Err(ApiError::invalid_param("input", format!("'input' must hold 1 to {MAX_INPUTS} inputs, got {}", out.len())));
    }
    Ok(out)
}

/// Each input's ids: not empty, inside the vocabulary, shorter than the context.
fn tokenized(st: &AppState, inputs: Vec<Prompt>) -> Result<Vec<Vec<u32>>, ApiError> {
    let input = &st.sched.input;
    let vocab = input.tokenizer().vocab_size();
    let max = input.max_model_len();
    let mut out = Vec::with_capacity(inputs.len());
    for (i, p) in inputs.iter().enumerate() {
        let param = format!("input[{i}]");
        let ids = input.tokenize(p).map_err(|e| ApiError::from_input(&e, &param))?;
        if ids.is_empty() || matches!(p, Prompt::Text(t) if t.is_empty()) {
            return Err(ApiError::invalid_param(&param, "the input is empty"));
        }
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(ApiError::invalid_param(&param, format!("token id {bad} is outside the vocabulary (size {vocab})")));
        }
        if ids.len() > max {
            return Err(ApiError::invalid_param(&param, format!("the input has {} tokens; this model's context is {max}", ids.len()))
                .with_code("context_length_exceeded"));
        }
        out.push(ids);
    }
    Ok(out)
}

/// Scaled to unit length (a zero vector stays zero).
fn normalized(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

fn encode(v: Vec<f32>, encoding: Encoding) -> Value {
    match encoding {
        Encoding::Float => json!(v),
        Encoding::Base64 => {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
    }
}
