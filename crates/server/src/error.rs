//! Errors: [`ApiError`] is what an HTTP client sees (OpenAI's `{"error": {...}}` body with a
//! 4xx/5xx status); [`ServerError`] is what can stop the server from starting or running.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use loramux_engine::{EngineError, InputField};

use crate::protocol::{ErrorDetail, ErrorResponse};

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
    /// Seconds a client should wait before retrying (the `Retry-After` header of a 429).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), kind, param: None, code: None, retry_after: None }
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

    /// 413 for a reason of its own (an upload past its tenant's byte quota).
    pub fn too_large_because(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", message).with_code("request_too_large")
    }

    /// 429 a tenant's count quota (`code` says which): not a rate, so no `Retry-After`.
    pub fn quota_exceeded(message: impl Into<String>, code: &'static str) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message).with_code(code)
    }

    /// 503 the server is shutting down or overloaded.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message).with_code("service_unavailable")
    }

    /// 429 the waiting queue is full: retry after a second (OpenAI's rate-limit shape, which
    /// clients retry with backoff).
    pub fn overloaded(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message).with_code("server_overloaded");
        e.retry_after = Some(1);
        e
    }

    /// 429 a tenant's limit (`code` says which): retry after `retry_after`, rounded up to
    /// whole seconds (at least 1).
    pub fn tenant_limit(message: impl Into<String>, code: &'static str, retry_after: std::time::Duration) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message).with_code(code);
        let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
        e.retry_after = Some(secs.max(1));
        e
    }

    /// 504 the request's deadline (`--request-timeout-secs`) passed while it waited or ran.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(StatusCode::GATEWAY_TIMEOUT, "timeout_error", message).with_code("request_timeout")
    }

    /// 408 the client took too long to send its request.
    pub fn slow_client(message: impl Into<String>) -> Self {
        Self::new(StatusCode::REQUEST_TIMEOUT, "invalid_request_error", message).with_code("request_timeout")
    }

    /// 502 a store the server fetches from (S3, the hub, a URL) failed or broke off.
    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, "server_error", message).with_code("source_unavailable")
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
    pub fn body(&self) -> ErrorResponse {
        ErrorResponse {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: self.kind.to_string(),
                param: self.param.clone(),
                code: self.code.map(str::to_string),
            },
        }
    }

    /// Maps an engine error on a request to what the client should see; prompt errors
    /// name `prompt_param` (`messages` or `prompt`).
    pub fn from_input(e: &EngineError, prompt_param: &str) -> Self {
        match e {
            EngineError::InvalidInput { field, message, context_length_exceeded } => {
                let param = match field {
                    InputField::Prompt => prompt_param,
                    InputField::MaxTokens => "max_tokens",
                    InputField::Sampling(name) => name,
                };
                let err = Self::invalid_param(param, message.clone());
                if *context_length_exceeded {
                    err.with_code("context_length_exceeded")
                } else {
                    err
                }
            }
            EngineError::Tokenizer(_) => Self::from_engine(e).with_param(prompt_param),
            _ => Self::from_engine(e),
        }
    }

    /// Maps an engine error on a request to what the client should see.
    pub fn from_engine(e: &EngineError) -> Self {
        match e {
            EngineError::InvalidInput { .. } => Self::from_input(e, "prompt"),
            EngineError::AdapterExists(_) => Self::bad_request(e.to_string()),
            EngineError::Overloaded { message, retry_after, .. } => {
                let mut e = Self::overloaded(message.clone());
                if let Some(r) = retry_after {
                    e.retry_after = Some((r.as_secs() + u64::from(r.subsec_nanos() > 0)).max(1));
                }
                e
            }
            EngineError::DeadlineExceeded(m) => Self::timeout(m.clone()),
            EngineError::StepFailed(m) => Self::internal(m.clone()),
            EngineError::Config(m) => Self::bad_request(m.clone()),
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
        let mut response = (self.status, [(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response();
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        response
    }
}
