//! OpenAI request parsing (`/v1/chat/completions`, `/v1/completions`) into engine terms,
//! with a precise 400 for every malformed, mistyped, out-of-range or unsupported field.
//! The answers' shapes are in [`crate::protocol`].
//!
//! - this file: [`parse_chat`] and [`parse_completion`], each kind's own fields;
//! - `common.rs`: the fields both kinds share (sampling, stop, `max_tokens`,
//!   `response_format`, streaming options), in named steps;
//! - `controls.rs`: penalties, `logit_bias`, `min_p`, `min_tokens`, bad and allowed tokens;
//! - `messages.rs`: chat `messages`;
//! - `responses.rs`: `/v1/responses` bodies rewritten as the chat request they mean;
//! - `tools.rs`: tool calling (`tools`, `tool_choice`, the prompt, the parsed calls);
//! - `fields.rs`: `Fields`, typed field-by-field reading with precise errors.

mod common;
mod controls;
mod fields;
pub(crate) mod messages;
pub mod responses;
pub(crate) mod tools;

use loramux_engine::sampling::MAX_LOGPROBS;
use loramux_engine::{Prompt, ResponseFormat, SamplingParams};
use serde_json::{json, Value};

use self::common::common;
pub(crate) use self::fields::Fields;
use self::fields::{is_empty_collection, token_list, wrong_type};
use self::messages::parse_messages;
use self::tools::{parse_tools, Tools};
use crate::config::defaults::MAX_N;
use crate::error::ApiError;

/// Which API a request came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    Chat,
    Completions,
}

/// A parsed generation request.
#[derive(Clone, Debug)]
pub struct GenRequest {
    pub model: Option<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub continuous_usage: bool,
    /// Choices per prompt.
    pub n: usize,
    /// One prompt for chat; one or more for completions.
    pub prompts: Vec<Prompt>,
    /// `max_tokens: None` fills the context.
    pub params: SamplingParams,
    /// Log-probabilities asked for (`Some(top_n)`).
    pub logprobs: Option<usize>,
    /// Completions' `echo`: the prompt precedes the completion in `text` (and in `logprobs`).
    pub echo: bool,
    /// The request set vLLM's `prompt_logprobs`: answered in each choice's field of that name.
    pub prompt_logprobs: bool,
    /// Completions' `best_of`: choices generated per prompt, of which the `n` with the highest
    /// cumulative log-probability are returned (`n` when not given).
    pub best_of: usize,
    /// Chat's tools, when the model may call them.
    pub tools: Option<Tools>,
}

/// Parses a `/v1/chat/completions` body.
pub fn parse_chat(body: &[u8], max_model_len: usize) -> Result<GenRequest, ApiError> {
    let mut f = Fields::parse(body)?;
    let messages = f.take("messages").ok_or_else(|| ApiError::invalid_param("messages", "'messages' is required"))?;
    let messages = parse_messages(messages)?;
    let mut req = common(&mut f, Api::Chat, max_model_len)?;
    let logprobs = f.bool("logprobs")?.unwrap_or(false);
    let top = match f.int("top_logprobs")? {
        None => None,
        Some(t) if !(0..=MAX_LOGPROBS as i64).contains(&t) => {
            return Err(ApiError::invalid_param("top_logprobs", format!("'top_logprobs' must be between 0 and {MAX_LOGPROBS}, got {t}")))
        }
        Some(t) => Some(t as usize),
    };
    if top.is_some_and(|t| t > 0) && !logprobs {
        return Err(ApiError::invalid_param("top_logprobs", "'top_logprobs' needs 'logprobs': true"));
    }
    req.logprobs = logprobs.then(|| top.unwrap_or(0));
    req.tools = parse_tools(&mut f)?;
    if let Some(schema) = req.tools.as_ref().and_then(Tools::forced_schema) {
        if req.params.response_format != ResponseFormat::Text {
            return Err(ApiError::invalid_param("tool_choice", "a forced tool call cannot be combined with 'response_format'"));
        }
        req.params.response_format = ResponseFormat::JsonSchema(schema);
    }
    f.unsupported_unless("functions", is_empty_collection, "the legacy 'functions' are not supported: use 'tools'")?;
    f.unsupported_unless("function_call", |v| v.as_str() == Some("none") || v.as_str() == Some("auto"), "the legacy 'function_call' is not supported: use 'tool_choice'")?;
    f.unsupported_unless("best_of", |v| v.as_f64() == Some(req.n as f64), "best_of other than n is for /v1/completions")?;
    f.unsupported_unless("audio", |_| false, "audio output is not supported")?;
    f.unsupported_unless("prediction", |_| false, "predicted outputs are not supported")?;
    f.unsupported_unless("web_search_options", |_| false, "web search is not supported")?;
    f.unsupported_unless("modalities", |v| v == &json!(["text"]), "only text output is supported")?;
    f.unsupported_unless("echo", |v| v == &Value::Bool(false), "echo is not supported for chat")?;
    f.unsupported_unless("add_generation_prompt", |v| v == &Value::Bool(true), "the generation prompt is always added")?;
    f.unsupported_unless("continue_final_message", |v| v == &Value::Bool(false), "continuing the final message is not supported")?;
    f.unsupported_unless("chat_template", |_| false, "custom chat templates are not supported")?;
    f.unsupported_unless("chat_template_kwargs", is_empty_collection, "chat template arguments are not supported")?;
    f.unsupported_unless("documents", is_empty_collection, "documents are not supported")?;
    f.ignore(&["reasoning_effort", "verbosity", "prompt_cache_key", "safety_identifier"]);
    f.finish()?;
    req.prompts = vec![Prompt::Chat(messages)];
    req.params.logprobs = req.logprobs;
    req.prompt_logprobs = req.params.prompt_logprobs.is_some();
    Ok(req)
}

/// Completions' `echo`, refused where vLLM refuses it: with more than one choice per
/// prompt, or streamed. `max_tokens: 0` (scoring the prompt only) needs it.
fn echo(f: &mut Fields, req: &GenRequest) -> Result<bool, ApiError> {
    let echo = f.bool("echo")?.unwrap_or(false);
    if echo && req.n > 1 {
        return Err(ApiError::invalid_param("echo", format!("'echo' returns the prompt once per choice: use n = 1, not {}", req.n)));
    }
    if echo && req.stream {
        return Err(ApiError::invalid_param("echo", "'echo' is not supported with 'stream': true"));
    }
    if !echo && req.params.max_tokens == Some(0) {
        return Err(ApiError::invalid_param("max_tokens", "'max_tokens' must be at least 1, got 0 (0 only scores the prompt, with 'echo': true)"));
    }
    Ok(echo)
}

/// Completions' `best_of`: at least `n`, not streamed, not echoed (OpenAI's rules), and at
/// most [`MAX_N`] choices generated in all.
fn best_of(f: &mut Fields, req: &GenRequest, prompts: usize) -> Result<usize, ApiError> {
    let Some(b) = f.int("best_of")? else { return Ok(req.n) };
    let invalid = |m: String| Err(ApiError::invalid_param("best_of", m));
    if b < req.n as i64 {
        return invalid(format!("'best_of' ({b}) must be at least 'n' ({})", req.n));
    }
    if b as u64 * prompts as u64 > MAX_N as u64 {
        return invalid(format!("at most {MAX_N} choices are generated per request (prompts × best_of), got {}", b as u64 * prompts as u64));
    }
    if b as usize > req.n && req.stream {
        return invalid("'best_of' greater than 'n' cannot be streamed".into());
    }
    if b as usize > req.n && req.echo {
        return invalid("'best_of' greater than 'n' cannot be combined with 'echo'".into());
    }
    Ok(b as usize)
}

/// Parses a `/v1/completions` body.
pub fn parse_completion(body: &[u8], max_model_len: usize) -> Result<GenRequest, ApiError> {
    let mut f = Fields::parse(body)?;
    let prompt = f.take("prompt").ok_or_else(|| ApiError::invalid_param("prompt", "'prompt' is required"))?;
    let prompts = match prompt {
        Value::String(s) => vec![Prompt::Text(s)],
        Value::Array(a) if a.is_empty() => return Err(ApiError::invalid_param("prompt", "'prompt' is an empty array")),
        Value::Array(a) if a.iter().all(Value::is_number) => vec![Prompt::Tokens(token_list("prompt", &a)?)],
        Value::Array(a) => {
            let mut out = Vec::with_capacity(a.len());
            for (i, p) in a.into_iter().enumerate() {
                match p {
                    Value::String(s) => out.push(Prompt::Text(s)),
                    Value::Array(t) => out.push(Prompt::Tokens(token_list(&format!("prompt[{i}]"), &t)?)),
                    other => return Err(wrong_type(&format!("prompt[{i}]"), "a string or an array of token ids", &other)),
                }
            }
            out
        }
        other => return Err(wrong_type("prompt", "a string, an array of strings, or token ids", &other)),
    };
    let mut req = common(&mut f, Api::Completions, max_model_len)?;
    if prompts.len() * req.n > MAX_N {
        return Err(ApiError::invalid_param("prompt", format!("at most {MAX_N} choices per request (prompts × n), got {}", prompts.len() * req.n)));
    }
    req.logprobs = match f.int("logprobs")? {
        None => None,
        Some(l) if !(0..=MAX_LOGPROBS as i64).contains(&l) => {
            return Err(ApiError::invalid_param("logprobs", format!("'logprobs' must be between 0 and {MAX_LOGPROBS}, got {l}")))
        }
        Some(l) => Some(l as usize),
    };
    req.echo = echo(&mut f, &req)?;
    req.best_of = best_of(&mut f, &req, prompts.len())?;
    if req.best_of > req.n {
        // Choices are ranked by cumulative log-probability, which needs each token's.
        req.params.logprobs = Some(req.logprobs.unwrap_or(0));
    }
    req.prompt_logprobs = req.params.prompt_logprobs.is_some();
    f.unsupported_unless("suffix", |v| v.as_str() == Some(""), "suffix (insertion) is not implemented")?;
    f.finish()?;
    req.prompts = prompts;
    if req.best_of == req.n {
        req.params.logprobs = req.logprobs;
    }
    if req.echo && req.params.prompt_logprobs.is_none() {
        // The echoed prompt's log-probabilities come from the same prefill.
        req.params.prompt_logprobs = req.logprobs.or(Some(0));
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use loramux_engine::ChatMessage;

    use super::*;

    fn err(r: Result<GenRequest, ApiError>) -> ApiError {
        r.expect_err("should be refused")
    }

    #[test]
    fn chat_parses_and_validates() {
        let r = parse_chat(br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":5,"temperature":0,"stop":"x","seed":3}"#, 100).unwrap();
        assert_eq!(r.params.max_tokens, Some(5));
        assert_eq!(r.params.stop, vec!["x"]);
        assert_eq!(r.params.temperature, 0.0);
        assert_eq!(r.params.seed, Some(3));
        let r = parse_chat(br#"{"messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],"max_completion_tokens":2,"logprobs":true,"top_logprobs":2}"#, 100).unwrap();
        assert_eq!(r.prompts, vec![Prompt::Chat(vec![ChatMessage::user("ab")])]);
        assert_eq!(r.params.logprobs, Some(2));
        assert_eq!(r.params.max_tokens, Some(2));
        assert_eq!(err(parse_chat(b"{", 100)).code, Some("invalid_json"));
        assert_eq!(err(parse_chat(b"[]", 100)).status, 400);
        assert_eq!(err(parse_chat(br#"{"model":"m"}"#, 100)).param.as_deref(), Some("messages"));
        assert_eq!(err(parse_chat(br#"{"messages":[]}"#, 100)).param.as_deref(), Some("messages"));
        assert_eq!(err(parse_chat(br#"{"messages":"hi"}"#, 100)).param.as_deref(), Some("messages"));
        let m = br#""messages":[{"role":"user","content":"hi"}]"#;
        let with = |extra: &str| format!("{{{},{extra}}}", std::str::from_utf8(m).unwrap());
        assert_eq!(err(parse_chat(with(r#""max_tokens":0"#).as_bytes(), 100)).param.as_deref(), Some("max_tokens"));
        assert_eq!(err(parse_chat(with(r#""max_tokens":-3"#).as_bytes(), 100)).param.as_deref(), Some("max_tokens"));
        assert_eq!(err(parse_chat(with(r#""max_tokens":100"#).as_bytes(), 100)).code, Some("context_length_exceeded"));
        assert_eq!(err(parse_chat(with(r#""max_tokens":"5""#).as_bytes(), 100)).param.as_deref(), Some("max_tokens"));
        assert_eq!(err(parse_chat(with(r#""max_tokens":2.5"#).as_bytes(), 100)).param.as_deref(), Some("max_tokens"));
        assert_eq!(err(parse_chat(with(r#""temperature":"hot""#).as_bytes(), 100)).param.as_deref(), Some("temperature"));
        assert_eq!(err(parse_chat(with(r#""top_p":0"#).as_bytes(), 100)).param.as_deref(), Some("top_p"));
        assert_eq!(err(parse_chat(with(r#""n":0"#).as_bytes(), 100)).param.as_deref(), Some("n"));
        assert_eq!(parse_chat(with(r#""frequency_penalty":0.5"#).as_bytes(), 100).unwrap().params.frequency_penalty, 0.5);
        assert_eq!(err(parse_chat(with(r#""frequency_penalty":2.5"#).as_bytes(), 100)).param.as_deref(), Some("frequency_penalty"));
        assert_eq!(err(parse_chat(with(r#""best_of":2"#).as_bytes(), 100)).param.as_deref(), Some("best_of"));
        assert_eq!(err(parse_chat(with(r#""tools":[{"type":"function"}]"#).as_bytes(), 100)).param.as_deref(), Some("tools[0].function"));
        assert_eq!(err(parse_chat(with(r#""bogus":1"#).as_bytes(), 100)).code, Some("unknown_parameter"));
        assert_eq!(err(parse_chat(with(r#""stream_options":{"include_usage":true}"#).as_bytes(), 100)).param.as_deref(), Some("stream_options"));
        assert_eq!(err(parse_chat(with(r#""top_logprobs":3"#).as_bytes(), 100)).param.as_deref(), Some("top_logprobs"));
        assert!(parse_chat(with(r#""frequency_penalty":0,"user":"u","stream":true,"stream_options":{"include_usage":true}"#).as_bytes(), 100).unwrap().include_usage);
        assert_eq!(
            err(parse_chat(br#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{}}]}]}"#, 100)).code,
            Some("unsupported_parameter")
        );
        assert_eq!(err(parse_chat(br#"{"messages":[{"content":"x"}]}"#, 100)).param.as_deref(), Some("messages[0].role"));
    }

    #[test]
    fn response_formats_parse_into_engine_terms() {
        let m = r#""messages":[{"role":"user","content":"hi"}]"#;
        let format = |f: &str| parse_chat(format!(r#"{{{m},"response_format":{f}}}"#).as_bytes(), 100).map(|r| r.params.response_format);
        assert_eq!(format(r#"{"type":"text"}"#).unwrap(), ResponseFormat::Text);
        assert_eq!(format(r#"{"type":"json_object"}"#).unwrap(), ResponseFormat::JsonObject);
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let f = format!(r#"{{"type":"json_schema","json_schema":{{"name":"a-1_b","description":"d","strict":true,"schema":{schema}}}}}"#);
        assert_eq!(format(&f).unwrap(), ResponseFormat::JsonSchema(schema));
        assert_eq!(format(r#"{"type":"json_schema","json_schema":{"name":"n"}}"#).unwrap(), ResponseFormat::JsonSchema(json!({})), "no schema: any JSON");
        let r = parse_completion(br#"{"prompt":"x","response_format":{"type":"json_object"}}"#, 100).unwrap();
        assert_eq!(r.params.response_format, ResponseFormat::JsonObject);
        for bad in [r#""json""#, r#"{}"#, r#"{"type":"yaml"}"#, r#"{"type":"json_schema"}"#, r#"{"type":"json_schema","json_schema":{"name":""}}"#, r#"{"type":"text","x":1}"#] {
            assert_eq!(format(bad).expect_err(bad).param.as_deref(), Some("response_format"), "{bad}");
        }
    }

    #[test]
    fn completion_prompt_forms() {
        let r = parse_completion(br#"{"prompt":"hello","logprobs":2}"#, 100).unwrap();
        assert_eq!(r.prompts, vec![Prompt::Text("hello".into())]);
        assert_eq!(r.params.logprobs, Some(2));
        let r = parse_completion(br#"{"prompt":[1,2,3]}"#, 100).unwrap();
        assert_eq!(r.prompts, vec![Prompt::Tokens(vec![1, 2, 3])]);
        let r = parse_completion(br#"{"prompt":["a","b"],"n":2}"#, 100).unwrap();
        assert_eq!(r.prompts.len(), 2);
        assert_eq!(err(parse_completion(br#"{"prompt":5}"#, 100)).param.as_deref(), Some("prompt"));
        assert_eq!(err(parse_completion(br#"{"prompt":[-1]}"#, 100)).param.as_deref(), Some("prompt[0]"));
        assert_eq!(err(parse_completion(br#"{"prompt":"x","echo":true,"n":2}"#, 100)).param.as_deref(), Some("echo"));
        let scoring = parse_completion(br#"{"prompt":"x","echo":true,"max_tokens":0,"logprobs":1}"#, 100).unwrap();
        assert!(scoring.echo && scoring.params.prompt_logprobs == Some(1) && scoring.params.max_tokens == Some(0));
        assert_eq!(err(parse_completion(br#"{"prompt":"x","logprobs":21}"#, 100)).param.as_deref(), Some("logprobs"));
        let best = parse_completion(br#"{"prompt":"x","n":2,"best_of":4,"temperature":1}"#, 100).unwrap();
        assert_eq!((best.n, best.best_of, best.params.logprobs), (2, 4, Some(0)));
        for bad in [r#"{"prompt":"x","n":2,"best_of":1}"#, r#"{"prompt":"x","best_of":3,"stream":true}"#, r#"{"prompt":["a","b"],"best_of":9}"#] {
            assert_eq!(err(parse_completion(bad.as_bytes(), 100)).param.as_deref(), Some("best_of"), "{bad}");
        }
    }
}
