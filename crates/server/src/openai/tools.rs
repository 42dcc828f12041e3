//! Tool calling on chat: `tools`, `tool_choice` and `parallel_tool_calls` read and checked;
//! the prompt made ready for the model's template (tools in its context when it reads them,
//! else a Hermes-style system prompt, as vLLM documents); the grammar that forces a call for
//! `required` or a named function; and the calls parsed out of the generated text.

use loramux_engine::ChatMessage;
use rand::Rng;
use serde_json::{json, Value};

use super::fields::{wrong_type, Fields};
use crate::error::ApiError;
use crate::protocol::{FunctionCall, ToolCall};

/// What the request lets the model do with its tools.
#[derive(Clone, Debug, PartialEq)]
pub enum ToolChoice {
    /// The model answers in text or calls tools, as it chooses.
    Auto,
    /// The model must call one of the tools.
    Required,
    /// The model must call this tool.
    Named(String),
}

/// A request's tools, checked.
#[derive(Clone, Debug)]
pub struct Tools {
    /// The tools as sent, `{"type": "function", "function": {...}}`: templates read this shape.
    pub defs: Vec<Value>,
    pub choice: ToolChoice,
    /// Whether the template reads `tools` itself (set once the model's template is known).
    pub in_template: bool,
    /// `parallel_tool_calls` (default true): `false` keeps only the first call parsed.
    pub parallel: bool,
}

fn name_of(def: &Value) -> &str {
    def["function"]["name"].as_str().unwrap_or_default()
}

/// One tool definition: a function with a name and, if any, a `parameters` object.
fn check_tool(i: usize, t: &Value) -> Result<(), ApiError> {
    let p = format!("tools[{i}]");
    if !t.is_object() {
        return Err(wrong_type(&p, "an object", t));
    }
    if t.get("type").and_then(Value::as_str) != Some("function") {
        return Err(ApiError::invalid_param(&format!("{p}.type"), "only tools of type 'function' are supported"));
    }
    let Some(f) = t.get("function").filter(|f| f.is_object()) else {
        return Err(ApiError::invalid_param(&format!("{p}.function"), "a tool needs a 'function' object"));
    };
    if f.get("name").and_then(Value::as_str).is_none_or(str::is_empty) {
        return Err(ApiError::invalid_param(&format!("{p}.function.name"), "a function needs a non-empty string 'name'"));
    }
    match f.get("parameters") {
        None | Some(Value::Object(_)) => Ok(()),
        Some(other) => Err(wrong_type(&format!("{p}.function.parameters"), "a JSON schema object", other)),
    }
}

/// `tool_choice` against the tools; `None` for `"none"` (the tools are then left out).
fn choice(v: Option<Value>, defs: &[Value]) -> Result<Option<ToolChoice>, ApiError> {
    const P: &str = "tool_choice";
    let named = |v: &Value| v.get("type").and_then(Value::as_str) == Some("function");
    match v {
        None | Some(Value::Null) => Ok(Some(ToolChoice::Auto)),
        Some(Value::String(s)) => match s.as_str() {
            "none" => Ok(None),
            "auto" => Ok(Some(ToolChoice::Auto)),
            "required" => Ok(Some(ToolChoice::Required)),
            other => Err(ApiError::invalid_param(P, format!("unknown tool_choice '{other}' (none, auto, required, or a function)"))),
        },
        Some(v) if named(&v) => {
            let Some(name) = v["function"]["name"].as_str() else {
                return Err(ApiError::invalid_param(P, "a named tool_choice needs 'function': {\"name\": ...}"));
            };
            if !defs.iter().any(|d| name_of(d) == name) {
                return Err(ApiError::invalid_param(P, format!("tool_choice names '{name}', which is not among 'tools'")));
            }
            Ok(Some(ToolChoice::Named(name.to_string())))
        }
        Some(other) => Err(wrong_type(P, "'none', 'auto', 'required' or {\"type\": \"function\", ...}", &other)),
    }
}

/// `tools`, `tool_choice` and `parallel_tool_calls` of a `/tokenize` request, read and
/// checked as chat reads them, so the count matches what generation would prefill.
pub(crate) fn from_tokenize_request(v: &Value) -> Result<Option<Tools>, ApiError> {
    let mut fields = serde_json::Map::new();
    for key in ["tools", "tool_choice", "parallel_tool_calls"] {
        if let Some(x) = v.get(key) {
            fields.insert(key.into(), x.clone());
        }
    }
    let mut f = Fields::parse(&serde_json::to_vec(&Value::Object(fields)).unwrap_or_default())?;
    let tools = parse_tools(&mut f)?;
    f.finish()?;
    Ok(tools)
}

/// Reads `tools`, `tool_choice` and `parallel_tool_calls`; `None` when the model may not call
/// tools (no tools, or `tool_choice: "none"`).
pub(super) fn parse_tools(f: &mut Fields) -> Result<Option<Tools>, ApiError> {
    let defs = match f.take("tools") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a,
        Some(other) => return Err(wrong_type("tools", "an array of tools", &other)),
    };
    for (i, t) in defs.iter().enumerate() {
        check_tool(i, t)?;
    }
    // Several calls may be parsed from free text; a forced call is always one (README).
    let parallel = f.bool("parallel_tool_calls")?.unwrap_or(true);
    let choice_v = f.take("tool_choice");
    if defs.is_empty() {
        let neutral = matches!(choice_v.as_ref().and_then(Value::as_str), None | Some("none" | "auto"));
        return match choice_v {
            Some(v) if !v.is_null() && !neutral => Err(ApiError::invalid_param("tool_choice", "'tool_choice' needs 'tools'")),
            _ => Ok(None),
        };
    }
    Ok(choice(choice_v, &defs)?.map(|choice| Tools { defs, choice, in_template: false, parallel }))
}

/// The schema of one forced call: `{"name": <the tool>, "arguments": <its parameters>}`.
fn call_schema(def: &Value) -> Value {
    let params = def["function"].get("parameters").cloned().unwrap_or_else(|| json!({"type": "object"}));
    json!({
        "type": "object",
        "properties": {"name": {"const": name_of(def)}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": false,
    })
}

impl Tools {
    /// The JSON schema generation must follow: one call of the named tool, or of any tool
    /// for `required`; `None` for `auto`.
    pub fn forced_schema(&self) -> Option<Value> {
        match &self.choice {
            ToolChoice::Auto => None,
            ToolChoice::Named(n) => self.defs.iter().find(|d| name_of(d) == n).map(call_schema),
            ToolChoice::Required => Some(self.any_call_schema()),
        }
    }

    /// The schema any call must follow: what `required` forces, and what `auto` checks the
    /// tools' `parameters` against before generating.
    pub fn any_call_schema(&self) -> Value {
        match self.defs.as_slice() {
            [one] => call_schema(one),
            many => json!({"anyOf": many.iter().map(call_schema).collect::<Vec<_>>()}),
        }
    }

    /// The definitions for the template's context, when it reads them.
    pub fn template_tools(&self) -> Option<&[Value]> {
        self.in_template.then_some(self.defs.as_slice())
    }

    /// The tool calls in a choice's text, and the text left around them; `None` when the
    /// text holds no call of a known tool (a plain answer).
    pub fn extract(&self, text: &str) -> Option<(Option<String>, Vec<ToolCall>)> {
        let known = |c: &(String, Value)| self.defs.iter().any(|d| name_of(d) == c.0);
        let (rest, mut calls) = tagged_calls(text).or_else(|| bare_call(text).map(|c| (String::new(), vec![c])))?;
        if !self.parallel {
            calls.truncate(1);
        }
        if calls.is_empty() || !calls.iter().all(known) {
            return None;
        }
        let content = Some(rest.trim().to_string()).filter(|s| !s.is_empty());
        Some((content, calls.into_iter().map(|(name, args)| tool_call(name, &args)).collect()))
    }
}

/// A streamed choice's text while the model may call tools: content passes through until a
/// call may have begun (a `<tool_call>` tag, or an answer that opens with `{`), and the rest is
/// held to be parsed once the choice is done.
#[derive(Default)]
pub struct CallHold {
    text: String,
    sent: usize,
    holding: bool,
}

const TAG: &str = "<tool_call>";

impl CallHold {
    /// Takes a delta; returns the content that may be sent now.
    pub fn push(&mut self, delta: &str) -> String {
        self.text.push_str(delta);
        if self.holding {
            return String::new();
        }
        let unsent = &self.text[self.sent..];
        let (out, hold) = if let Some(at) = unsent.find(TAG) {
            (&unsent[..at], true)
        } else if self.text.trim_start().starts_with('{') {
            ("", true)
        } else {
            // A tag may be split across deltas: keep back what could be its beginning.
            let keep = (1..TAG.len()).rev().find(|&k| unsent.ends_with(&TAG[..k])).unwrap_or(0);
            (&unsent[..unsent.len() - keep], false)
        };
        let out = out.to_string();
        self.sent += out.len();
        self.holding = hold;
        out
    }

    /// Once the choice is done: the content still to send, and the calls in the held text
    /// (none when it parses as no call: it is then content too).
    pub fn finish(&self, tools: &Tools) -> (Option<String>, Vec<ToolCall>) {
        let held = &self.text[self.sent..];
        match tools.extract(held) {
            Some((content, calls)) => (content, calls),
            None => (Some(held.to_string()).filter(|s| !s.is_empty()), Vec::new()),
        }
    }
}

/// A returned call, with a fresh `call_<random>` id and its arguments as a JSON string.
fn tool_call(name: String, arguments: &Value) -> ToolCall {
    let arguments = match arguments {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    let id = format!("call_{:016x}", rand::rng().random::<u64>());
    ToolCall { index: None, id, kind: "function".into(), function: FunctionCall { name, arguments } }
}

/// `{"name": ..., "arguments"|"parameters": ...}`, as Hermes, Qwen2.5 and Llama-3 write a call.
fn call_of(v: &Value) -> Option<(String, Value)> {
    let name = v.get("name")?.as_str()?.to_string();
    let args = v.get("arguments").or_else(|| v.get("parameters")).cloned().unwrap_or_else(|| json!({}));
    Some((name, args))
}

/// Calls in `<tool_call>...</tool_call>` tags (Hermes, Qwen2.5), and the text outside them;
/// `None` without tags or when a tagged call does not parse.
fn tagged_calls(text: &str) -> Option<(String, Vec<(String, Value)>)> {
    const OPEN: &str = "<tool_call>";
    const CLOSE: &str = "</tool_call>";
    let mut rest = String::new();
    let mut calls = Vec::new();
    let mut s = text;
    while let Some(start) = s.find(OPEN) {
        rest.push_str(&s[..start]);
        let after = &s[start + OPEN.len()..];
        // An unclosed last call (generation stopped on the end token) runs to the end.
        let (body, next) = match after.find(CLOSE) {
            Some(end) => (&after[..end], &after[end + CLOSE.len()..]),
            None => (after, ""),
        };
        calls.push(call_of(&serde_json::from_str(body.trim()).ok()?)?);
        s = next;
    }
    rest.push_str(s);
    (!calls.is_empty()).then_some((rest, calls))
}

/// The whole text as one JSON call (Llama-3's style, and forced calls' grammar).
fn bare_call(text: &str) -> Option<(String, Value)> {
    call_of(&serde_json::from_str::<Value>(text.trim()).ok()?)
}

/// vLLM's Hermes tool prompt, for templates that do not read `tools`.
fn hermes_prompt(defs: &[Value]) -> String {
    let tools: Vec<String> = defs.iter().map(Value::to_string).collect();
    format!(
        "You are a function calling AI model. You are provided with function signatures within <tools></tools> XML tags. \
         You may call one or more functions to assist with the user query. Don't make assumptions about what values to \
         plug into functions. Here are the available tools: <tools>\n{}\n</tools>\nFor each function call return a json \
         object with function name and arguments within <tool_call></tool_call> XML tags as follows:\n<tool_call>\n\
         {{\"name\": <function-name>, \"arguments\": <args-dict>}}\n</tool_call>",
        tools.join("\n")
    )
}

/// Readies the messages for a template: when it reads tools itself, history's tool fields
/// are passed as they are (`arguments` strings parsed to objects, as transformers expects);
/// otherwise calls become `<tool_call>` text, tool results `<tool_response>` user turns,
/// and the tools a Hermes system prompt.
pub(crate) fn prepare(messages: &mut Vec<ChatMessage>, tools: Option<&mut Tools>, native: bool) {
    if let Some(t) = tools {
        t.in_template = native;
        if !native {
            let prompt = hermes_prompt(&t.defs);
            match messages.first_mut().filter(|m| m.role == "system") {
                Some(m) => m.content = format!("{}\n\n{prompt}", m.content),
                None => messages.insert(0, ChatMessage::new("system", prompt)),
            }
        }
    }
    for m in messages.iter_mut() {
        for c in m.tool_calls.iter_mut().flatten() {
            if let Some(Value::String(s)) = c.pointer("/function/arguments") {
                if let Ok(v) = serde_json::from_str::<Value>(s) {
                    c["function"]["arguments"] = v;
                }
            }
        }
        if native {
            continue;
        }
        if let Some(calls) = m.tool_calls.take() {
            for c in calls {
                let call = json!({"name": c["function"]["name"], "arguments": c["function"]["arguments"]});
                m.content.push_str(&format!("\n<tool_call>\n{call}\n</tool_call>"));
            }
            m.content = m.content.trim_start().to_string();
        }
        if m.role == "tool" {
            m.role = "user".into();
            m.content = format!("<tool_response>\n{}\n</tool_response>", m.content);
            m.tool_call_id = None;
        }
    }
}

/// An assistant message's `tool_calls` from the history, checked.
pub(super) fn history_calls(i: usize, v: Value) -> Result<Vec<Value>, ApiError> {
    let p = format!("messages[{i}].tool_calls");
    let Value::Array(calls) = v else { return Err(wrong_type(&p, "an array of tool calls", &v)) };
    for (j, c) in calls.iter().enumerate() {
        let f = c.get("function").and_then(Value::as_object);
        let ok = f.is_some_and(|f| f.get("name").is_some_and(Value::is_string));
        if !ok {
            return Err(ApiError::invalid_param(&format!("{p}[{j}].function"), "a tool call needs 'function' with a string 'name'"));
        }
    }
    Ok(calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools(choice: &str) -> Result<Option<Tools>, ApiError> {
        let body = format!(
            r#"{{"tools":[{{"type":"function","function":{{"name":"get_weather","parameters":{{"type":"object","properties":{{"city":{{"type":"string"}}}}}}}}}}],"tool_choice":{choice}}}"#
        );
        let mut f = Fields::parse(body.as_bytes()).unwrap();
        parse_tools(&mut f)
    }

    #[test]
    fn choices_parse_and_bad_ones_name_the_field() {
        assert!(tools(r#""none""#).unwrap().is_none());
        assert_eq!(tools(r#""auto""#).unwrap().unwrap().choice, ToolChoice::Auto);
        let t = tools(r#"{"type":"function","function":{"name":"get_weather"}}"#).unwrap().unwrap();
        assert_eq!(t.choice, ToolChoice::Named("get_weather".into()));
        assert_eq!(t.forced_schema().unwrap()["properties"]["name"]["const"], "get_weather");
        let e = tools(r#"{"type":"function","function":{"name":"nope"}}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tool_choice"));
        let mut f = Fields::parse(br#"{"tools":[{"type":"code"}]}"#).unwrap();
        assert_eq!(parse_tools(&mut f).unwrap_err().param.as_deref(), Some("tools[0].type"));
        let mut f = Fields::parse(br#"{"tools":[{"type":"function","function":{"name":"a","parameters":3}}]}"#).unwrap();
        assert_eq!(parse_tools(&mut f).unwrap_err().param.as_deref(), Some("tools[0].function.parameters"));
    }

    #[test]
    fn calls_parse_from_hermes_tags_and_bare_json() {
        let t = tools(r#""auto""#).unwrap().unwrap();
        let text = "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        let (content, calls) = t.extract(text).unwrap();
        assert_eq!(content.as_deref(), Some("Let me look."));
        assert_eq!(calls[0].function.name, "get_weather");
        assert_eq!(calls[0].function.arguments, r#"{"city":"Paris"}"#);
        let (content, calls) = t.extract(r#"{"name": "get_weather", "parameters": {"city": "Oslo"}}"#).unwrap();
        assert!(content.is_none() && calls.len() == 1);
        assert!(t.extract("It is sunny.").is_none());
        let two = format!("{text}<tool_call>{{\"name\": \"get_weather\", \"arguments\": {{}}}}</tool_call>");
        assert_eq!(t.extract(&two).unwrap().1.len(), 2);
        let one = Tools { parallel: false, ..t.clone() };
        assert_eq!(one.extract(&two).unwrap().1.len(), 1, "parallel_tool_calls: false keeps the first");
        assert!(t.extract(r#"{"name": "other", "arguments": {}}"#).is_none(), "unknown tools are text");
        let mut messages = vec![ChatMessage::user("hi")];
        let mut t = t;
        prepare(&mut messages, Some(&mut t), false);
        // Streamed: text before a tag passes, a tag split across deltas is held, the call parsed.
        let mut hold = CallHold::default();
        let sent: String = ["Sure. <tool", "_call>\n{\"name\": \"get_weather\", ", "\"arguments\": {}}\n</tool_call>"].iter().map(|d| hold.push(d)).collect();
        assert_eq!(sent, "Sure. ");
        let (rest, calls) = hold.finish(&t);
        assert!(rest.is_none() && calls[0].function.name == "get_weather");
        let mut hold = CallHold::default();
        assert_eq!(hold.push("It is <b>") + &hold.push("sunny"), "It is <b>sunny");
        assert_eq!(hold.finish(&t), (None, Vec::new()));
        assert!(messages[0].role == "system" && messages[0].content.contains("get_weather"));
    }
}
