//! OpenAI request parsing (`/v1/chat/completions`, `/v1/completions`) into engine terms,
//! with a precise 400 for every malformed, mistyped, out-of-range or unsupported field.
//! The answers' shapes are in [`crate::protocol`].

use loramux_engine::{ChatMessage, Prompt, ResponseFormat, SamplingParams};
use serde_json::{json, Map, Value};

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
}

/// A JSON object whose fields are taken one by one; leftovers are unknown parameters.
pub(crate) struct Fields {
    map: Map<String, Value>,
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong_type(param: &str, expected: &str, v: &Value) -> ApiError {
    ApiError::invalid_param(param, format!("'{param}' must be {expected}, got {}", type_name(v)))
}

impl Fields {
    pub(crate) fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let v: Value = serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")).with_code("invalid_json"))?;
        match v {
            Value::Object(map) => Ok(Self { map }),
            other => Err(ApiError::bad_request(format!("the request body must be a JSON object, got {}", type_name(&other))).with_code("invalid_json")),
        }
    }

    /// A present, non-null field.
    pub(crate) fn take(&mut self, k: &str) -> Option<Value> {
        self.map.remove(k).filter(|v| !v.is_null())
    }

    pub(crate) fn string(&mut self, k: &str) -> Result<Option<String>, ApiError> {
        match self.take(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(wrong_type(k, "a string", &v)),
        }
    }

    pub(crate) fn bool(&mut self, k: &str) -> Result<Option<bool>, ApiError> {
        match self.take(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(v) => Err(wrong_type(k, "a boolean", &v)),
        }
    }

    pub(crate) fn float(&mut self, k: &str) -> Result<Option<f64>, ApiError> {
        match self.take(k) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(v) => Err(wrong_type(k, "a number", &v)),
        }
    }

    pub(crate) fn int(&mut self, k: &str) -> Result<Option<i64>, ApiError> {
        match self.take(k) {
            None => Ok(None),
            Some(Value::Number(n)) => match (n.as_i64(), n.as_f64()) {
                (Some(i), _) => Ok(Some(i)),
                // 3.0 is an integer; 3.5 is not.
                (None, Some(f)) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(Some(f as i64)),
                (None, _) if n.as_u64().is_some() => Err(ApiError::invalid_param(k, format!("'{k}' is too large"))),
                _ => Err(ApiError::invalid_param(k, format!("'{k}' must be an integer, got {n}"))),
            },
            Some(v) => Err(wrong_type(k, "an integer", &v)),
        }
    }

    /// Parameters accepted for compatibility whose value does not change what is generated.
    pub(crate) fn ignore(&mut self, keys: &[&str]) {
        for k in keys {
            self.map.remove(*k);
        }
    }

    /// Refuses a known but unimplemented parameter unless it has its neutral value.
    pub(crate) fn unsupported_unless(&mut self, k: &str, neutral: impl Fn(&Value) -> bool, what: &str) -> Result<(), ApiError> {
        match self.take(k) {
            Some(v) if !neutral(&v) => Err(ApiError::unsupported(k, format!("'{k}' is not supported by this server: {what}"))),
            _ => Ok(()),
        }
    }

    pub(crate) fn finish(self) -> Result<(), ApiError> {
        if let Some(k) = self.map.keys().next() {
            return Err(ApiError::unsupported(k, format!("Unrecognized request argument supplied: {k}")).with_code("unknown_parameter"));
        }
        Ok(())
    }
}

fn is_zero(v: &Value) -> bool {
    v.as_f64() == Some(0.0)
}

fn is_empty_collection(v: &Value) -> bool {
    match v {
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// Fields both APIs share: model, streaming, sampling, stop, n.
fn common(f: &mut Fields, api: Api, max_model_len: usize) -> Result<GenRequest, ApiError> {
    let model = f.string("model")?;
    let stream = f.bool("stream")?.unwrap_or(false);
    let (mut include_usage, mut continuous_usage) = (false, false);
    if let Some(opts) = f.take("stream_options") {
        let Value::Object(mut o) = opts else {
            return Err(wrong_type("stream_options", "an object", &opts));
        };
        if !stream {
            return Err(ApiError::invalid_param("stream_options", "'stream_options' is only allowed when 'stream' is true"));
        }
        for (k, v) in std::mem::take(&mut o) {
            let flag = match v {
                Value::Bool(b) => b,
                Value::Null => false,
                other => return Err(wrong_type(&format!("stream_options.{k}"), "a boolean", &other)),
            };
            match k.as_str() {
                "include_usage" => include_usage = flag,
                "continuous_usage_stats" => continuous_usage = flag,
                _ => return Err(ApiError::unsupported(&format!("stream_options.{k}"), format!("Unrecognized stream option: {k}"))),
            }
        }
    }
    let n = match f.int("n")? {
        None => 1,
        Some(n) if n < 1 => return Err(ApiError::invalid_param("n", format!("'n' must be at least 1, got {n}"))),
        Some(n) if n as usize > MAX_N => return Err(ApiError::invalid_param("n", format!("'n' must be at most {MAX_N}, got {n}"))),
        Some(n) => n as usize,
    };
    let temperature = match f.float("temperature")? {
        None => 1.0,
        Some(t) if !(0.0..=100.0).contains(&t) => {
            return Err(ApiError::invalid_param("temperature", format!("'temperature' must be between 0 and 100, got {t}")))
        }
        Some(t) => t as f32,
    };
    let top_p = match f.float("top_p")? {
        None => 1.0,
        Some(p) if !(p > 0.0 && p <= 1.0) => return Err(ApiError::invalid_param("top_p", format!("'top_p' must be in (0, 1], got {p}"))),
        Some(p) => p as f32,
    };
    let top_k = match f.int("top_k")? {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k < 0 => return Err(ApiError::invalid_param("top_k", format!("'top_k' must be -1 (off) or positive, got {k}"))),
        Some(k) => k as usize,
    };
    let seed = f.int("seed")?.map(|s| s as u64);
    let stop = match f.take("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(a)) => {
            let mut out = Vec::with_capacity(a.len());
            for (i, v) in a.into_iter().enumerate() {
                match v {
                    Value::String(s) => out.push(s),
                    other => return Err(wrong_type(&format!("stop[{i}]"), "a string", &other)),
                }
            }
            out
        }
        Some(v) => return Err(wrong_type("stop", "a string or an array of strings", &v)),
    };
    let stop_token_ids = match f.take("stop_token_ids") {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, v)| v.as_u64().filter(|&x| x <= u32::MAX as u64).map(|x| x as u32).ok_or_else(|| wrong_type(&format!("stop_token_ids[{i}]"), "a token id", v)))
            .collect::<Result<_, _>>()?,
        Some(v) => return Err(wrong_type("stop_token_ids", "an array of token ids", &v)),
    };
    let ignore_eos = f.bool("ignore_eos")?.unwrap_or(false);
    let mut max_tokens = f.int("max_tokens")?.map(|m| ("max_tokens", m));
    if api == Api::Chat {
        if let Some(m) = f.int("max_completion_tokens")? {
            max_tokens = Some(("max_completion_tokens", m));
        }
    }
    let max_tokens = match max_tokens {
        None => None,
        Some((k, m)) if m <= 0 => return Err(ApiError::invalid_param(k, format!("'{k}' must be at least 1, got {m}"))),
        Some((k, m)) if m as u64 >= max_model_len as u64 => {
            return Err(ApiError::invalid_param(
                k,
                format!("'{k}' is {m}, but this model's maximum context length is {max_model_len} tokens (prompt plus completion)"),
            )
            .with_code("context_length_exceeded"))
        }
        Some((_, m)) => Some(m as usize),
    };
    // Known parameters this server does not implement: accepted only at their neutral value.
    f.unsupported_unless("presence_penalty", is_zero, "penalties are not implemented")?;
    f.unsupported_unless("frequency_penalty", is_zero, "penalties are not implemented")?;
    f.unsupported_unless("repetition_penalty", |v| v.as_f64() == Some(1.0), "penalties are not implemented")?;
    f.unsupported_unless("logit_bias", is_empty_collection, "logit_bias is not implemented")?;
    f.unsupported_unless("min_p", is_zero, "min_p sampling is not implemented")?;
    f.unsupported_unless("min_tokens", is_zero, "min_tokens is not implemented")?;
    f.unsupported_unless("best_of", |v| v.as_f64() == Some(1.0), "best_of is not implemented (use n)")?;
    f.unsupported_unless("use_beam_search", |v| v == &Value::Bool(false), "beam search is not implemented")?;
    f.unsupported_unless("skip_special_tokens", |v| v == &Value::Bool(true), "special tokens are always skipped")?;
    f.unsupported_unless("include_stop_str_in_output", |v| v == &Value::Bool(false), "stop strings are never included")?;
    f.unsupported_unless("prompt_logprobs", |_| false, "prompt logprobs are not implemented")?;
    f.unsupported_unless("guided_json", |_| false, "guided decoding is not implemented")?;
    f.unsupported_unless("guided_regex", |_| false, "guided decoding is not implemented")?;
    f.unsupported_unless("guided_choice", |_| false, "guided decoding is not implemented")?;
    f.unsupported_unless("guided_grammar", |_| false, "guided decoding is not implemented")?;
    let response_format = match f.take("response_format") {
        None => ResponseFormat::Text,
        Some(v) => response_format(v)?,
    };
    // Accepted and without effect on generation.
    f.ignore(&["user", "metadata", "store", "service_tier", "request_id", "priority", "spaces_between_special_tokens"]);
    Ok(GenRequest {
        model,
        stream,
        include_usage,
        continuous_usage,
        n,
        prompts: Vec::new(),
        params: SamplingParams {
            temperature,
            top_p,
            top_k,
            seed,
            max_tokens,
            stop,
            stop_token_ids,
            ignore_eos,
            logprobs: None,
            prompt_logprobs: None,
            response_format,
            grammar: None,
        },
        logprobs: None,
    })
}

/// OpenAI's `response_format`: `{"type": "text"}`, `{"type": "json_object"}`, or
/// `{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}`.
/// The schema itself is compiled (and refused if it cannot be) by the engine's input processor.
fn response_format(v: Value) -> Result<ResponseFormat, ApiError> {
    const P: &str = "response_format";
    let Value::Object(mut o) = v else {
        return Err(wrong_type(P, "an object", &v));
    };
    let kind = match o.remove("type") {
        Some(Value::String(t)) => t,
        Some(other) => return Err(wrong_type("response_format.type", "a string", &other).with_param(P)),
        None => return Err(ApiError::invalid_param(P, "'response_format' needs a 'type': text, json_object or json_schema")),
    };
    let format = match kind.as_str() {
        "text" => ResponseFormat::Text,
        "json_object" => ResponseFormat::JsonObject,
        "json_schema" => {
            let spec = match o.remove("json_schema") {
                Some(Value::Object(spec)) => spec,
                Some(other) => return Err(wrong_type("response_format.json_schema", "an object", &other).with_param(P)),
                None => return Err(ApiError::invalid_param(P, "'response_format' of type json_schema needs 'json_schema'")),
            };
            let mut spec = Fields { map: spec };
            let name = spec.string("name").map_err(|e| e.with_param(P))?;
            if !name.as_deref().is_some_and(|n| (1..=64).contains(&n.len()) && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')) {
                return Err(ApiError::invalid_param(P, "'json_schema.name' must be 1 to 64 letters, digits, '_' or '-'"));
            }
            spec.string("description").map_err(|e| e.with_param(P))?;
            // Strict or not, the schema is enforced: every output is valid against it.
            spec.bool("strict").map_err(|e| e.with_param(P))?;
            let schema = spec.take("schema").unwrap_or_else(|| json!({}));
            if let Some(k) = spec.map.keys().next() {
                return Err(ApiError::invalid_param(P, format!("unknown field 'json_schema.{k}'")));
            }
            ResponseFormat::JsonSchema(schema)
        }
        other => {
            return Err(ApiError::unsupported(P, format!("response_format type '{other}' is not supported (text, json_object, json_schema)")))
        }
    };
    if let Some(k) = o.keys().next() {
        return Err(ApiError::invalid_param(P, format!("unknown field 'response_format.{k}' for type '{kind}'")));
    }
    Ok(format)
}

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

fn parse_messages(v: Value) -> Result<Vec<ChatMessage>, ApiError> {
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
            "system" | "user" | "assistant" => role,
            "developer" => "system".to_string(),
            "tool" | "function" => {
                return Err(ApiError::unsupported(&format!("messages[{i}].role"), "tool messages are not supported (no tool calling)"))
            }
            other => {
                return Err(ApiError::invalid_param(
                    &format!("messages[{i}].role"),
                    format!("unknown role '{other}' (expected system, developer, user or assistant)"),
                ))
            }
        };
        if !m.contains_key("content") && role != "assistant" {
            return Err(ApiError::invalid_param(&format!("messages[{i}].content"), format!("messages[{i}] has no 'content'")));
        }
        let content = message_content(i, m.remove("content").unwrap_or(Value::Null))?;
        m.remove("name");
        for (k, v) in m {
            let neutral = v.is_null() || is_empty_collection(&v);
            if !neutral {
                return Err(ApiError::unsupported(&format!("messages[{i}].{k}"), format!("message field '{k}' is not supported")));
            }
        }
        out.push(ChatMessage { role, content });
    }
    Ok(out)
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
        Some(t) if !(0..=20).contains(&t) => {
            return Err(ApiError::invalid_param("top_logprobs", format!("'top_logprobs' must be between 0 and 20, got {t}")))
        }
        Some(t) => Some(t as usize),
    };
    if top.is_some_and(|t| t > 0) && !logprobs {
        return Err(ApiError::invalid_param("top_logprobs", "'top_logprobs' needs 'logprobs': true"));
    }
    req.logprobs = logprobs.then(|| top.unwrap_or(0));
    f.unsupported_unless("tools", is_empty_collection, "tool calling is not implemented")?;
    f.unsupported_unless("functions", is_empty_collection, "function calling is not implemented")?;
    f.unsupported_unless("tool_choice", |v| v.as_str() == Some("none") || v.as_str() == Some("auto"), "tool calling is not implemented")?;
    f.unsupported_unless("function_call", |v| v.as_str() == Some("none") || v.as_str() == Some("auto"), "function calling is not implemented")?;
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
    f.ignore(&["parallel_tool_calls", "reasoning_effort", "verbosity", "prompt_cache_key", "safety_identifier"]);
    f.finish()?;
    req.prompts = vec![Prompt::Chat(messages)];
    req.params.logprobs = req.logprobs;
    Ok(req)
}

fn token_list(param: &str, a: &[Value]) -> Result<Vec<u32>, ApiError> {
    a.iter()
        .enumerate()
        .map(|(i, v)| v.as_u64().filter(|&x| x <= u32::MAX as u64).map(|x| x as u32).ok_or_else(|| wrong_type(&format!("{param}[{i}]"), "a token id", v)))
        .collect()
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
        Some(l) if !(0..=20).contains(&l) => return Err(ApiError::invalid_param("logprobs", format!("'logprobs' must be between 0 and 20, got {l}"))),
        Some(l) => Some(l as usize),
    };
    f.unsupported_unless("echo", |v| v == &Value::Bool(false), "echo is not implemented")?;
    f.unsupported_unless("suffix", |v| v.as_str() == Some(""), "suffix (insertion) is not implemented")?;
    f.finish()?;
    req.prompts = prompts;
    req.params.logprobs = req.logprobs;
    Ok(req)
}

#[cfg(test)]
mod tests {
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
        assert_eq!(err(parse_chat(with(r#""frequency_penalty":0.5"#).as_bytes(), 100)).code, Some("unsupported_parameter"));
        assert_eq!(err(parse_chat(with(r#""tools":[{"type":"function"}]"#).as_bytes(), 100)).param.as_deref(), Some("tools"));
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
        assert_eq!(err(parse_completion(br#"{"prompt":"x","echo":true}"#, 100)).param.as_deref(), Some("echo"));
        assert_eq!(err(parse_completion(br#"{"prompt":"x","logprobs":21}"#, 100)).param.as_deref(), Some("logprobs"));
    }
}
