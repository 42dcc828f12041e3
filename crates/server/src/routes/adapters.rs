//! Tenants' adapter uploads: `POST /v1/adapters` (multipart: the adapter's files), `GET
//! /v1/adapters` (the caller's own), `DELETE /v1/adapters/{name}`. An upload is checked
//! against the base model by the engine's reader before anything is kept, stored durably
//! ([`crate::uploads::AdapterStore`]), and served as `<tenant>/<name>` to that tenant only
//! ([`crate::auth::Caller::may_use`]). The admin key acts for the tenant its `tenant` field
//! (or, on delete, the `<tenant>/` prefix) names.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap};
use axum::response::Response;
use loramux_engine::lora::LoraModel;
use loramux_engine::routing::{parse_routing, AdapterRoute};
use loramux_engine::EngineError;
use serde::Serialize;

use super::{json_response, now_secs, AppState};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::tenants::Tenant;
use crate::uploads::{check_upload_name, parse_upload, AdapterFiles, AdapterStore, Format, StoredAdapter, UploadForm};

/// An uploaded adapter as the API shows it.
#[derive(Serialize)]
struct AdapterObject {
    id: String,
    object: &'static str,
    created: u64,
    owned_by: String,
    bytes: u64,
    rank: usize,
    sha256: String,
    format: Format,
}

impl From<&StoredAdapter> for AdapterObject {
    fn from(e: &StoredAdapter) -> Self {
        Self {
            id: e.id(),
            object: "adapter",
            created: e.created,
            owned_by: e.tenant.clone(),
            bytes: e.bytes,
            rank: e.rank,
            sha256: e.sha256.clone(),
            format: e.format,
        }
    }
}

#[derive(Serialize)]
struct AdapterList {
    object: &'static str,
    data: Vec<AdapterObject>,
}

pub(super) async fn upload(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let r = upload_inner(&st, &headers, body).await;
    st.respond(r)
}

pub(super) async fn list(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let r = list_inner(&st, &headers);
    st.respond(r)
}

pub(super) async fn delete(State(st): State<Arc<AppState>>, headers: HeaderMap, UrlPath(id): UrlPath<String>) -> Response {
    let r = delete_inner(&st, &headers, &id).await;
    st.respond(r)
}

fn store(st: &AppState) -> Result<Arc<AdapterStore>, ApiError> {
    st.uploads.clone().ok_or_else(|| ApiError::not_found("adapter uploads need tenants: start the server with --tenants FILE or --api-key"))
}

/// The tenant a call acts for: a tenant's key its own (a `tenant` field may only repeat it),
/// the admin key the one it names.
fn acting_tenant(st: &AppState, caller: &Caller, named: Option<&str>) -> Result<Arc<Tenant>, ApiError> {
    match (&caller.tenant, named) {
        (Some(t), None) => Ok(t.clone()),
        (Some(t), Some(n)) if n == t.name => Ok(t.clone()),
        (Some(_), Some(_)) => Err(ApiError::invalid_param("tenant", "only the admin key may name a tenant")),
        (None, Some(n)) if caller.admin => {
            st.auth.tenants().current().get(n).ok_or_else(|| ApiError::invalid_param("tenant", format!("no tenant is named '{}'", n.escape_debug())))
        }
        (None, None) if caller.admin => Err(ApiError::invalid_param("tenant", "the admin key uploads into a tenant's namespace: add a tenant field")),
        _ => Err(ApiError::forbidden("adapter uploads need a tenant's API key")),
    }
}

/// The upload's name: the `name` field, else a GGUF file's stem.
fn upload_name(form: &UploadForm) -> Result<String, ApiError> {
    let from_file = match &form.files {
        AdapterFiles::Gguf { filename: Some(f), .. } => {
            let base = f.rsplit(['/', '\\']).next().unwrap_or(f);
            let cut = base.len().saturating_sub(5);
            base.get(cut..).filter(|ext| ext.eq_ignore_ascii_case(".gguf")).and_then(|_| base.get(..cut)).map(str::to_string)
        }
        _ => None,
    };
    let name = form.name.clone().or(from_file).ok_or_else(|| ApiError::invalid_param("name", "'name' is required"))?;
    check_upload_name(&name).map_err(|m| ApiError::invalid_param("name", m))?;
    Ok(name)
}

fn upload_bytes(form: &UploadForm) -> u64 {
    let files = match &form.files {
        AdapterFiles::Peft { config, weights } => config.len() + weights.len(),
        AdapterFiles::Gguf { file, .. } => file.len(),
    };
    (files + form.routing.as_ref().map_or(0, |r| r.len())) as u64
}

/// `routing.json`, checked and its examples embedded before anything changes.
async fn prepare_route(st: &AppState, routing: Option<&axum::body::Bytes>) -> Result<Option<AdapterRoute>, ApiError> {
    let Some(text) = routing else { return Ok(None) };
    let spec = parse_routing(text, "routing.json").map_err(|e| ApiError::invalid_param("routing.json", e.to_string()))?;
    let router = st.sched.router.clone();
    let route = tokio::task::spawn_blocking(move || router.prepare(&spec))
        .await
        .map_err(|e| ApiError::internal(format!("the router failed: {e}")))?
        .map_err(|e| ApiError::invalid_param("routing.json", format!("cannot embed the routing examples: {e}")))?;
    Ok(Some(route))
}

/// The 409/429/413 an upload gets past its tenant's name, count or bytes limits.
fn check_quotas(tenant: &Tenant, store: &AdapterStore, existing: Option<&StoredAdapter>, form: &UploadForm, name: &str) -> Result<(), ApiError> {
    if existing.is_some() && !form.overwrite {
        return Err(ApiError::conflict(format!("an adapter named '{name}' exists: send overwrite=true to replace it")).with_param("name"));
    }
    let own = store.tenant_entries(&tenant.name);
    if let Some(max) = tenant.max_uploads {
        if existing.is_none() && own.len() >= max as usize {
            let msg = format!("Upload limit reached: at most {max} uploaded adapters for this tenant; delete one first.");
            return Err(ApiError::quota_exceeded(msg, "upload_limit_exceeded"));
        }
    }
    if let Some(max) = tenant.max_upload_bytes {
        let (kept, new): (u64, u64) = (own.iter().filter(|e| e.name != name).map(|e| e.bytes).sum(), upload_bytes(form));
        if kept + new > max {
            let msg = format!("this upload ({new} bytes) would take the tenant's adapters to {} bytes, above its max_upload_bytes {max}", kept + new);
            return Err(ApiError::too_large_because(msg).with_param("adapter"));
        }
    }
    Ok(())
}

/// An adapter the engine's reader refused, as a 400 naming the file and field.
fn refused(format: Format, e: &EngineError) -> ApiError {
    let EngineError::Adapter { field, message, .. } = e else { return ApiError::from_engine(e) };
    let file = match format {
        Format::Gguf => "adapter",
        Format::Peft if field.starts_with("adapter_") => return ApiError::invalid_param(field, format!("{field}: {message}")).with_code("invalid_adapter"),
        Format::Peft if field.contains('.') => "adapter_model.safetensors",
        Format::Peft => "adapter_config.json",
    };
    ApiError::invalid_param(field, format!("{file}: {field}: {message}")).with_code("invalid_adapter")
}

/// Writes the upload into the store and reads it back as the engine will; on a refusal
/// the blob goes again (unless another entry shares it). Returns the model, the seconds
/// its read took and the blob's sha256.
async fn stage_and_read(st: &AppState, store: &Arc<AdapterStore>, form: &UploadForm, id: &str) -> Result<(LoraModel, f64, String), ApiError> {
    let (store, reader, id) = (store.clone(), st.sched.reader.clone(), id.to_string());
    let (files, routing) = (form.files.clone(), form.routing.clone());
    tokio::task::spawn_blocking(move || {
        let staged = store.stage(&files, routing.as_deref()).map_err(|e| ApiError::internal(e.to_string()))?;
        let (sha, format) = (staged.sha256.clone(), staged.format);
        let path = store.place(staged).map_err(|e| ApiError::internal(e.to_string()))?;
        match reader.read(&id, &path) {
            Ok((model, seconds)) => Ok((model, seconds, sha)),
            Err(e) => {
                store.collect(&sha);
                Err(refused(format, &e))
            }
        }
    })
    .await
    .map_err(|e| ApiError::internal(format!("the adapter reader failed: {e}")))?
}

async fn upload_inner(st: &Arc<AppState>, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
    let store = store(st)?;
    let caller = st.auth.check(headers)?;
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let bytes = st.read_body_limit(headers, body, st.max_upload_bytes).await?;
    let form = parse_upload(&content_type, bytes).map_err(|e| ApiError::invalid_param(&e.field, e.to_string()))?;
    let tenant = acting_tenant(st, &caller, form.tenant.as_deref())?;
    let name = upload_name(&form)?;
    let id = format!("{}/{name}", tenant.name);
    let route = prepare_route(st, form.routing.as_ref()).await?;

    let _commit = store.commit.lock().await;
    let existing = store.get(&tenant.name, &name);
    check_quotas(&tenant, &store, existing.as_ref(), &form, &name)?;
    if existing.is_none() && st.sched.shared.adapters().iter().any(|a| a.name == id) {
        return Err(ApiError::conflict(format!("an adapter that is not an upload is served as '{id}'")).with_param("name"));
    }
    let (model, seconds, sha256) = stage_and_read(st, &store, &form, &id).await?;
    let cap = tenant.max_upload_rank.map_or(st.sched.info.max_lora_rank, |r| (r as usize).min(st.sched.info.max_lora_rank));
    if model.max_rank > cap {
        store.collect(&sha256);
        let file = if matches!(form.files, AdapterFiles::Gguf { .. }) { "adapter" } else { "adapter_config.json" };
        return Err(ApiError::invalid_param("r", format!("{file}: r: rank {} is above this tenant's limit of {cap} (max_upload_rank)", model.max_rank)));
    }
    let entry = StoredAdapter {
        tenant: tenant.name.clone(),
        name,
        sha256,
        format: if matches!(form.files, AdapterFiles::Gguf { .. }) { Format::Gguf } else { Format::Peft },
        bytes: upload_bytes(&form),
        rank: model.max_rank,
        created: now_secs(),
    };
    serve_and_index(st, &store, model, seconds, route, entry.clone(), existing.as_ref()).await?;
    tracing::info!(adapter = %id, bytes = entry.bytes, rank = entry.rank, sha256 = %entry.sha256, "adapter uploaded");
    Ok(json_response(&AdapterObject::from(&entry)))
}

/// Serves the checked adapter under its name (replacing the one it overwrites) and writes
/// its index entry; whatever fails undoes what was done.
async fn serve_and_index(
    st: &AppState,
    store: &Arc<AdapterStore>,
    model: LoraModel,
    seconds: f64,
    route: Option<AdapterRoute>,
    entry: StoredAdapter,
    existing: Option<&StoredAdapter>,
) -> Result<(), ApiError> {
    let id = entry.id();
    let sha256 = entry.sha256.clone();
    st.auth.uploaded().insert(id.clone());
    if let Err(e) = st.sched.insert_adapter(model, seconds, existing.is_some()).await {
        if existing.is_none() {
            st.auth.uploaded().remove(&id);
        }
        store.collect(&sha256);
        return Err(e);
    }
    match route {
        Some(route) => st.sched.router.insert(&id, route),
        None => {
            st.sched.router.remove(&id);
        }
    }
    let writer = store.clone();
    let written = tokio::task::spawn_blocking(move || writer.put(entry)).await.map_err(|e| ApiError::internal(e.to_string()))?;
    if let Err(e) = written {
        tracing::error!(adapter = %id, "the adapter store could not be written: {e}");
        unserve(st, &id).await;
        store.collect(&sha256);
        return Err(ApiError::internal(format!("the adapter store could not be written: {e}")));
    }
    if let Some(old) = existing.filter(|old| old.sha256 != sha256) {
        store.collect(&old.sha256);
    }
    Ok(())
}

/// Stops serving an upload: running requests finish, waiting ones get 404.
async fn unserve(st: &AppState, id: &str) {
    if let Err(e) = st.sched.unload_adapter(id).await {
        tracing::warn!(adapter = %id, "unloading an uploaded adapter: {}", e.message);
    }
    st.sched.router.remove(id);
    st.auth.uploaded().remove(id);
}

fn list_inner(st: &AppState, headers: &HeaderMap) -> Result<Response, ApiError> {
    let store = store(st)?;
    let caller = st.auth.check(headers)?;
    let entries = match (&caller.tenant, caller.admin) {
        (Some(t), _) => store.tenant_entries(&t.name),
        (None, true) => store.entries(),
        (None, false) => return Err(ApiError::forbidden("adapter uploads need a tenant's API key")),
    };
    Ok(json_response(&AdapterList { object: "list", data: entries.iter().map(AdapterObject::from).collect() }))
}

async fn delete_inner(st: &AppState, headers: &HeaderMap, id: &str) -> Result<Response, ApiError> {
    let store = store(st)?;
    let caller = st.auth.check(headers)?;
    let (tenant, name) = match (&caller.tenant, id.split_once('/')) {
        (Some(t), None) => (t.name.clone(), id.to_string()),
        (Some(t), Some((ns, n))) if ns == t.name => (t.name.clone(), n.to_string()),
        (None, Some((ns, n))) if caller.admin => (ns.to_string(), n.to_string()),
        (None, None) if caller.admin => return Err(ApiError::invalid_param("name", "the admin key deletes <tenant>/<name>")),
        (None, _) => return Err(ApiError::forbidden("adapter uploads need a tenant's API key")),
        _ => return Err(ApiError::model_not_found(id)),
    };
    let _commit = store.commit.lock().await;
    let Some(entry) = store.get(&tenant, &name) else { return Err(ApiError::model_not_found(id)) };
    let remover = store.clone();
    let (t, n) = (tenant.clone(), name.clone());
    tokio::task::spawn_blocking(move || remover.remove(&t, &n))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(format!("the adapter store could not be written: {e}")))?;
    unserve(st, &entry.id()).await;
    store.collect(&entry.sha256);
    tracing::info!(adapter = %entry.id(), "uploaded adapter deleted");
    Ok(json_response(&serde_json::json!({"id": entry.id(), "object": "adapter", "deleted": true})))
}
