//! `GET /v1/models` and `GET /v1/models/{id}`: the base model and every known adapter the
//! caller may use (a tenant's key sees only its adapters; another's is answered as unknown).

use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::http::HeaderMap;
use axum::response::Response;

use super::{json_response, AppState};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::protocol::{ModelCard, ModelList};

/// A card names the model and its parent only: where its files are is not for key holders.
fn model_card(st: &AppState, id: &str, parent: Option<&str>) -> ModelCard {
    ModelCard {
        id: id.to_string(),
        created: st.created,
        owned_by: "loramux".to_string(),
        root: id.to_string(),
        parent: parent.map(str::to_string),
        max_model_len: st.sched.info.max_model_len,
        permission: Vec::new(),
    }
}

fn model_cards(st: &AppState, caller: &Caller) -> Vec<ModelCard> {
    let mut data = vec![model_card(st, &st.base_name, None)];
    for a in st.sched.shared.adapters().into_iter().filter(|a| caller.may_use(&a.name)) {
        data.push(model_card(st, &a.name, Some(&st.base_name)));
    }
    data
}

pub(super) async fn list_models(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let r = st.auth.check(&headers).map(|caller| json_response(&ModelList { data: model_cards(&st, &caller) }));
    st.respond(r)
}

pub(super) async fn get_model(State(st): State<Arc<AppState>>, headers: HeaderMap, UrlPath(id): UrlPath<String>) -> Response {
    let r = st.auth.check(&headers).and_then(|caller| {
        model_cards(&st, &caller)
            .into_iter()
            .find(|c| c.id == id)
            .map(|c| json_response(&c))
            .ok_or_else(|| ApiError::model_not_found(&id))
    });
    st.respond(r)
}
