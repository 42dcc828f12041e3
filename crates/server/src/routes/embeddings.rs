//! `POST /v1/embeddings` (OpenAI's shape; `model` may be an adapter): one vector per input,
//! the L2-normalised mean of the last decoder layer's states (before the final norm) over
//! the input's tokens, the first skipped (the router's `Pooling::MeanSkipFirst`: the first
//! token's attention-sink state would dominate every mean alike). Each input is a
//! prefill-only request of the batch loop, like vLLM's pooling requests: it is admitted,
//! fair-shared and batched with generation, runs with its adapter through the same mixed
//! batch (LoRA rows and all), and finishes with its pooled vector instead of a token.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use base64::Engine as _;
use loramux_engine::pooling::Pooling;
use loramux_engine::Prompt;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::generate::{accepted, admit, resolve_target, submit_all};
use super::{json_response, AppState};
use crate::error::ApiError;
use crate::openai::Fields;
use crate::scheduler::Event;
use crate::tenants::Cost;

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
    let caller = st.auth.check(headers)?;
    let bytes = st.read_body(headers, body).await?;
    let mut f = Fields::parse(&bytes)?;
    let requested = f.string("model")?;
    if st.is_router_alias(requested.as_deref()) {
        return Err(ApiError::invalid_param(
            "model",
            "embeddings need a named model: 'auto' routes a generation request by its prompt; name the base model or an adapter",
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
    let target = resolve_target(st, requested.as_deref(), &caller);
    let ids = tokenized(st, inputs)?;
    let prompt_tokens: usize = ids.iter().map(Vec::len).sum();
    let input = &st.sched.input;
    let requests = ids
        .into_iter()
        .enumerate()
        .map(|(i, ids)| {
            input.process_embedding(target.lora.clone(), ids, Pooling::MeanSkipFirst).map_err(|e| ApiError::from_input(&e, &format!("input[{i}]")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let admission = admit(st, &caller, &target, Cost { prompt: prompt_tokens as u64, completion: 0 }).await?;
    let mut receivers = submit_all(st, &caller, &target, &admission, requests)?;
    accepted(&mut receivers, 1).await?;
    let mut data = Vec::with_capacity(receivers.len());
    for (index, rx) in receivers.iter_mut().enumerate() {
        let vector = pooled(rx).await?;
        data.push(json!({"object": "embedding", "index": index, "embedding": encode(normalized(vector), encoding)}));
    }
    drop(admission);
    Ok(json_response(&json!({
        "object": "list",
        "data": data,
        "model": target.model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    })))
}

/// An embedding request's vector, once the batch loop finished its prefill.
async fn pooled(rx: &mut UnboundedReceiver<Event>) -> Result<Vec<f32>, ApiError> {
    loop {
        match rx.recv().await {
            Some(Event::Done { embedding: Some(v), .. }) => return Ok(v),
            Some(Event::Done { embedding: None, .. }) => return Err(ApiError::internal("an embedding request finished without its vector")),
            Some(Event::Accepted { .. } | Event::Delta { .. }) => {}
            Some(Event::Error(e)) => return Err(e),
            None => return Err(ApiError::unavailable("the request was cancelled")),
        }
    }
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

/// Each input's ids (the engine checks them against the vocabulary and the context).
fn tokenized(st: &AppState, inputs: Vec<Prompt>) -> Result<Vec<Vec<u32>>, ApiError> {
    let input = &st.sched.input;
    let mut out = Vec::with_capacity(inputs.len());
    for (i, p) in inputs.iter().enumerate() {
        let param = format!("input[{i}]");
        if matches!(p, Prompt::Text(t) if t.is_empty()) {
            return Err(ApiError::invalid_param(&param, "the input is empty"));
        }
        out.push(input.tokenize(p).map_err(|e| ApiError::from_input(&e, &param))?);
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
