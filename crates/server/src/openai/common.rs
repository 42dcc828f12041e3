//! The fields both request kinds share, read in named steps: model, streaming options,
//! `n`, sampling (the controls in `controls.rs`), stop conditions, `max_tokens`,
//! `response_format`, and the known
//! parameters this server accepts only at their neutral value. The steps run in a fixed
//! order, so a request with several faults is always refused for the same one.

use loramux_engine::sampling::MAX_LOGPROBS;
use loramux_engine::{ResponseFormat, SamplingParams};
use serde_json::{json, Value};

use super::controls::controls;
use super::fields::{token_list, wrong_type, Fields};
use super::{Api, GenRequest};
use crate::config::defaults::MAX_N;
use crate::error::ApiError;

/// Fields both APIs share: model, streaming, sampling, stop, n.
pub(super) fn common(f: &mut Fields, api: Api, max_model_len: usize) -> Result<GenRequest, ApiError> {
    let model = f.string("model")?;
    let stream = f.bool("stream")?.unwrap_or(false);
    let (include_usage, continuous_usage) = stream_options(f, stream)?;
    let n = choices_per_prompt(f)?;
    let temperature = temperature(f)?;
    let top_p = top_p(f)?;
    let top_k = top_k(f)?;
    let seed = f.int("seed")?.map(|s| s as u64);
    let stop = stop_strings(f)?;
    let stop_token_ids = match f.take("stop_token_ids") {
        None => Vec::new(),
        Some(Value::Array(a)) => token_list("stop_token_ids", &a)?,
        Some(v) => return Err(wrong_type("stop_token_ids", "an array of token ids", &v)),
    };
    let ignore_eos = f.bool("ignore_eos")?.unwrap_or(false);
    let max_tokens = max_tokens(f, api, max_model_len)?;
    refuse_unimplemented(f)?;
    let response_format = match f.take("response_format") {
        None => ResponseFormat::Text,
        Some(v) => response_format(v)?,
    };
    // Accepted and without effect on generation.
    f.ignore(&["user", "metadata", "store", "service_tier", "request_id", "priority", "spaces_between_special_tokens"]);
    let mut req = GenRequest {
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
            prompt_logprobs: prompt_logprobs(f)?,
            response_format,
            ..SamplingParams::default()
        },
        logprobs: None,
        echo: false,
        prompt_logprobs: false,
        best_of: n,
        tools: None,
    };
    controls(f, &mut req.params)?;
    Ok(req)
}

/// `stream_options` (streamed requests only): `include_usage` and vLLM's
/// `continuous_usage_stats`, in that order.
fn stream_options(f: &mut Fields, stream: bool) -> Result<(bool, bool), ApiError> {
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
    Ok((include_usage, continuous_usage))
}

/// `n`: 1 to [`MAX_N`], default 1.
fn choices_per_prompt(f: &mut Fields) -> Result<usize, ApiError> {
    Ok(match f.int("n")? {
        None => 1,
        Some(n) if n < 1 => return Err(ApiError::invalid_param("n", format!("'n' must be at least 1, got {n}"))),
        Some(n) if n as usize > MAX_N => return Err(ApiError::invalid_param("n", format!("'n' must be at most {MAX_N}, got {n}"))),
        Some(n) => n as usize,
    })
}

fn temperature(f: &mut Fields) -> Result<f32, ApiError> {
    Ok(match f.float("temperature")? {
        None => 1.0,
        Some(t) if !(0.0..=100.0).contains(&t) => {
            return Err(ApiError::invalid_param("temperature", format!("'temperature' must be between 0 and 100, got {t}")))
        }
        Some(t) => t as f32,
    })
}

fn top_p(f: &mut Fields) -> Result<f32, ApiError> {
    Ok(match f.float("top_p")? {
        None => 1.0,
        Some(p) if !(p > 0.0 && p <= 1.0) => return Err(ApiError::invalid_param("top_p", format!("'top_p' must be in (0, 1], got {p}"))),
        Some(p) => p as f32,
    })
}

/// `top_k`: -1 and 0 both mean off (0 in engine terms).
fn top_k(f: &mut Fields) -> Result<usize, ApiError> {
    Ok(match f.int("top_k")? {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k < 0 => return Err(ApiError::invalid_param("top_k", format!("'top_k' must be -1 (off) or positive, got {k}"))),
        Some(k) => k as usize,
    })
}

/// `stop`: one string or a list of them.
fn stop_strings(f: &mut Fields) -> Result<Vec<String>, ApiError> {
    Ok(match f.take("stop") {
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
    })
}

/// `max_tokens` (chat's `max_completion_tokens` wins over it): at least 1 and shorter than
/// the context; `None` fills the context.
fn max_tokens(f: &mut Fields, api: Api, max_model_len: usize) -> Result<Option<usize>, ApiError> {
    let mut max_tokens = f.int("max_tokens")?.map(|m| ("max_tokens", m));
    if api == Api::Chat {
        if let Some(m) = f.int("max_completion_tokens")? {
            max_tokens = Some(("max_completion_tokens", m));
        }
    }
    Ok(match max_tokens {
        None => None,
        // 0 scores the prompt only: completions with `echo` (checked there).
        Some((k, m)) if m < 0 || (m == 0 && api == Api::Chat) => {
            return Err(ApiError::invalid_param(k, format!("'{k}' must be at least 1, got {m}")))
        }
        Some((k, m)) if m as u64 >= max_model_len as u64 => {
            return Err(ApiError::invalid_param(
                k,
                format!("'{k}' is {m}, but this model's maximum context length is {max_model_len} tokens (prompt plus completion)"),
            )
            .with_code("context_length_exceeded"))
        }
        Some((_, m)) => Some(m as usize),
    })
}

/// vLLM's `prompt_logprobs`: the prompt tokens' log-probabilities with this many top
/// alternatives each (0 to 20).
fn prompt_logprobs(f: &mut Fields) -> Result<Option<usize>, ApiError> {
    match f.int("prompt_logprobs")? {
        None => Ok(None),
        Some(n) if (0..=MAX_LOGPROBS as i64).contains(&n) => Ok(Some(n as usize)),
        Some(n) => Err(ApiError::invalid_param("prompt_logprobs", format!("'prompt_logprobs' must be between 0 and {MAX_LOGPROBS}, got {n}"))),
    }
}

/// Known parameters this server does not implement: accepted only at their neutral value.
fn refuse_unimplemented(f: &mut Fields) -> Result<(), ApiError> {
    f.unsupported_unless("use_beam_search", |v| v == &Value::Bool(false), "beam search is not implemented")?;
    f.unsupported_unless("skip_special_tokens", |v| v == &Value::Bool(true), "special tokens are always skipped")?;
    f.unsupported_unless("include_stop_str_in_output", |v| v == &Value::Bool(false), "stop strings are never included")?;
    f.unsupported_unless("guided_json", |_| false, "guided decoding is not implemented")?;
    f.unsupported_unless("guided_regex", |_| false, "guided decoding is not implemented")?;
    f.unsupported_unless("guided_choice", |_| false, "guided decoding is not implemented")?;
    f.unsupported_unless("guided_grammar", |_| false, "guided decoding is not implemented")?;
    Ok(())
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
