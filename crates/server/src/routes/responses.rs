//! `POST /v1/responses`: OpenAI's Responses API, stateless as vLLM serves it. The request is
//! rewritten as the chat request it means ([`crate::openai::responses`]) and generated on the
//! chat path (adapters, `auto` routing, admission, structured output); the answer is a
//! `response` object, or its events when streamed: `response.created`, the output item and
//! content part opened, `response.output_text.delta` per piece of text, then the text, part
//! and item done, and `response.completed` (`response.incomplete` when cut by
//! `max_output_tokens`).

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use futures_util::stream::{self, StreamExt};
use loramux_engine::FinishReason;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::generate::{collect_pieces, held_until_sent, start, with_route_header, Started};
use super::sse::sse;
use super::{json_response, now_secs, random_id, AppState};
use crate::error::ApiError;
use crate::openai::responses::{chat_body, response_param};
use crate::openai::Api;
use crate::scheduler::Event;

pub(super) async fn responses(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let r = respond(&st, &headers, body).await;
    st.respond(r)
}

/// What every event of one response shares, and the request fields a response echoes.
struct Ctx {
    id: String,
    msg_id: String,
    created: u64,
    model: String,
    prompt_tokens: usize,
    echo: Value,
}

impl Ctx {
    /// The output message: its text, `completed` or still `in_progress`.
    fn message(&self, text: Option<&str>) -> Value {
        let content = match text {
            Some(t) => json!([{"type": "output_text", "text": t, "annotations": [], "logprobs": []}]),
            None => json!([]),
        };
        let status = if text.is_some() { "completed" } else { "in_progress" };
        json!({"type": "message", "id": self.msg_id, "status": status, "role": "assistant", "content": content})
    }

    /// The `response` object; `done` holds the text, why it ended and the output token count.
    fn response(&self, done: Option<(&str, FinishReason, usize)>) -> Value {
        let e = &self.echo;
        let (status, incomplete, output, usage) = match done {
            None => ("in_progress", Value::Null, json!([]), Value::Null),
            Some((text, finish, out)) => {
                let cut = finish == FinishReason::Length;
                let usage = json!({
                    "input_tokens": self.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": out, "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": self.prompt_tokens + out,
                });
                let incomplete = if cut { json!({"reason": "max_output_tokens"}) } else { Value::Null };
                (if cut { "incomplete" } else { "completed" }, incomplete, json!([self.message(Some(text))]), usage)
            }
        };
        json!({
            "id": self.id, "object": "response", "created_at": self.created, "model": self.model,
            "status": status, "incomplete_details": incomplete, "error": null, "output": output, "usage": usage,
            "instructions": e.get("instructions").cloned().unwrap_or(Value::Null),
            "max_output_tokens": e.get("max_output_tokens").cloned().unwrap_or(Value::Null),
            "temperature": e.get("temperature").cloned().unwrap_or(json!(1.0)),
            "top_p": e.get("top_p").cloned().unwrap_or(json!(1.0)),
            "text": e.get("text").cloned().unwrap_or(json!({"format": {"type": "text"}})),
            "metadata": e.get("metadata").cloned().unwrap_or(json!({})),
            "parallel_tool_calls": true, "tool_choice": "auto", "tools": [], "store": false, "previous_response_id": null,
        })
    }
}

async fn respond(st: &Arc<AppState>, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
    let caller = st.auth.check(headers)?;
    let bytes = st.read_body(headers, body).await?;
    let chat = chat_body(&bytes)?;
    let Started { req, meta, receivers, admission, route_header } = start(st, &caller, &chat, Api::Chat).await.map_err(response_param)?;
    let echo = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let ctx = Ctx { id: random_id("resp"), msg_id: random_id("msg"), created: now_secs(), model: meta.model.clone(), prompt_tokens: meta.prompt_tokens, echo };
    let mut resp = if req.stream {
        let rx = receivers.into_iter().next().ok_or_else(|| ApiError::internal("no choice was submitted"))?;
        held_until_sent(stream_events(ctx, rx), admission)
    } else {
        let (pieces, usage) = collect_pieces(meta.prompt_tokens, &req, receivers).await?;
        let piece = pieces.into_iter().next().ok_or_else(|| ApiError::internal("no choice was generated"))?;
        let finish = piece.finish_reason.unwrap_or(FinishReason::Stop);
        json_response(&ctx.response(Some((piece.text.as_deref().unwrap_or_default(), finish, usage.completion_tokens))))
    };
    with_route_header(&mut resp, route_header);
    Ok(resp)
}

/// A stream's events, numbered as they are written.
struct Events {
    ctx: Ctx,
    rx: UnboundedReceiver<Event>,
    seq: u64,
    text: String,
    done: bool,
}

impl Events {
    /// One SSE event of `kind` with these fields.
    fn event(&mut self, kind: &str, mut data: Value) -> String {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.seq);
        self.seq += 1;
        format!("event: {kind}\ndata: {data}\n\n")
    }

    /// The response created, its message and its text part opened.
    fn opening(&mut self) -> String {
        let part = json!({"type": "output_text", "text": "", "annotations": []});
        let (response, item, id) = (self.ctx.response(None), self.ctx.message(None), self.ctx.msg_id.clone());
        let mut out = self.event("response.created", json!({"response": response}));
        out += &self.event("response.output_item.added", json!({"output_index": 0, "item": item}));
        out += &self.event("response.content_part.added", json!({"item_id": id, "output_index": 0, "content_index": 0, "part": part}));
        out
    }

    /// The text, part, item and response completed.
    fn closing(&mut self, finish: FinishReason, output_tokens: usize) -> String {
        let text = std::mem::take(&mut self.text);
        let id = self.ctx.msg_id.clone();
        let part = json!({"type": "output_text", "text": text, "annotations": []});
        let (item, response) = (self.ctx.message(Some(&text)), self.ctx.response(Some((&text, finish, output_tokens))));
        let mut out = self.event("response.output_text.done", json!({"item_id": id, "output_index": 0, "content_index": 0, "text": text, "logprobs": []}));
        out += &self.event("response.content_part.done", json!({"item_id": id, "output_index": 0, "content_index": 0, "part": part}));
        out += &self.event("response.output_item.done", json!({"output_index": 0, "item": item}));
        let kind = if finish == FinishReason::Length { "response.incomplete" } else { "response.completed" };
        out += &self.event(kind, json!({"response": response}));
        out
    }

    /// The next events to write; `None` once the response is done.
    async fn next(mut self) -> Option<(Result<Bytes, Infallible>, Self)> {
        if self.done {
            return None;
        }
        let out = loop {
            match self.rx.recv().await {
                Some(Event::Accepted { .. }) => {}
                Some(Event::Delta { text, .. }) if text.is_empty() => {}
                Some(Event::Delta { text, .. }) => {
                    self.text.push_str(&text);
                    let id = self.ctx.msg_id.clone();
                    break self.event("response.output_text.delta", json!({"item_id": id, "output_index": 0, "content_index": 0, "delta": text, "logprobs": []}));
                }
                Some(Event::Done { finish, completion_tokens, .. }) => {
                    self.done = true;
                    break self.closing(finish, completion_tokens);
                }
                Some(Event::Error(e)) => break self.error(e),
                None => break self.error(ApiError::unavailable("the request was cancelled")),
            }
        };
        Some((Ok(Bytes::from(out)), self))
    }

    fn error(&mut self, e: ApiError) -> String {
        self.done = true;
        let b = e.body().error;
        self.event("error", json!({"code": b.code, "message": b.message, "param": b.param}))
    }
}

/// The streamed response: the opening events, then one per piece of text, then the closing.
fn stream_events(ctx: Ctx, rx: UnboundedReceiver<Event>) -> Response {
    let mut events = Events { ctx, rx, seq: 0, text: String::new(), done: false };
    let opening = events.opening();
    let body = stream::iter([Ok(Bytes::from(opening))]).chain(stream::unfold(events, Events::next));
    sse(Body::from_stream(body))
}
