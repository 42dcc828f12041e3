//! An adapter's routing data: `routing.json` in its folder, or `NAME.routing.json` beside
//! `NAME.gguf`, or the `"routing"` object of a runtime load:
//! `{"description": "...", "examples": ["a prompt this adapter is for", ...]}`.
//! Parsed strictly: unknown fields, a wrong type, no examples, more than [`MAX_EXAMPLES`],
//! an empty example or one over [`MAX_EXAMPLE_CHARS`] characters are errors that name the
//! file (or request field) and the field.

use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Most examples one adapter may carry.
pub const MAX_EXAMPLES: usize = 64;
/// Longest example, in characters.
pub const MAX_EXAMPLE_CHARS: usize = 2000;

/// What an adapter is for, as prompts the router compares requests with.
#[derive(Clone, Debug, PartialEq)]
pub struct RoutingSpec {
    pub description: Option<String>,
    pub examples: Vec<String>,
}

/// A refused routing file or object: where, which field, why.
#[derive(Clone, Debug, PartialEq)]
pub struct RoutingError {
    /// The file's path, or the request field (`routing`).
    pub source: String,
    /// The field at fault (`examples[3]`), or empty for the whole document.
    pub field: String,
    pub message: String,
}

impl fmt::Display for RoutingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.source, self.message)
        } else {
            write!(f, "{}: field '{}': {}", self.source, self.field, self.message)
        }
    }
}

impl std::error::Error for RoutingError {}

/// Parses routing JSON text read from `source` (a path, for the messages).
pub fn parse_routing(text: &[u8], source: &str) -> Result<RoutingSpec, RoutingError> {
    let v: Value = serde_json::from_slice(text).map_err(|e| RoutingError {
        source: source.to_string(),
        field: String::new(),
        message: format!("invalid JSON: {e}"),
    })?;
    parse_routing_value(&v, source)
}

/// Checks an already parsed routing object; `source` names where it came from.
pub fn parse_routing_value(v: &Value, source: &str) -> Result<RoutingSpec, RoutingError> {
    let err = |field: &str, message: String| RoutingError { source: source.to_string(), field: field.to_string(), message };
    let obj = v.as_object().ok_or_else(|| err("", "expected a JSON object with \"examples\" (and optionally \"description\")".into()))?;
    if let Some(k) = obj.keys().find(|k| !matches!(k.as_str(), "description" | "examples")) {
        return Err(err(k, "unknown field (expected \"description\" and \"examples\")".into()));
    }
    let description = match obj.get("description") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(err("description", "must be a string".into())),
    };
    let examples = match obj.get("examples") {
        None | Some(Value::Null) => return Err(err("examples", "missing: at least one example prompt is required".into())),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(err("examples", "must be an array of strings".into())),
    };
    if examples.is_empty() {
        return Err(err("examples", "no examples: at least one example prompt is required".into()));
    }
    if examples.len() > MAX_EXAMPLES {
        return Err(err("examples", format!("{} examples, at most {MAX_EXAMPLES} are allowed", examples.len())));
    }
    let mut out = Vec::with_capacity(examples.len());
    for (i, e) in examples.iter().enumerate() {
        let field = format!("examples[{i}]");
        let s = e.as_str().ok_or_else(|| err(&field, "must be a string".into()))?;
        if s.trim().is_empty() {
            return Err(err(&field, "is empty".into()));
        }
        let chars = s.chars().count();
        if chars > MAX_EXAMPLE_CHARS {
            return Err(err(&field, format!("{chars} characters, at most {MAX_EXAMPLE_CHARS} are allowed")));
        }
        out.push(s.to_string());
    }
    Ok(RoutingSpec { description, examples: out })
}

/// Where an adapter's routing file would be: `DIR/routing.json` for a folder adapter,
/// `DIR/NAME.routing.json` for `DIR/NAME.gguf`.
pub fn routing_file_for(adapter_path: &Path) -> PathBuf {
    if adapter_path.is_dir() {
        adapter_path.join("routing.json")
    } else {
        let stem = adapter_path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        adapter_path.with_file_name(format!("{stem}.routing.json"))
    }
}

/// The adapter's routing data, if it has a routing file; a file that is there but bad is
/// an error naming it.
pub fn read_routing_file(adapter_path: &Path) -> Result<Option<RoutingSpec>, RoutingError> {
    let file = routing_file_for(adapter_path);
    if !file.exists() {
        return Ok(None);
    }
    let source = file.display().to_string();
    let text = std::fs::read(&file).map_err(|e| RoutingError { source: source.clone(), field: String::new(), message: format!("cannot read: {e}") })?;
    parse_routing(&text, &source).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<RoutingSpec, RoutingError> {
        parse_routing(s.as_bytes(), "x/routing.json")
    }

    #[test]
    fn good_file() {
        let r = parse(r#"{"description": "SQL", "examples": ["a", "b"]}"#).unwrap();
        assert_eq!(r.description.as_deref(), Some("SQL"));
        assert_eq!(r.examples, ["a", "b"]);
        assert!(parse(r#"{"examples": ["a"]}"#).unwrap().description.is_none());
    }

    #[test]
    fn errors_name_file_and_field() {
        let e = parse("{not json").unwrap_err();
        assert!(e.to_string().contains("x/routing.json") && e.message.contains("invalid JSON"), "{e}");
        let e = parse(r#"{"description": "d"}"#).unwrap_err();
        assert_eq!(e.field, "examples");
        let e = parse(r#"{"examples": []}"#).unwrap_err();
        assert_eq!(e.field, "examples");
        assert!(e.message.contains("no examples"));
        let many: Vec<String> = (0..65).map(|i| format!("\"p{i}\"")).collect();
        let e = parse(&format!(r#"{{"examples": [{}]}}"#, many.join(","))).unwrap_err();
        assert_eq!(e.field, "examples");
        assert!(e.message.contains("at most 64"), "{e}");
        let long = "x".repeat(2001);
        let e = parse(&format!(r#"{{"examples": ["ok", "{long}"]}}"#)).unwrap_err();
        assert_eq!(e.field, "examples[1]");
        assert!(e.to_string().contains("x/routing.json: field 'examples[1]': 2001 characters"), "{e}");
        assert!(parse(&format!(r#"{{"examples": ["{}"]}}"#, "x".repeat(2000))).is_ok());
        assert_eq!(parse(r#"{"examples": ["a", 3]}"#).unwrap_err().field, "examples[1]");
        assert_eq!(parse(r#"{"examples": ["a", "  "]}"#).unwrap_err().field, "examples[1]");
        assert_eq!(parse(r#"{"examples": "a"}"#).unwrap_err().field, "examples");
        assert_eq!(parse(r#"{"examples": ["a"], "description": 1}"#).unwrap_err().field, "description");
        assert_eq!(parse(r#"{"examples": ["a"], "exampels": []}"#).unwrap_err().field, "exampels");
        assert_eq!(parse(r#"["a"]"#).unwrap_err().field, "");
    }

    #[test]
    fn file_locations() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("sql");
        std::fs::create_dir(&dir).unwrap();
        assert_eq!(routing_file_for(&dir), dir.join("routing.json"));
        assert!(read_routing_file(&dir).unwrap().is_none());
        std::fs::write(dir.join("routing.json"), r#"{"examples": ["q"]}"#).unwrap();
        assert_eq!(read_routing_file(&dir).unwrap().unwrap().examples, ["q"]);
        let gguf = t.path().join("date.gguf");
        std::fs::write(&gguf, b"").unwrap();
        assert_eq!(routing_file_for(&gguf), t.path().join("date.routing.json"));
        std::fs::write(t.path().join("date.routing.json"), r#"{"examples": []}"#).unwrap();
        let e = read_routing_file(&gguf).unwrap_err();
        assert!(e.source.ends_with("date.routing.json") && e.field == "examples", "{e}");
    }
}
