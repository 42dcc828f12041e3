//! Chat prompts rendered with the model's own Jinja template (minijinja), configured as
//! transformers renders them (`trim_blocks`, `lstrip_blocks`, Python string methods).

use minijinja::{context, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

/// One chat message. The tool fields are passed to the template as HF's
/// `apply_chat_template` passes them, and left out of its context when absent.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant turn's calls, `{"id", "type", "function": {"name", "arguments"}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// A `tool` turn's answer to this call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A plain message of `role`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into(), ..Self::default() }
    }

    /// A user turn.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
}

/// Template instructions one render may execute: SmolLM2's template uses ~23 per message and
/// Qwen2.5's ~32 (46,014 and 64,022 for 2,000 messages), so this renders some 30,000
/// messages, more than any context holds, while a runaway template stops within ~70 ms.
const TEMPLATE_FUEL: u64 = 1_000_000;

/// transformers' `tojson`: Python's `json.dumps` layout (", " and ": ", or `indent`), keys in
/// their order, non-ASCII and `<>&'` as they are (minijinja's own is compact and escapes
/// HTML), so tool definitions and calls render as the model saw them in training.
fn tojson(value: minijinja::Value, kwargs: minijinja::value::Kwargs) -> std::result::Result<String, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let v = serde_json::to_value(&value).map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = String::new();
    write_json(&v, indent, 0, &mut out);
    Ok(out)
}

fn write_json(v: &serde_json::Value, indent: Option<usize>, depth: usize, out: &mut String) {
    use serde_json::Value;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let sep = if indent.is_some() { "," } else { ", " };
    match v {
        Value::Object(m) if !m.is_empty() => {
            out.push('{');
            for (i, (k, x)) in m.iter().enumerate() {
                out.push_str(if i > 0 { sep } else { "" });
                newline(out, depth + 1);
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                write_json(x, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        Value::Array(a) if !a.is_empty() => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                out.push_str(if i > 0 { sep } else { "" });
                newline(out, depth + 1);
                write_json(x, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The template as written (vLLM's `/tokenizer_info` shows it).
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles a template; the special token strings are passed to it as transformers does.
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        // A template runs on every chat request: bound its work, so a hostile or broken one
        // (a template comes with the model file) is an error rather than a stalled request.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> std::result::Result<String, Error> {
            // An invalid specifier makes chrono's Display fail, which `to_string` turns into
            // a panic: write it out and answer a template error instead.
            use std::fmt::Write;
            let mut out = String::new();
            write!(out, "{}", chrono::Local::now().format(&fmt))
                .map_err(|_| Error::new(ErrorKind::InvalidOperation, format!("strftime_now: invalid format {fmt:?}")))?;
            Ok(out)
        });
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| EngineError::ChatTemplate(format!("cannot compile: {e}")))?;
        Ok(Self {
            env,
            source: source.to_string(),
            bos_token: bos_token.unwrap_or_default().to_string(),
            eos_token: eos_token.unwrap_or_default().to_string(),
        })
    }

    /// The template's source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders messages, ending with the assistant prompt when `add_generation_prompt`.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// Whether the template reads `tools` itself (Qwen2.5's does; SmolLM2's does not).
    pub fn handles_tools(&self) -> bool {
        self.source.contains("tools")
    }

    /// [`Self::render`] with the request's tool definitions in the context as `tools`, as
    /// transformers' `apply_chat_template(tools=...)` passes them.
    pub fn render_with_tools(&self, messages: &[ChatMessage], tools: Option<&[serde_json::Value]>, add_generation_prompt: bool) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| EngineError::ChatTemplate(e.to_string()))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
            tools => tools,
        })
        .map_err(|e| EngineError::ChatTemplate(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn tools_and_tool_turns_reach_the_template() {
        let source = "{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}{{ m.role }}:{{ m.content }}\
                      {% for c in m.tool_calls or [] %}<{{ c.function.arguments | tojson }}>{% endfor %}{% if m.tool_call_id %}#{{ m.tool_call_id }}{% endif %};{% endfor %}";
        let t = ChatTemplate::new(source, None, None).unwrap();
        let call = ChatMessage { tool_calls: Some(vec![json!({"function": {"name": "f", "arguments": {"a": 1}}})]), ..ChatMessage::new("assistant", "") };
        let result = ChatMessage { tool_call_id: Some("call_1".into()), ..ChatMessage::new("tool", "ok") };
        let tools = [json!({"type": "function", "function": {"name": "f"}})];
        let text = t.render_with_tools(&[ChatMessage::user("hi"), call, result], Some(&tools), false).unwrap();
        assert_eq!(text, r#"[f]user:hi;assistant:<{"a": 1}>;tool:ok#call_1;"#);
        assert_eq!(t.render(&[ChatMessage::user("hi")], false).unwrap(), "user:hi;", "no tools: `tools` is undefined");
        assert!(t.handles_tools());
        let t = ChatTemplate::new("{{ messages[0].content | tojson }}{{ {'a': [1, {'b': 'é<'}], 'c': {}} | tojson(indent=2) }}", None, None).unwrap();
        assert_eq!(t.render(&[ChatMessage::user("x")], false).unwrap(), "\"x\"{\n  \"a\": [\n    1,\n    {\n      \"b\": \"é<\"\n    }\n  ],\n  \"c\": {}\n}");
    }
}
