//! `GET /health` (and its alias `/ping`) for load balancers and orchestrators, and
//! `GET /version`. No key needed.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::{json_response, AppState};
use crate::error::ApiError;
use crate::protocol::Version;

/// 200 while the batch loop runs and the server is not draining; 503 otherwise.
pub(super) async fn health(State(st): State<Arc<AppState>>) -> Response {
    if !st.sched.shared.is_alive() {
        return ApiError::unavailable("the batch loop has stopped").into_response();
    }
    if st.sched.shared.is_draining() {
        return ApiError::unavailable("the server is shutting down").into_response();
    }
    StatusCode::OK.into_response()
}

pub(super) async fn version() -> Response {
    json_response(&Version { version: env!("CARGO_PKG_VERSION").to_string() })
}
