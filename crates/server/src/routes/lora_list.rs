//! `GET /v1/lora_adapters`: every adapter the caller may use with its state (resident,
//! pinned, merged, rank, bytes, running and served requests), what the web page's columns and
//! server view show. A tenant's key sees only its adapters, as on `/v1/models`; the admin key
//! and an open server see all. Where an adapter's files are is not shown.

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Serialize;

use super::{json_response, AppState};
use crate::auth::Caller;

#[derive(Serialize)]
struct LoraAdapter {
    id: String,
    object: &'static str,
    resident: bool,
    pinned: bool,
    merged: bool,
    /// Largest rank over its projections; `null` until it has been resident once.
    rank: Option<usize>,
    /// Bytes it occupies in memory (0 when not resident).
    bytes: usize,
    /// Sequences running on it now.
    running: usize,
    /// Requests started on it since it became known.
    requests: u64,
    /// Has routing examples: `model: "auto"` may pick it.
    routable: bool,
}

#[derive(Serialize)]
struct BaseModel {
    id: String,
    max_model_len: usize,
}

#[derive(Serialize)]
struct LoraAdapterList {
    object: &'static str,
    base: BaseModel,
    /// The `model` names that route (`--router-aliases`), when an adapter the caller may use is routable.
    router_aliases: Vec<String>,
    /// Whether `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` are on (`--enable-lora-updates`).
    lora_updates: bool,
    /// The caller presented the admin key.
    admin: bool,
    data: Vec<LoraAdapter>,
}

fn list(st: &AppState, caller: &Caller) -> LoraAdapterList {
    let routable = st.sched.router.routable();
    let data: Vec<LoraAdapter> = st
        .sched
        .shared
        .adapters()
        .into_iter()
        .filter(|a| caller.may_use(&a.name))
        .map(|a| LoraAdapter {
            routable: routable.contains(&a.name),
            id: a.name,
            object: "lora_adapter",
            resident: a.resident,
            pinned: a.pinned,
            merged: a.merged,
            rank: a.rank,
            bytes: a.bytes,
            running: a.active,
            requests: a.requests,
        })
        .collect();
    let routes = data.iter().any(|a| a.routable);
    LoraAdapterList {
        object: "list",
        base: BaseModel { id: st.base_name.clone(), max_model_len: st.sched.info.max_model_len },
        router_aliases: if routes { st.routing.aliases.clone() } else { Vec::new() },
        lora_updates: st.lora_updates,
        admin: caller.admin,
        data,
    }
}

pub(super) async fn list_lora_adapters(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let r = st.auth.check(&headers).map(|caller| json_response(&list(&st, &caller)));
    st.respond(r)
}
