//! Semantic routing over HTTP: `model: "auto"` (or another `--router-aliases` name) on chat
//! and completions, and `POST /v1/route`, which answers the ranking without generating.
//! The prompt is rendered and tokenized as generation would; the embedding pass runs on a
//! blocking thread over the router's base-only view of the model (the engine's router,
//! `loramux_engine::routing`), never on the batch loop.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;
use loramux_engine::routing::RouteDecision;
use loramux_engine::LoraRequest;
use serde::Serialize;

use super::{json_response, AppState};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::openai::{self, Api, GenRequest};

/// The header a routed answer carries.
pub const ROUTE_HEADER: &str = "x-loramux-route";

/// Where a routed request goes and why.
pub(super) struct Routed {
    /// The model that serves it (an adapter, or the fallback).
    pub model: String,
    pub lora: Option<LoraRequest>,
    pub decision: RouteDecision,
    pub fallback: bool,
}

impl Routed {
    /// `adapter=<name>; score=<s>; margin=<m>[; fallback=true]`.
    pub fn header(&self) -> HeaderValue {
        let score = self.decision.best().map_or(0.0, |b| b.1);
        let mut v = format!("adapter={}; score={score:.4}; margin={:.4}", self.model, self.decision.confidence);
        if self.fallback {
            v.push_str("; fallback=true");
        }
        HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
    }
}

impl AppState {
    /// Whether `model` asks the router to choose.
    pub(super) fn is_router_alias(&self, model: Option<&str>) -> bool {
        model.is_some_and(|m| self.routing.aliases.iter().any(|a| a == m))
    }

    /// Routes a parsed request (on its first prompt), counting it in the metrics.
    pub(super) async fn route(&self, req: &GenRequest, api: Api, caller: &Caller) -> Result<Routed, ApiError> {
        let t = Instant::now();
        let router = self.sched.router.clone();
        let prompt_param = if api == Api::Chat { "messages" } else { "prompt" };
        let prompt = req.prompts.first().ok_or_else(|| ApiError::invalid_param(prompt_param, "no prompt to route"))?;
        let input = &self.sched.input;
        let ids = input.tokenize(prompt).map_err(|e| ApiError::from_input(&e, prompt_param))?;
        // The checks generation makes (empty, over the context), before any model work.
        let mut params = req.params.clone();
        params.max_tokens = params.max_tokens.map(|m| m.min(input.max_model_len().saturating_sub(ids.len().min(input.max_model_len()))));
        input.process_tokens(None, ids, prompt, params).map_err(|e| ApiError::from_input(&e, prompt_param))?;
        let allowed = caller.clone();
        if !router.routable().iter().any(|n| allowed.may_use(n)) {
            return Err(ApiError::invalid_param(
                "model",
                format!(
                    "'{}' picks an adapter by its routing examples, but no adapter you may use has any (add a routing.json beside the adapter, or a \"routing\" object to /v1/load_lora_adapter)",
                    req.model.as_deref().unwrap_or("auto")
                ),
            ));
        }
        let prompt = prompt.clone();
        let decision = tokio::task::spawn_blocking(move || router.route(&prompt, &|n: &str| allowed.may_use(n)))
            .await
            .map_err(|e| ApiError::internal(format!("the router failed: {e}")))?
            .map_err(|e| ApiError::from_input(&e, prompt_param))?;
        let best = decision.best().map(|b| b.0.clone());
        let (model, fallback) = match best {
            Some(b) if !decision.fallback => (b, false),
            // A fallback adapter the caller may not use is not offered: the base model serves.
            _ => (self.routing.fallback.clone().filter(|f| caller.may_use(f)).unwrap_or_else(|| self.base_name.clone()), true),
        };
        let lora = (model != self.base_name).then(|| LoraRequest::new(model.clone()));
        self.metrics.route_seconds.observe(t.elapsed().as_secs_f64());
        self.metrics.route_requests.with_label_values(&[&model]).inc();
        if fallback {
            self.metrics.route_fallbacks.inc();
        }
        Ok(Routed { model, lora, decision, fallback })
    }
}

#[derive(Serialize)]
struct Candidate {
    model: String,
    score: f32,
}

#[derive(Serialize)]
struct RouteAnswer {
    model: String,
    candidates: Vec<Candidate>,
    confidence: f32,
    fallback: bool,
    unroutable: Vec<String>,
}

/// `POST /v1/route`: a chat (with `messages`) or completions body; the ranking, no generation.
pub(super) async fn route(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let r = route_inner(&st, &headers, body).await;
    st.respond(r)
}

async fn route_inner(st: &AppState, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
    let caller = st.auth.check(headers)?;
    let bytes = st.read_body(headers, body).await?;
    let is_chat = serde_json::from_slice::<serde_json::Value>(&bytes)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?
        .get("messages")
        .is_some();
    let api = if is_chat { Api::Chat } else { Api::Completions };
    let max_len = st.sched.input.max_model_len();
    let req = if is_chat { openai::parse_chat(&bytes, max_len)? } else { openai::parse_completion(&bytes, max_len)? };
    if is_chat && st.sched.input.chat_template().is_none() {
        return Err(ApiError::bad_request("this model has no chat template: route a completions body with a plain prompt"));
    }
    let routed = st.route(&req, api, &caller).await?;
    let routable = st.sched.router.routable();
    let unroutable = st
        .sched
        .shared
        .adapters()
        .into_iter()
        .map(|a| a.name)
        .filter(|n| caller.may_use(n) && !routable.contains(n))
        .collect();
    let header = routed.header();
    let answer = RouteAnswer {
        model: routed.model,
        candidates: routed.decision.candidates.into_iter().map(|(model, score)| Candidate { model, score }).collect(),
        confidence: routed.decision.confidence,
        fallback: routed.fallback,
        unroutable,
    };
    let mut resp = json_response(&answer);
    resp.headers_mut().insert(ROUTE_HEADER, header);
    Ok(resp)
}
