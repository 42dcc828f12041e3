//! The sampling controls both APIs take beyond temperature and top-p/k: OpenAI's penalties and
//! `logit_bias`, vLLM's `repetition_penalty`, `min_p`, `min_tokens`, `bad_words` and
//! `allowed_token_ids`. The ranges vLLM refuses are 400s naming the parameter here; the engine
//! checks them again, with the vocabulary, so a client of the engine alone is held to the same.

use loramux_engine::sampling::processors::{MAX_BIAS, MAX_LOGIT_BIAS};
use loramux_engine::SamplingParams;
use serde_json::Value;

use super::fields::{token_list, wrong_type, Fields};
use crate::error::ApiError;

/// Reads every control into `params`.
pub(super) fn controls(f: &mut Fields, params: &mut SamplingParams) -> Result<(), ApiError> {
    params.presence_penalty = ranged(f, "presence_penalty", 0.0, |v| (-2.0..=2.0).contains(&v), "between -2 and 2")?;
    params.frequency_penalty = ranged(f, "frequency_penalty", 0.0, |v| (-2.0..=2.0).contains(&v), "between -2 and 2")?;
    params.repetition_penalty = ranged(f, "repetition_penalty", 1.0, |v| v > 0.0 && v <= 2.0, "in (0, 2]")?;
    params.min_p = ranged(f, "min_p", 0.0, |v| (0.0..=1.0).contains(&v), "between 0 and 1")?;
    params.min_tokens = match f.int("min_tokens")? {
        None => 0,
        Some(m) if m < 0 => return Err(ApiError::invalid_param("min_tokens", format!("'min_tokens' must be at least 0, got {m}"))),
        Some(m) if params.max_tokens.is_some_and(|max| m as u64 > max as u64) => {
            return Err(ApiError::invalid_param("min_tokens", format!("'min_tokens' ({m}) must be at most 'max_tokens' ({})", params.max_tokens.unwrap_or(0))))
        }
        Some(m) => m as usize,
    };
    params.logit_bias = logit_bias(f)?;
    params.bad_words = match f.take("bad_words") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(a)) => a
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s),
                other => Err(wrong_type(&format!("bad_words[{i}]"), "a string", &other)),
            })
            .collect::<Result<_, _>>()?,
        Some(v) => return Err(wrong_type("bad_words", "an array of strings", &v)),
    };
    params.allowed_token_ids = match f.take("allowed_token_ids") {
        None => None,
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(ApiError::invalid_param("allowed_token_ids", "'allowed_token_ids' must hold at least one token id"))
        }
        Some(Value::Array(a)) => Some(token_list("allowed_token_ids", &a)?),
        Some(v) => return Err(wrong_type("allowed_token_ids", "an array of token ids", &v)),
    };
    Ok(())
}

/// A float field in a range, `default` when absent.
fn ranged(f: &mut Fields, k: &str, default: f32, ok: impl Fn(f64) -> bool, range: &str) -> Result<f32, ApiError> {
    match f.float(k)? {
        None => Ok(default),
        Some(v) if ok(v) => Ok(v as f32),
        Some(v) => Err(ApiError::invalid_param(k, format!("'{k}' must be {range}, got {v}"))),
    }
}

/// OpenAI's `logit_bias`: `{"<token id>": bias}`, biases from -100 to 100, at most 300.
fn logit_bias(f: &mut Fields) -> Result<Vec<(u32, f32)>, ApiError> {
    const P: &str = "logit_bias";
    let map = match f.take(P) {
        None => return Ok(Vec::new()),
        Some(Value::Object(m)) => m,
        Some(v) => return Err(wrong_type(P, "an object of token ids to biases", &v)),
    };
    if map.len() > MAX_LOGIT_BIAS {
        return Err(ApiError::invalid_param(P, format!("'logit_bias' may hold at most {MAX_LOGIT_BIAS} entries, got {}", map.len())));
    }
    let mut out = Vec::with_capacity(map.len());
    for (k, v) in map {
        let id: u32 = k.trim().parse().map_err(|_| ApiError::invalid_param(P, format!("'logit_bias' keys must be token ids, got {k:?}")))?;
        let bias = match v.as_f64() {
            Some(b) if (-(MAX_BIAS as f64)..=MAX_BIAS as f64).contains(&b) => b as f32,
            Some(b) => return Err(ApiError::invalid_param(P, format!("'logit_bias' values must be between -100 and 100, got {b} for token {id}"))),
            None => return Err(wrong_type(&format!("logit_bias.{k}"), "a number", &v).with_param(P)),
        };
        out.push((id, bias));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(body: &str) -> Result<SamplingParams, ApiError> {
        let mut f = Fields::parse(body.as_bytes())?;
        let mut p = SamplingParams::greedy(10);
        controls(&mut f, &mut p)?;
        f.finish()?;
        Ok(p)
    }

    #[test]
    fn controls_parse_and_refuse_by_name() {
        let p = read(r#"{"presence_penalty":0.5,"frequency_penalty":-1,"repetition_penalty":1.2,"min_p":0.1,"min_tokens":3,"logit_bias":{"5":100,"7":-2.5},"bad_words":["x"],"allowed_token_ids":[1,2]}"#).unwrap();
        assert_eq!((p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_p, p.min_tokens), (0.5, -1.0, 1.2, 0.1, 3));
        let mut bias = p.logit_bias.clone();
        bias.sort_by_key(|b| b.0);
        assert_eq!(bias, vec![(5, 100.0), (7, -2.5)]);
        assert_eq!((p.bad_words, p.allowed_token_ids), (vec!["x".to_string()], Some(vec![1, 2])));
        for (body, param) in [
            (r#"{"presence_penalty":2.1}"#, "presence_penalty"),
            (r#"{"frequency_penalty":-2.5}"#, "frequency_penalty"),
            (r#"{"repetition_penalty":0}"#, "repetition_penalty"),
            (r#"{"repetition_penalty":"x"}"#, "repetition_penalty"),
            (r#"{"min_p":1.5}"#, "min_p"),
            (r#"{"min_tokens":-1}"#, "min_tokens"),
            (r#"{"min_tokens":11}"#, "min_tokens"),
            (r#"{"logit_bias":{"5":101}}"#, "logit_bias"),
            (r#"{"logit_bias":{"a":1}}"#, "logit_bias"),
            (r#"{"logit_bias":{"5":"1"}}"#, "logit_bias"),
            (r#"{"logit_bias":[1]}"#, "logit_bias"),
            (r#"{"bad_words":[1]}"#, "bad_words[0]"),
            (r#"{"allowed_token_ids":[]}"#, "allowed_token_ids"),
            (r#"{"allowed_token_ids":[-1]}"#, "allowed_token_ids[0]"),
        ] {
            assert_eq!(read(body).expect_err(body).param.as_deref(), Some(param), "{body}");
        }
        let many: String = (0..301).map(|i| format!("\"{i}\":1")).collect::<Vec<_>>().join(",");
        assert_eq!(read(&format!(r#"{{"logit_bias":{{{many}}}}}"#)).unwrap_err().param.as_deref(), Some("logit_bias"));
    }
}
