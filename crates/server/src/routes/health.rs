//! `GET /health` (and its alias `/ping`), the liveness probe for load balancers and
//! orchestrators; `GET /ready`, the readiness probe (vLLM has none: its `/health` is both);
//! and `GET /version`. No key needed.

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

/// 200 once the server is live and every remote startup adapter (`--lora-modules` URIs,
/// with their `--pin-lora`) is fetched and loaded; 503 naming the ones still missing (and
/// why) before, so an orchestrator sends no traffic to a replica that would answer 404.
pub(super) async fn ready(State(st): State<Arc<AppState>>) -> Response {
    let live = health(State(st.clone())).await;
    if live.status() != StatusCode::OK {
        return live;
    }
    let pending = st.sources.readiness.pending();
    if !pending.is_empty() {
        let list: Vec<String> = pending.iter().map(|(n, why)| format!("{n} ({why})")).collect();
        return ApiError::unavailable(format!("startup adapters not loaded yet: {}", list.join("; "))).into_response();
    }
    StatusCode::OK.into_response()
}

pub(super) async fn version() -> Response {
    json_response(&Version { version: env!("CARGO_PKG_VERSION").to_string() })
}
