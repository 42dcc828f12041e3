//! HTTP routes: the OpenAI endpoints (chat, completions, models), vLLM's adapter
//! load/unload, health and metrics. Handlers parse and check the request, hand it to the
//! batch loop (the scheduler actor, [`crate::scheduler::SchedulerHandle`]) and turn its
//! events into a JSON response or an SSE stream.
//!
//! **Adding an endpoint**: write its handler in the file of its group below (or a new file
//! here, declared with `mod`), then add one `.route(...)` line to [`router`]. Handlers take
//! `State<Arc<AppState>>`, check the caller with `st.auth`, read the body with
//! `AppState::read_body` and answer through `AppState::respond`, which counts errors.
//!
//! | file | endpoints |
//! | --- | --- |
//! | `generate.rs` | `POST /v1/chat/completions`, `POST /v1/completions` (whole answers) |
//! | `choices.rs` | the two APIs' answer and chunk shapes, assembled once for both |
//! | `sse.rs` | the streamed answers (`"stream": true`): SSE framing and its state machine |
//! | `responses.rs` | `POST /v1/responses` (OpenAI's Responses API, stateless), on the chat path |
//! | `models.rs` | `GET /v1/models`, `GET /v1/models/{id}` |
//! | `lora_adapters.rs` | `POST /v1/load_lora_adapter`, `POST /v1/unload_lora_adapter` |
//! | `health.rs` | `GET /health`, `GET /ping`, `GET /ready`, `GET /version` |
//! | `metrics.rs` | `GET /metrics` (Prometheus text) |
//! | `route.rs` | `POST /v1/route`, and `model: "auto"` on chat and completions (semantic routing) |
//! | `adapters.rs` | `POST /v1/adapters` (a tenant's upload), `GET /v1/adapters`, `DELETE /v1/adapters/{name}` |
//! | `lora_list.rs` | `GET /v1/lora_adapters` (adapters' state: resident, pinned, merged, rank, bytes) |
//! | `web.rs` | `GET /` and its assets: the web page (unless `--disable-web-ui`) |

mod adapters;
mod choices;
mod embeddings;
mod generate;
mod health;
mod lora_adapters;
mod lora_list;
mod metrics;
mod models;
mod responses;
mod route;
mod tokenize;
mod sse;
mod web;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use futures_util::stream::StreamExt;
use rand::Rng;
use serde::Serialize;

use crate::auth::Auth;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::scheduler::SchedulerHandle;

/// What every handler shares.
pub struct AppState {
    pub sched: SchedulerHandle,
    pub auth: Auth,
    pub metrics: Arc<Metrics>,
    pub base_name: String,
    /// Canonical roots `load_lora_adapter` may read from.
    pub adapter_roots: Vec<PathBuf>,
    /// Deadline of each generation request (queue plus generation), if any.
    pub request_timeout: Option<Duration>,
    /// How long a client may take to send its body.
    pub http_read_timeout: Duration,
    pub lora_updates: bool,
    pub max_body: usize,
    /// The adapter store (`None`: no tenants, so no uploads) and the largest upload body.
    pub uploads: Option<Arc<crate::uploads::AdapterStore>>,
    pub max_upload_bytes: usize,
    pub created: u64,
    /// `--router-aliases`, `--router-fallback` (the router itself is `sched.router`).
    pub routing: crate::config::RouterSettings,
    /// Serve the web page at `/` (not `--disable-web-ui`).
    pub web_ui: bool,
    /// Remote adapter sources: fetches, the disk cache, `--lora-dir URI` lookups, readiness.
    pub sources: Arc<crate::sources::Sources>,
}

/// The router over `state`: every endpoint, one line each.
pub fn router(state: Arc<AppState>) -> Router {
    let web_ui = state.web_ui;
    let app = Router::new()
        .route("/health", get(health::health))
        .route("/ping", get(health::health))
        .route("/ready", get(health::ready))
        .route("/version", get(health::version))
        .route("/metrics", get(metrics::metrics))
        .route("/v1/models", get(models::list_models))
        .route("/v1/models/{*id}", get(models::get_model))
        .route("/v1/chat/completions", post(generate::chat))
        .route("/v1/completions", post(generate::completions))
        .route("/v1/responses", post(responses::responses))
        .route("/v1/route", post(route::route))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/load_lora_adapter", post(lora_adapters::load_lora))
        .route("/v1/unload_lora_adapter", post(lora_adapters::unload_lora))
        .route("/v1/lora_adapters", get(lora_list::list_lora_adapters))
        .route("/v1/adapters", post(adapters::upload).get(adapters::list))
        .route("/v1/adapters/{*id}", delete(adapters::delete))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/tokenizer_info", get(tokenize::tokenizer_info));
    let app = if web_ui { app.merge(web::routes()) } else { app };
    app.fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// A JSON body with status 200.
fn json_response(v: &impl Serialize) -> Response {
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], serde_json::to_vec(v).unwrap_or_default()).into_response()
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn random_id(prefix: &str) -> String {
    let mut rng = rand::rng();
    format!("{prefix}-{:016x}{:016x}", rng.random::<u64>(), rng.random::<u64>())
}

impl AppState {
    /// The request body, within the size limit and the read timeout (a client that
    /// trickles its body gets 408 and frees the connection).
    async fn read_body(&self, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
        self.read_body_limit(headers, body, self.max_body).await
    }

    /// [`Self::read_body`] with a limit of its own (uploads have theirs).
    async fn read_body_limit(&self, headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
        match tokio::time::timeout(self.http_read_timeout, read_body(headers, body, limit)).await {
            Ok(r) => r,
            Err(_) => Err(ApiError::slow_client(format!(
                "the request body did not arrive within {} s",
                self.http_read_timeout.as_secs_f64()
            ))),
        }
    }

    fn fail(&self, e: ApiError) -> Response {
        self.metrics.error(e.status.as_u16());
        e.into_response()
    }

    fn respond(&self, r: Result<Response, ApiError>) -> Response {
        r.unwrap_or_else(|e| self.fail(e))
    }
}

async fn fallback() -> Response {
    ApiError::not_found("no such endpoint").into_response()
}

async fn method_not_allowed() -> Response {
    let mut e = ApiError::bad_request("method not allowed for this endpoint");
    e.status = StatusCode::METHOD_NOT_ALLOWED;
    e.into_response()
}

/// Reads the body, refusing more than `limit` bytes with 413.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    if let Some(len) = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok()) {
        if len > limit as u64 {
            return Err(ApiError::too_large(limit));
        }
    }
    let mut data = body.into_data_stream();
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = data.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request(format!("cannot read the request body: {e}")))?;
        if buf.len() + chunk.len() > limit {
            return Err(ApiError::too_large(limit));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}
