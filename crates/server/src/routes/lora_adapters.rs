//! vLLM's runtime adapter endpoints, `POST /v1/load_lora_adapter` and
//! `POST /v1/unload_lora_adapter`: admin key and `--enable-lora-updates` required. The path
//! checks (adapter roots, names) are in [`crate::adapters`]; a `lora_path` that is a URI
//! (`s3://`, `hf://`, `https://`) is fetched through [`crate::sources`]; the read runs off
//! the batch loop, the insert and the unload go through the scheduler actor.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::AppState;
use loramux_engine::routing::{parse_routing_value, read_routing_file};

use crate::adapters::{check_adapter_name, resolve_adapter_path};
use crate::error::ApiError;
use crate::openai::Fields;
use crate::sources::AdapterUri;
use crate::scheduler::InsertOutcome;

pub(super) async fn load_lora(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let r = load_lora_inner(&st, &headers, body).await;
    st.respond(r)
}

pub(super) async fn unload_lora(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let r = unload_lora_inner(&st, &headers, body).await;
    st.respond(r)
}

fn lora_updates_enabled(st: &AppState) -> Result<(), ApiError> {
    if st.lora_updates {
        Ok(())
    } else {
        Err(ApiError::not_found(
            "runtime adapter loading is disabled: start the server with --enable-lora-updates and --admin-api-key",
        ))
    }
}

/// What both endpoints start with: runtime updates enabled, the admin key, then the body's
/// fields with the required `lora_name` taken out.
async fn admin_request(st: &AppState, headers: &HeaderMap, body: Body) -> Result<(Fields, String), ApiError> {
    lora_updates_enabled(st)?;
    st.auth.check_admin(headers)?;
    let bytes = st.read_body(headers, body).await?;
    let mut f = Fields::parse(&bytes)?;
    let name = f.string("lora_name")?.ok_or_else(|| ApiError::invalid_param("lora_name", "'lora_name' is required"))?;
    Ok((f, name))
}

/// vLLM's plain-text success answer.
fn success(msg: String) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], msg).into_response()
}

async fn load_lora_inner(st: &Arc<AppState>, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
    let (mut f, name) = admin_request(st, headers, body).await?;
    let path = f.string("lora_path")?.ok_or_else(|| ApiError::invalid_param("lora_path", "'lora_path' is required"))?;
    let replace = f.bool("load_inplace")?.unwrap_or(false);
    let routing = f.take("routing").filter(|v| !v.is_null());
    f.finish()?;
    check_adapter_name(&name)?;
    // A URI is fetched (or found in the disk cache); a path must lie inside the adapter roots.
    let dir = match AdapterUri::parse(&path).map_err(|e| ApiError::invalid_param("lora_path", e.to_string()))? {
        Some(uri) => st.sources.fetch(&uri).await.map_err(|e| {
            tracing::warn!(adapter = %name, "load_lora_adapter: {e}");
            e.api_error("lora_path")
        })?,
        None => resolve_adapter_path(&st.adapter_roots, &path)?,
    };
    // Routing data: the request's "routing" object, else a routing file beside the adapter;
    // checked (and its examples embedded) before anything changes.
    let spec = match &routing {
        Some(v) => Some(parse_routing_value(v, "routing").map_err(|e| ApiError::invalid_param("routing", e.to_string()))?),
        None => read_routing_file(&dir).map_err(|e| ApiError::invalid_param("lora_path", format!("routing file refused: {e}")))?,
    };
    let route = match spec {
        Some(spec) => {
            let router = st.sched.router.clone();
            let route = tokio::task::spawn_blocking(move || router.prepare(&spec))
                .await
                .map_err(|e| ApiError::internal(format!("the router failed: {e}")))?
                .map_err(|e| ApiError::invalid_param("routing", format!("cannot embed the routing examples: {e}")))?;
            Some(route)
        }
        None => None,
    };
    let reader = st.sched.reader.clone();
    let read_name = name.clone();
    let read_dir = dir.clone();
    let loaded = tokio::task::spawn_blocking(move || reader.read(&read_name, &read_dir))
        .await
        .map_err(|e| ApiError::internal(format!("adapter reader failed: {e}")))?;
    let (model, seconds) = match loaded {
        Ok(read) => read,
        Err(e) => {
            st.metrics.adapter_load_failures.inc();
            tracing::warn!(adapter = %name, path = %dir.display(), "adapter load refused: {e}");
            return Err(ApiError::from_engine(&e).with_param("lora_path"));
        }
    };
    st.metrics.adapter_load_latency.observe(seconds);
    let outcome = st.sched.insert_adapter(model, seconds, replace).await?;
    match route {
        Some(route) => st.sched.router.insert(&name, route),
        None => {
            st.sched.router.remove(&name);
        }
    }
    st.sources.note_served(&st.sched, &name, &dir).await;
    tracing::info!(adapter = %name, path = %dir.display(), ms = format!("{:.1}", seconds * 1e3), ?outcome, "load_lora_adapter");
    Ok(success(match outcome {
        InsertOutcome::Resident => format!("Success: LoRA adapter '{name}' added successfully."),
        InsertOutcome::Registered => {
            format!("Success: LoRA adapter '{name}' added successfully (all adapter slots are busy: it becomes resident on first use).")
        }
    }))
}

async fn unload_lora_inner(st: &Arc<AppState>, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
    let (mut f, name) = admin_request(st, headers, body).await?;
    f.ignore(&["lora_int_id"]);
    f.finish()?;
    st.sched.unload_adapter(&name).await?;
    st.sched.router.remove(&name);
    Ok(success(format!("Success: LoRA adapter '{name}' removed successfully.")))
}
