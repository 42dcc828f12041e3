//! Streamed answers (`"stream": true`): the choices' event streams merged into one, and
//! [`SseState`], the state machine that turns their events into server-sent events: chat's
//! opening role chunks, a chunk per delta, each choice's finish, the usage chunk and
//! `data: [DONE]`, or an error frame. With tools, a choice's text is held from where a call
//! may begin, and its calls are sent whole before its finish.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, SelectAll, Stream, StreamExt};
use loramux_engine::FinishReason;
use serde::Serialize;
use tokio::sync::mpsc::UnboundedReceiver;

use super::choices::{Meta, Piece};
use super::AppState;
use crate::error::ApiError;
use crate::openai::tools::{CallHold, Tools};
use crate::openai::{Api, GenRequest};
use crate::protocol::{Role, TokenLogprob, Usage, VllmPromptLogprobs};
use crate::scheduler::Event;

/// A choice's events, each with the choice's index.
type Tagged = Box<dyn Stream<Item = (usize, Event)> + Send + Unpin>;

fn tagged(i: usize, mut rx: UnboundedReceiver<Event>) -> Tagged {
    Box::new(stream::poll_fn(move |cx| rx.poll_recv(cx).map(|e| e.map(|e| (i, e)))))
}

/// One SSE event.
pub(super) fn frame(v: &impl Serialize) -> String {
    format!("data: {}\n\n", serde_json::to_string(v).unwrap_or_default())
}

/// Turns choice events into SSE frames.
struct SseState {
    st: Arc<AppState>,
    meta: Meta,
    events: SelectAll<Tagged>,
    include_usage: bool,
    continuous_usage: bool,
    want_logprobs: bool,
    /// The request set vLLM's `prompt_logprobs`.
    want_prompt_logprobs: bool,
    /// Chat with tools: each choice's text held from where a call may begin.
    tools: Option<(Tools, Vec<CallHold>)>,
    started: bool,
    open: usize,
    /// Where the next token starts in each choice's text (completions logprobs).
    token_offset: Vec<usize>,
    completion_tokens: Vec<usize>,
    finished: bool,
}

impl SseState {
    fn usage(&self) -> Usage {
        Usage::new(self.meta.prompt_tokens, self.completion_tokens.iter().sum())
    }

    /// A chunk's `usage`: the running counts, `null`, or left out (see [`crate::protocol::ChatCompletionChunk::usage`]).
    fn chunk_usage(&self) -> Option<Option<Usage>> {
        if self.continuous_usage {
            Some(Some(self.usage()))
        } else if self.include_usage {
            Some(None)
        } else {
            None
        }
    }

    /// The frame for a piece of choice `i`: new text (`None` in chat's last chunk, whose delta
    /// is empty), the logprobs of its tokens, or the finish reason.
    fn choice_frame(&self, i: usize, text: Option<String>, logprobs: Vec<TokenLogprob>, finish_reason: Option<FinishReason>) -> String {
        self.frame_with_prompt(i, text, logprobs, finish_reason, None)
    }

    /// [`Self::choice_frame`] carrying vLLM's `prompt_logprobs` (in the choice's last chunk).
    fn frame_with_prompt(
        &self,
        i: usize,
        text: Option<String>,
        logprobs: Vec<TokenLogprob>,
        finish_reason: Option<FinishReason>,
        prompt_logprobs: Option<VllmPromptLogprobs>,
    ) -> String {
        let piece = Piece {
            text,
            logprobs: (self.want_logprobs && !logprobs.is_empty()).then_some(logprobs),
            text_offset: self.token_offset[i],
            finish_reason,
            prompt_logprobs,
            ..Piece::new(i)
        };
        self.meta.chunk(vec![piece], self.chunk_usage())
    }

    /// Chat's first chunk per choice names the role.
    fn opening(&self) -> String {
        if self.meta.api != Api::Chat {
            return String::new();
        }
        (0..self.completion_tokens.len())
            .map(|i| {
                self.meta.chunk(vec![opening(i)], self.chunk_usage())
            })
            .collect()
    }

    /// A choice's held text once done: a chunk with its calls (each whole, with its `index`)
    /// and the content left, and the finish reason (`tool_calls` when it made calls).
    fn held_calls(&self, i: usize, finish: FinishReason) -> (String, FinishReason) {
        let Some((tools, holds)) = &self.tools else { return (String::new(), finish) };
        let (text, mut calls) = holds[i].finish(tools);
        if text.is_none() && calls.is_empty() {
            return (String::new(), finish);
        }
        for (k, c) in calls.iter_mut().enumerate() {
            c.index = Some(k);
        }
        let finish = if !calls.is_empty() && finish == FinishReason::Stop { FinishReason::ToolCalls } else { finish };
        let piece = Piece { text, tool_calls: calls, ..Piece::new(i) };
        (self.meta.chunk(vec![piece], self.chunk_usage()), finish)
    }

    fn on_event(&mut self, i: usize, ev: Event) -> String {
        match ev {
            Event::Accepted { .. } => String::new(),
            Event::Delta { mut text, tokens, logprobs } => {
                self.completion_tokens[i] += tokens;
                if let Some((_, holds)) = &mut self.tools {
                    text = holds[i].push(&text);
                    if text.is_empty() && !self.want_logprobs {
                        return String::new();
                    }
                }
                let advance: usize = logprobs.iter().map(|t| t.token.len()).sum();
                let out = self.choice_frame(i, Some(text), logprobs, None);
                self.token_offset[i] += advance;
                out
            }
            Event::Done { finish, completion_tokens, prompt_logprobs, .. } => {
                self.completion_tokens[i] = completion_tokens;
                let prompt_logprobs = prompt_logprobs.filter(|_| self.want_prompt_logprobs).map(|p| p.to_vllm());
                let (mut out, finish) = self.held_calls(i, finish);
                out.push_str(&self.frame_with_prompt(i, None, Vec::new(), Some(finish), prompt_logprobs));
                self.open -= 1;
                if self.open == 0 {
                    if self.include_usage {
                        out.push_str(&self.meta.chunk(Vec::new(), Some(Some(self.usage()))));
                    }
                    out.push_str("data: [DONE]\n\n");
                    self.finished = true;
                }
                out
            }
            Event::Error(e) => self.error(e),
        }
    }

    fn error(&mut self, e: ApiError) -> String {
        self.st.metrics.error(e.status.as_u16());
        self.finished = true;
        format!("{}data: [DONE]\n\n", frame(&e.body()))
    }

    /// The next piece of the body: chat's opening chunks first, then a frame per event
    /// (events that make no frame are skipped); `None` once finished.
    async fn next_frame(mut self) -> Option<(Result<Bytes, Infallible>, Self)> {
        if self.finished {
            return None;
        }
        let mut out = String::new();
        if !self.started {
            self.started = true;
            out = self.opening();
            if !out.is_empty() {
                return Some((Ok(Bytes::from(out)), self));
            }
        }
        while out.is_empty() {
            out = match self.events.next().await {
                Some((i, ev)) => self.on_event(i, ev),
                None => self.error(ApiError::unavailable("the request was cancelled")),
            };
        }
        Some((Ok(Bytes::from(out)), self))
    }
}

/// The streamed answer: an SSE body fed by the choices' events.
pub(super) fn stream_response(st: Arc<AppState>, meta: Meta, req: &GenRequest, receivers: Vec<UnboundedReceiver<Event>>) -> Response {
    let n = receivers.len();
    let state = SseState {
        st,
        meta,
        events: stream::select_all(receivers.into_iter().enumerate().map(|(i, rx)| tagged(i, rx))),
        include_usage: req.include_usage,
        continuous_usage: req.continuous_usage,
        want_logprobs: req.logprobs.is_some(),
        want_prompt_logprobs: req.prompt_logprobs,
        tools: req.tools.clone().map(|t| (t, (0..n).map(|_| CallHold::default()).collect())),
        started: false,
        open: n,
        token_offset: vec![0; n],
        completion_tokens: vec![0; n],
        finished: false,
    };
    sse(Body::from_stream(stream::unfold(state, SseState::next_frame)))
}

/// Chat's first chunk of choice `i`: the role and empty content.
fn opening(i: usize) -> Piece {
    Piece { text: Some(String::new()), role: Some(Role::Assistant), ..Piece::new(i) }
}

/// An SSE response with this body.
pub(super) fn sse(body: Body) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream")),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}
