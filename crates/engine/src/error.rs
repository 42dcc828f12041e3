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
    /// An adapter name is not known to the engine.
    #[error("unknown adapter '{0}'")]
    UnknownAdapter(String),
    /// The resident adapter set is full and nothing can be evicted right now.
    #[error("adapter capacity exhausted: {0}")]
    AdapterCapacity(String),
    /// A request cannot be served as asked (prompt too long, bad sampling values...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
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
