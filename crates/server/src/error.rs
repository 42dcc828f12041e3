//! Errors: [`ApiError`] is what an HTTP client sees (OpenAI's `{"error": {...}}` body with a
//! 4xx/5xx status); [`ServerError`] is what can stop the server from starting or running.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use loramux_engine::EngineError;
use serde_json::json;

/// Why the server could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A setting is missing, contradictory or out of range.
    #[error("configuration: {0}")]
    Config(String),
    /// The config file could not be read or parsed.
    #[error("config file {path}: {message}")]
    ConfigFile { path: std::path::PathBuf, message: String },
    /// The model or a startup adapter could not be loaded.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The `--merge-lora` adapter could not be read or folded into the base weights.
    #[error("--merge-lora {}: {source}", .path.display())]
    MergeLora { path: std::path::PathBuf, source: EngineError },
    /// Binding the socket or serving failed.
    #[error("{context}: {error}")]
    Io { context: String, error: std::io::Error },
    /// The scheduler thread stopped unexpectedly.
    #[error("scheduler: {0}")]
    Scheduler(String),
}

impl ServerError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io { context: context.into(), error: source }
    }
}

/// An OpenAI-style error response.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, `server_error`...
    pub kind: &'static str,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
    /// A machine-readable code (`model_not_found`, `invalid_api_key`...).
    pub code: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), kind, param: None, code: None }
    }

    /// 400 invalid request.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 about one request field.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self::bad_request(message).with_param(param)
    }

    /// 400 for a parameter this server does not implement.
    pub fn unsupported(param: &str, message: impl Into<String>) -> Self {
        Self::bad_request(message).with_param(param).with_code("unsupported_parameter")
    }

    /// 404 for a model or adapter name nobody knows.
    pub fn model_not_found(name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{name}` does not exist. GET /v1/models lists the base model and every adapter."),
        )
        .with_param("model")
        .with_code("model_not_found")
    }

    /// 404 for anything else that is missing.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message).with_code("not_found")
    }

    /// 401 missing or wrong key.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message).with_code("invalid_api_key")
    }

    /// 403 a valid key that may not do this.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", message).with_code("permission_denied")
    }

    /// 409 the resource is busy.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "invalid_request_error", message).with_code("conflict")
    }

    /// 413 request body above the limit.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("request body is larger than the server's limit of {limit} bytes"),
        )
        .with_code("request_too_large")
    }

    /// 503 the server is shutting down or overloaded.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message).with_code("service_unavailable")
    }

    /// 500 something broke inside.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The JSON body, `{"error": {...}}`.
    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }

    /// Maps an engine error on a request to what the client should see.
    pub fn from_engine(e: &EngineError) -> Self {
        match e {
            EngineError::UnknownAdapter(name) => Self::model_not_found(name),
            EngineError::InvalidRequest(m) => Self::bad_request(m.clone()),
            EngineError::ChatTemplate(m) => Self::invalid_param("messages", format!("chat template: {m}")),
            EngineError::Tokenizer(m) => Self::bad_request(format!("tokenizer: {m}")),
            EngineError::Adapter { .. } => Self::bad_request(e.to_string()).with_code("invalid_adapter"),
            EngineError::AdapterCapacity(m) => Self::conflict(m.clone()),
            EngineError::Io { .. } => Self::bad_request(e.to_string()),
            EngineError::Model { .. } | EngineError::Candle(_) => Self::internal(e.to_string()),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.body()).unwrap_or_default();
        (self.status, [(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response()
    }
}
