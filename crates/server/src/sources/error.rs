//! [`SourceError`]: why a remote adapter could not be had, each naming the URI and the
//! store, and the HTTP answer each one is ([`SourceError::api_error`]).

use crate::error::ApiError;

/// Why fetching an adapter failed. Clone: one fetch's answer goes to every request that
/// waited on it (single flight).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SourceError {
    /// The key, repository file or URL does not exist.
    #[error("{uri}: not found in {store}")]
    NotFound { uri: String, store: &'static str },
    /// The store refused the credentials (or their absence).
    #[error("{uri}: {store} refused access ({detail}); check the credentials the server was started with")]
    Denied { uri: String, store: &'static str, detail: String },
    /// Bigger than `--max-lora-bytes` (known before the download ends).
    #[error("{uri}: larger than --max-lora-bytes ({limit} bytes)")]
    TooLarge { uri: String, limit: u64 },
    /// The bytes are not the `#sha256=` pin.
    #[error("{uri}: sha256 {actual} is not the pinned {expected}; refused, nothing cached")]
    Checksum { uri: String, expected: String, actual: String },
    /// The bytes arrived but are not an adapter (archive without the PEFT files, ...).
    #[error("{uri}: {message}")]
    Invalid { uri: String, message: String },
    /// The fetch took longer than `--lora-fetch-timeout-secs`.
    #[error("{uri}: the fetch took longer than {secs} s (--lora-fetch-timeout-secs)")]
    Timeout { uri: String, secs: u64 },
    /// The store could not be reached, failed, or the transfer broke off.
    #[error("{uri}: {store} failed: {message}")]
    Unavailable { uri: String, store: &'static str, message: String },
    /// The server's own S3 settings are broken (an `AWS_PROFILE` in neither AWS file, a file
    /// that does not parse): the operator's to fix, not the client's.
    #[error("{uri}: the server's S3 settings: {message}")]
    Settings { uri: String, message: String },
    /// The local cache could not be written or read.
    #[error("adapter cache {path}: {message}")]
    Cache { path: String, message: String },
}

impl SourceError {
    /// The OpenAI-style answer: 404 for a missing adapter, 403 for refused credentials, 413
    /// past the size cap, 400 for a pin mismatch or a broken adapter, 504 for a timeout,
    /// 502 when the store failed, 500 for the local cache or the server's own settings. `param` is the request field
    /// that named the source.
    pub fn api_error(&self, param: &str) -> ApiError {
        let message = self.to_string();
        match self {
            Self::NotFound { .. } => ApiError::not_found(message).with_param(param),
            Self::Denied { .. } => ApiError::forbidden(message).with_param(param).with_code("source_access_denied"),
            Self::TooLarge { .. } => ApiError::too_large_because(message).with_param(param),
            Self::Checksum { .. } => ApiError::invalid_param(param, message).with_code("checksum_mismatch"),
            Self::Invalid { .. } => ApiError::invalid_param(param, message),
            Self::Timeout { .. } => ApiError::timeout(message).with_param(param).with_code("source_timeout"),
            Self::Unavailable { .. } => ApiError::bad_gateway(message).with_param(param),
            Self::Cache { .. } | Self::Settings { .. } => ApiError::internal(message),
        }
    }
}
