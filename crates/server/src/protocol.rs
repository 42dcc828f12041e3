//! The JSON this server answers with, typed: OpenAI's chat and text completions (whole and
//! streamed), logprobs, usage, model cards and errors. One struct per shape keeps every
//! field name, `null` and omission in one place, where tests can read them back.
//!
//! Each response's `object` field is a constant; it is written by `#[serde(tag = "object")]`
//! (serde's "tag on a struct": the field comes first, with the struct's `rename` as value).

use std::collections::BTreeMap;

use loramux_engine::FinishReason;
use serde::{Deserialize, Deserializer, Serialize};

/// A generated token's log-probability, with the token and its alternatives decoded to
/// text: what the batch loop hands out, turned into either API's logprobs shape here.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    /// The most likely tokens at this position, most likely first.
    pub top: Vec<(String, f32)>,
}

/// Floor for reported log-probabilities: JSON has no `-inf`, and OpenAI reports -9999.0.
const MIN_LOGPROB: f32 = -9999.0;

/// Reads a field that may be absent (`None`) or `null` (`Some(None)`), as chunks' `usage`.
fn de_present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// Token counts of a request: its prompts (once per prompt, whatever `n`) and all choices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    /// The block for these counts, with their total.
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
    }
}

/// Who wrote a chat message: the model always answers as the assistant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Assistant,
}

/// Chat `logprobs`: one entry per generated token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

/// One generated token in chat `logprobs.content`, with its most likely alternatives.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    /// The token's UTF-8 bytes, for tokens that are not whole characters.
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

/// An alternative token in chat `top_logprobs`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

impl TopLogprob {
    fn new(token: String, logprob: f32) -> Self {
        Self { bytes: token.as_bytes().to_vec(), token, logprob: logprob.max(MIN_LOGPROB) }
    }
}

impl ChatLogprobs {
    /// The chat shape of these tokens.
    pub fn new(tokens: Vec<TokenLogprob>) -> Self {
        let content = tokens
            .into_iter()
            .map(|t| {
                let TopLogprob { token, logprob, bytes } = TopLogprob::new(t.token, t.logprob);
                let top_logprobs = t.top.into_iter().map(|(s, lp)| TopLogprob::new(s, lp)).collect();
                ChatTokenLogprob { token, logprob, bytes, top_logprobs }
            })
            .collect();
        Self { content }
    }
}

/// Completions `logprobs`: parallel lists, one entry per generated token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    /// `null` for an echoed prompt's first token, which nothing predicts.
    pub token_logprobs: Vec<Option<f32>>,
    /// Alternatives by token text; when two alternatives decode alike, the likelier is kept.
    pub top_logprobs: Vec<Option<BTreeMap<String, f32>>>,
    /// Where each token starts in the choice's text, in bytes.
    pub text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    /// The completions shape of these tokens; `offset` is where the first starts in the
    /// choice's text (non-zero for a streamed chunk after the first).
    pub fn new(tokens: Vec<TokenLogprob>, offset: usize) -> Self {
        let mut out = Self {
            tokens: Vec::with_capacity(tokens.len()),
            token_logprobs: Vec::with_capacity(tokens.len()),
            top_logprobs: Vec::with_capacity(tokens.len()),
            text_offset: Vec::with_capacity(tokens.len()),
        };
        out.extend(tokens, offset);
        out
    }

    /// An echoed prompt's tokens (`echo` with `logprobs`, as vLLM answers it): the first
    /// with `null`s, then each with its log-probability, offsets from the start of the text.
    pub fn echoed(prompt: &PromptLogprobs) -> Self {
        let mut out = Self {
            tokens: vec![prompt.first.clone()],
            token_logprobs: vec![None],
            top_logprobs: vec![None],
            text_offset: vec![0],
        };
        out.extend(prompt.rest.iter().map(|t| t.token_logprob()).collect(), prompt.first.len());
        out
    }

    /// Appends tokens whose text starts at `offset`.
    pub fn extend(&mut self, tokens: Vec<TokenLogprob>, mut offset: usize) {
        for t in tokens {
            self.text_offset.push(offset);
            offset += t.token.len();
            let mut top = BTreeMap::new();
            for (s, lp) in t.top {
                top.entry(s).or_insert(lp.max(MIN_LOGPROB));
            }
            self.top_logprobs.push(Some(top));
            self.token_logprobs.push(Some(t.logprob.max(MIN_LOGPROB)));
            self.tokens.push(t.token);
        }
    }

    /// Where the text of these tokens ends.
    pub fn end_offset(&self) -> usize {
        match (self.text_offset.last(), self.tokens.last()) {
            (Some(o), Some(t)) => o + t.len(),
            _ => 0,
        }
    }
}

/// A prompt token's log-probability with its rank and top alternatives, by token id.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptTokenLogprob {
    pub id: u32,
    pub token: String,
    pub logprob: f32,
    pub rank: u32,
    /// `(id, text, logprob)`, most likely first.
    pub top: Vec<(u32, String, f32)>,
}

impl PromptTokenLogprob {
    fn token_logprob(&self) -> TokenLogprob {
        TokenLogprob { token: self.token.clone(), logprob: self.logprob, top: self.top.iter().map(|(_, s, lp)| (s.clone(), *lp)).collect() }
    }
}

/// The prompt's log-probabilities: its first token (which nothing predicts) and every later one.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptLogprobs {
    /// The whole prompt decoded (what `echo` shows for a prompt sent as token ids).
    pub text: String,
    pub first: String,
    pub first_id: u32,
    pub rest: Vec<PromptTokenLogprob>,
}

/// One token of vLLM's `prompt_logprobs` answer field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VllmLogprob {
    pub logprob: f32,
    pub rank: Option<u32>,
    pub decoded_token: String,
}

/// vLLM's `prompt_logprobs` choice field: `null` for the first prompt token, then per token
/// a map from token id to its log-probability, rank and text (the prompt's own token and
/// the top alternatives).
pub type VllmPromptLogprobs = Vec<Option<BTreeMap<String, VllmLogprob>>>;

impl PromptLogprobs {
    /// The vLLM shape of these log-probabilities.
    pub fn to_vllm(&self) -> VllmPromptLogprobs {
        let mut out: VllmPromptLogprobs = vec![None];
        for t in &self.rest {
            let mut m = BTreeMap::new();
            for (rank, (id, text, lp)) in t.top.iter().enumerate() {
                m.insert(id.to_string(), VllmLogprob { logprob: lp.max(MIN_LOGPROB), rank: Some(rank as u32 + 1), decoded_token: text.clone() });
            }
            m.insert(t.id.to_string(), VllmLogprob { logprob: t.logprob.max(MIN_LOGPROB), rank: Some(t.rank), decoded_token: t.token.clone() });
            out.push(Some(m));
        }
        out
    }
}

/// A whole `/v1/chat/completions` answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "object", rename = "chat.completion")]
pub struct ChatCompletion {
    pub id: String,
    pub created: u64,
    /// The name the request was served under: the base model's or an adapter's.
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

/// One choice of a [`ChatCompletion`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatMessageOut,
    /// `null` unless the request asked for logprobs.
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<FinishReason>,
    /// vLLM's extension, present when the request set `prompt_logprobs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<VllmPromptLogprobs>,
}

/// The generated message of a [`ChatChoice`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatMessageOut {
    pub role: Role,
    /// `null` when the answer is only tool calls.
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
}

/// A tool call the model made, as OpenAI returns it (with `index` in streamed deltas).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// `call_<random>`: what the `tool` message answering it names in `tool_call_id`.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

/// The function a [`ToolCall`] calls; `arguments` is a JSON string, as OpenAI sends it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: String,
}

/// One server-sent event of a streamed chat completion.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "object", rename = "chat.completion.chunk")]
pub struct ChatCompletionChunk {
    pub id: String,
    pub created: u64,
    pub model: String,
    /// One choice's piece; empty in the final usage-only chunk.
    pub choices: Vec<ChatChunkChoice>,
    /// Omitted (`None`) without `stream_options.include_usage`; with it, `null` on every
    /// chunk but the final one, or the running counts with `continuous_usage_stats`.
    #[serde(default, deserialize_with = "de_present", skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

/// A choice's piece in a [`ChatCompletionChunk`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    /// The logprobs of the tokens in this delta, when asked for; else `null`.
    pub logprobs: Option<ChatLogprobs>,
    /// `null` until the choice's last chunk.
    pub finish_reason: Option<FinishReason>,
}

/// New message content: the first chunk carries the role and empty content, the last neither.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatDelta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Each call whole, in the choice's last content chunk (see the README).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
}

/// A `/v1/completions` answer, whole or one server-sent event of a stream (OpenAI uses the
/// same `text_completion` shape for both).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "object", rename = "text_completion")]
pub struct Completion {
    pub id: String,
    pub created: u64,
    pub model: String,
    /// Every choice when whole; one choice's piece, or none in the final usage-only chunk,
    /// when streamed.
    pub choices: Vec<CompletionChoice>,
    /// Always there when whole; when streamed, as [`ChatCompletionChunk::usage`].
    #[serde(default, deserialize_with = "de_present", skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

/// One choice of a [`Completion`], or its piece in a streamed chunk.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    /// `null` unless the request asked for logprobs.
    pub logprobs: Option<CompletionLogprobs>,
    /// `null` until the choice's last chunk when streamed.
    pub finish_reason: Option<FinishReason>,
    /// vLLM's extension, present when the request set `prompt_logprobs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<VllmPromptLogprobs>,
}

/// What `/v1/models` says about the base model or an adapter. Names only: the files a
/// model was read from are the operator's business, not every key holder's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "object", rename = "model")]
pub struct ModelCard {
    /// The name requests use in `model`.
    pub id: String,
    pub created: u64,
    pub owned_by: String,
    /// vLLM's field: the card's own id.
    pub root: String,
    /// The base model's served name for an adapter; `null` for the base model.
    pub parent: Option<String>,
    pub max_model_len: usize,
    /// vLLM's field, always empty: keys, not permission objects, control access here.
    pub permission: Vec<serde_json::Value>,
}

/// The `/v1/models` answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "object", rename = "list")]
pub struct ModelList {
    pub data: Vec<ModelCard>,
}

/// The `/version` answer, as vLLM's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Version {
    pub version: String,
}

/// OpenAI's error body, `{"error": {...}}`, for every 4xx/5xx and for a stream that fails.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: ErrorDetail,
}

/// The inside of an [`ErrorResponse`]; `param` and `code` are `null` when not known.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `server_error`...
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    fn tokens() -> Vec<TokenLogprob> {
        vec![
            TokenLogprob { token: "ab".into(), logprob: -0.5, top: vec![("ab".into(), -0.5), ("c".into(), -1.0), ("c".into(), -2.0)] },
            TokenLogprob { token: "d".into(), logprob: f32::NEG_INFINITY, top: vec![] },
        ]
    }

    /// Serializes, checks the JSON, and reads it back to the same value.
    fn round_trip<T: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug>(x: &T, want: Value) {
        let v = serde_json::to_value(x).unwrap();
        assert_eq!(v, want);
        assert_eq!(&serde_json::from_value::<T>(v).unwrap(), x);
    }

    #[test]
    fn logprob_shapes() {
        let c = serde_json::to_value(ChatLogprobs::new(tokens())).unwrap();
        assert_eq!(c["content"][0]["token"], "ab");
        assert_eq!(c["content"][0]["bytes"], json!([97, 98]));
        assert_eq!(c["content"][0]["top_logprobs"][1], json!({"token": "c", "logprob": -1.0, "bytes": [99]}));
        assert_eq!(c["content"][1]["logprob"], json!(-9999.0));
        assert_eq!(c["content"][1]["top_logprobs"], json!([]));
        round_trip(
            &CompletionLogprobs::new(tokens(), 3),
            json!({
                "tokens": ["ab", "d"],
                "token_logprobs": [-0.5, -9999.0],
                "top_logprobs": [{"ab": -0.5, "c": -1.0}, {}],
                "text_offset": [3, 5],
            }),
        );
    }

    #[test]
    fn chunks_null_and_omitted_fields() {
        let chunk = |usage| ChatCompletionChunk {
            id: "chatcmpl-1".into(),
            created: 7,
            model: "m".into(),
            choices: vec![ChatChunkChoice {
                index: 0,
                delta: ChatDelta { role: Some(Role::Assistant), content: Some(String::new()), tool_calls: vec![] },
                logprobs: None,
                finish_reason: None,
            }],
            usage,
        };
        let base = json!({
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}],
        });
        round_trip(&chunk(None), base.clone());
        let mut with_null = base.clone();
        with_null["usage"] = Value::Null;
        round_trip(&chunk(Some(None)), with_null);
        let mut with_usage = base;
        with_usage["usage"] = json!({"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5});
        round_trip(&chunk(Some(Some(Usage::new(2, 3)))), with_usage);

        let last = ChatChunkChoice { index: 1, delta: ChatDelta::default(), logprobs: None, finish_reason: Some(FinishReason::Length) };
        round_trip(&last, json!({"index": 1, "delta": {}, "logprobs": null, "finish_reason": "length"}));
        let done = Completion { id: "cmpl-1".into(), created: 7, model: "m".into(), choices: vec![], usage: Some(Some(Usage::new(1, 1))) };
        round_trip(
            &done,
            json!({"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m", "choices": [],
                   "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}),
        );
    }

    #[test]
    fn whole_responses_and_cards() {
        let c = ChatCompletion {
            id: "chatcmpl-1".into(),
            created: 7,
            model: "a".into(),
            choices: vec![ChatChoice {
                index: 0,
                message: ChatMessageOut { role: Role::Assistant, content: Some("hi".into()), tool_calls: vec![] },
                logprobs: None,
                finish_reason: Some(FinishReason::Stop),
                prompt_logprobs: None,
            }],
            usage: Usage::new(4, 1),
        };
        round_trip(
            &c,
            json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 7, "model": "a",
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "logprobs": null, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}}),
        );
        let card = ModelCard {
            id: "a".into(),
            created: 7,
            owned_by: "loramux".into(),
            root: "a".into(),
            parent: Some("tiny".into()),
            max_model_len: 64,
            permission: vec![],
        };
        round_trip(
            &ModelList { data: vec![card] },
            json!({"object": "list", "data": [{"id": "a", "object": "model", "created": 7, "owned_by": "loramux",
                   "root": "a", "parent": "tiny", "max_model_len": 64, "permission": []}]}),
        );
        assert!(serde_json::from_value::<ChatChoice>(json!({"index": 0, "message": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": "eos"})).is_err());
    }
}
