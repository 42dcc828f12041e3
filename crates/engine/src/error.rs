//! One error type for the engine, so callers (CLI, server) can map each kind to a
//! clear message or an HTTP status without string matching.

use std::path::PathBuf;

/// Everything that can go wrong inside the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A model directory or file is missing pieces or holds something we cannot use.
    #[error("model {path}: {message}")]
    Model { path: PathBuf, message: String },
    /// A LoRA adapter is malformed, unsupported, or does not fit the base model.
    /// `field` names the offending config field or tensor so users can fix it.
    #[error("adapter {name}: {field}: {message}")]
    Adapter {
        name: String,
        field: String,
        message: String,
    },
    /// A runtime load named an adapter that is already loaded (and did not ask to replace it).
    #[error("The lora adapter '{0}' has already been loaded.")]
    AdapterExists(String),
    /// An adapter name is not known to the engine.
    #[error("unknown adapter '{0}'")]
    UnknownAdapter(String),
    /// The resident adapter set is full and nothing can be evicted right now.
    #[error("adapter capacity exhausted: {0}")]
    AdapterCapacity(String),
    /// A request cannot be served as asked (prompt too long, bad sampling values...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The prompt, or the room it leaves for the completion, cannot be served; `field` says
    /// which part of the request to fix.
    #[error("invalid request: {message}")]
    InvalidInput { field: InputField, message: String, context_length_exceeded: bool },
    /// The request's deadline passed while it waited or ran; its memory is freed.
    #[error("request timed out: {0}")]
    DeadlineExceeded(String),
    /// The admission gate refused the request: the caller should retry later (after
    /// `retry_after` when the gate could tell).
    #[error("overloaded: {message}")]
    Overloaded { reason: OverloadReason, message: String, retry_after: Option<std::time::Duration> },
    /// The forward pass failed for the sequences of this request (the batch's other
    /// sequences went on).
    #[error("generation failed: {0}")]
    StepFailed(String),
    /// Settings that cannot work together (a KV budget too small for one sequence...).
    #[error("configuration: {0}")]
    Config(String),
    /// Tokenizer construction or encoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Chat template rendering failed.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The part of a request an [`EngineError::InvalidInput`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputField {
    /// The prompt (`messages` for chat, `prompt` for completions).
    Prompt,
    /// The completion length asked for.
    MaxTokens,
    /// A sampling parameter, by its OpenAI name (`temperature`, `top_p`, `stop`...).
    Sampling(&'static str),
}

impl EngineError {
    pub(crate) fn model(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Model {
            path: path.into(),
            message: message.into(),
        }
    }

    pub(crate) fn adapter(
        name: impl Into<String>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self::Adapter {
            name: name.into(),
            field: field.into(),
            message: message.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// Engine result type.
pub type Result<T> = std::result::Result<T, EngineError>;

/// The text of a panic payload (a caught panic of the batch loop, an adapter read or a
/// file parser becomes an error message).
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic.downcast_ref::<String>().map(String::as_str).or_else(|| panic.downcast_ref::<&str>().copied()).unwrap_or("unknown panic")
}

/// Why the admission gate refused a request (a metrics label and the client's hint).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverloadReason {
    /// `max_waiting` requests wait already.
    QueueFull,
    /// The queue holds what the server starts within the queue-delay bound.
    QueueDelay,
    /// The request's first token would come later than the TTFT target.
    TtftTarget,
}

impl OverloadReason {
    /// The label `/metrics` counts refusals under.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::QueueDelay => "queue_delay",
            Self::TtftTarget => "ttft_target",
        }
    }
}
