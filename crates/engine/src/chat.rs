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
