//! [`Fields`], a JSON object read field by field with typed getters and precise errors,
//! and the small value checks both request kinds use.

use serde_json::{Map, Value};

use crate::error::ApiError;

/// A JSON object whose fields are taken one by one; leftovers are unknown parameters.
pub(crate) struct Fields {
    pub(super) map: Map<String, Value>,
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

pub(super) fn wrong_type(param: &str, expected: &str, v: &Value) -> ApiError {
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

pub(super) fn is_empty_collection(v: &Value) -> bool {
    match v {
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// A list of token ids; `param` names the list in the error.
pub(super) fn token_list(param: &str, a: &[Value]) -> Result<Vec<u32>, ApiError> {
    a.iter()
        .enumerate()
        .map(|(i, v)| v.as_u64().filter(|&x| x <= u32::MAX as u64).map(|x| x as u32).ok_or_else(|| wrong_type(&format!("{param}[{i}]"), "a token id", v)))
        .collect()
}
