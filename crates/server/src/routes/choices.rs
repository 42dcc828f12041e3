//! The two APIs' answers, assembled once: a choice's content ([`Piece`]) becomes a chat or a
//! completions choice, whole or streamed, by [`Meta::api`]; the envelope (id, creation time,
//! model name, usage) is written here for both. The shapes themselves are in
//! [`crate::protocol`].

use axum::response::Response;
use loramux_engine::FinishReason;

use super::json_response;
use super::sse::frame;
use crate::openai::Api;
use crate::protocol::{
    ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatDelta, ChatLogprobs, ChatMessageOut, Completion,
    CompletionChoice, CompletionLogprobs, PromptLogprobs, Role, TokenLogprob, ToolCall, Usage, VllmPromptLogprobs,
};

/// What every answer and chunk of one request shares.
pub(super) struct Meta {
    pub api: Api,
    pub id: String,
    pub created: u64,
    /// The name the request was served under: the base model's or an adapter's.
    pub model: String,
    pub prompt_tokens: usize,
}

/// One choice's content, in neither API's terms yet: a whole choice, or a streamed piece of one.
pub(super) struct Piece {
    pub index: usize,
    /// The text; `None` in a chunk without content (chat's last, whose delta is empty).
    pub text: Option<String>,
    /// Set in chat's first chunk per choice only (a whole chat message is always the assistant's).
    pub role: Option<Role>,
    /// `None`: `null` (not asked for, or a streamed piece without tokens).
    pub logprobs: Option<Vec<TokenLogprob>>,
    /// Where the first token starts in the choice's text (completions logprobs).
    pub text_offset: usize,
    pub finish_reason: Option<FinishReason>,
    /// Completions' `echo`: the prompt that precedes the text.
    pub echo: Option<Echo>,
    /// vLLM's `prompt_logprobs` field, when the request set it.
    pub prompt_logprobs: Option<VllmPromptLogprobs>,
    /// Chat's tool calls, parsed from the whole text (`text` is then what is left, if anything).
    pub tool_calls: Vec<ToolCall>,
}

/// An echoed prompt: its text, and its tokens' log-probabilities when logprobs were asked for.
pub(super) struct Echo {
    pub text: String,
    pub logprobs: Option<Box<PromptLogprobs>>,
}

impl Piece {
    /// An empty piece of choice `index`, for the fields a caller sets.
    pub(super) fn new(index: usize) -> Self {
        Self {
            index,
            text: None,
            role: None,
            logprobs: None,
            text_offset: 0,
            finish_reason: None,
            echo: None,
            prompt_logprobs: None,
            tool_calls: Vec::new(),
        }
    }

    fn chat_choice(self) -> ChatChoice {
        ChatChoice {
            index: self.index,
            message: ChatMessageOut {
                role: Role::Assistant,
                content: if self.tool_calls.is_empty() { Some(self.text.unwrap_or_default()) } else { self.text },
                tool_calls: self.tool_calls,
            },
            logprobs: self.logprobs.map(ChatLogprobs::new),
            finish_reason: self.finish_reason,
            prompt_logprobs: self.prompt_logprobs,
        }
    }

    fn chat_chunk_choice(self) -> ChatChunkChoice {
        ChatChunkChoice {
            index: self.index,
            delta: ChatDelta { role: self.role, content: self.text, tool_calls: self.tool_calls },
            logprobs: self.logprobs.map(ChatLogprobs::new),
            finish_reason: self.finish_reason,
        }
    }

    /// Completions use one choice shape, whole or streamed.
    fn completion_choice(self) -> CompletionChoice {
        let text = self.text.unwrap_or_default();
        let (text, logprobs) = match self.echo {
            None => (text, self.logprobs.map(|l| CompletionLogprobs::new(l, self.text_offset))),
            Some(echo) => {
                // The prompt's tokens first (the first with nulls), then the completion's.
                let logprobs = echo.logprobs.map(|p| {
                    let mut all = CompletionLogprobs::echoed(&p);
                    all.extend(self.logprobs.unwrap_or_default(), all.end_offset());
                    all
                });
                (echo.text + &text, logprobs)
            }
        };
        CompletionChoice { index: self.index, text, logprobs, finish_reason: self.finish_reason, prompt_logprobs: self.prompt_logprobs }
    }
}

impl Meta {
    /// The whole (non-streamed) answer with these choices.
    pub(super) fn whole(&self, choices: Vec<Piece>, usage: Usage) -> Response {
        let (id, created, model) = (self.id.clone(), self.created, self.model.clone());
        match self.api {
            Api::Chat => json_response(&ChatCompletion {
                id,
                created,
                model,
                choices: choices.into_iter().map(Piece::chat_choice).collect(),
                usage,
            }),
            Api::Completions => json_response(&Completion {
                id,
                created,
                model,
                choices: choices.into_iter().map(Piece::completion_choice).collect(),
                usage: Some(Some(usage)),
            }),
        }
    }

    /// One SSE frame of the streamed answer; `usage` as [`ChatCompletionChunk::usage`].
    pub(super) fn chunk(&self, choices: Vec<Piece>, usage: Option<Option<Usage>>) -> String {
        let (id, created, model) = (self.id.clone(), self.created, self.model.clone());
        match self.api {
            Api::Chat => {
                frame(&ChatCompletionChunk { id, created, model, choices: choices.into_iter().map(Piece::chat_chunk_choice).collect(), usage })
            }
            Api::Completions => {
                frame(&Completion { id, created, model, choices: choices.into_iter().map(Piece::completion_choice).collect(), usage })
            }
        }
    }
}
