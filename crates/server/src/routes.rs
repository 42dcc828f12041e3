//! HTTP routes: the OpenAI endpoints (chat, completions, models), vLLM's adapter
//! load/unload, health and metrics. Handlers parse and check the request, hand it to the
//! batch loop and turn its events into a JSON response or an SSE stream.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::stream::{self, SelectAll, Stream, StreamExt};
use loramux_engine::lora::LoraModel;
use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::adapters::{check_adapter_name, find_in_lora_dirs, resolve_adapter_path};
use crate::auth::{Auth, Caller};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::openai::{self, Api, Fields, GenRequest};
use crate::scheduler::{Event, Finish, InsertOutcome, Job, SchedulerHandle, TokenLogprob};

/// What every handler shares.
pub struct AppState {
    pub sched: SchedulerHandle,
    pub auth: Auth,
    pub metrics: Arc<Metrics>,
    pub base_name: String,
    /// Canonical `--lora-dir`s (adapters found by folder name).
    pub lora_dirs: Vec<PathBuf>,
    /// Canonical roots `load_lora_adapter` may read from.
    pub adapter_roots: Vec<PathBuf>,
    pub lora_updates: bool,
    pub max_body: usize,
    pub created: u64,
}

/// The router over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ping", get(health))
        .route("/version", get(version))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*id}", get(get_model))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/load_lora_adapter", post(load_lora))
        .route("/v1/unload_lora_adapter", post(unload_lora))
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// A JSON body with status 200.
fn json_response(v: &Value) -> Response {
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

async fn health(State(st): State<Arc<AppState>>) -> Response {
    if !st.sched.shared.is_alive() {
        return ApiError::unavailable("the batch loop has stopped").into_response();
    }
    if st.sched.shared.is_draining() {
        return ApiError::unavailable("the server is shutting down").into_response();
    }
    StatusCode::OK.into_response()
}

async fn version() -> Response {
    json_response(&json!({ "version": env!("CARGO_PKG_VERSION") }))
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"))],
        st.metrics.render(),
    )
        .into_response()
}

fn model_card(st: &AppState, id: &str, root: &str, parent: Option<&str>) -> Value {
    json!({
        "id": id,
        "object": "model",
        "created": st.created,
        "owned_by": "loramux",
        "root": root,
        "parent": parent,
        "max_model_len": st.sched.info.max_model_len,
        "permission": [],
    })
}

fn model_cards(st: &AppState) -> Vec<Value> {
    let base_root = st.sched.info.location.path().display().to_string();
    let mut data = vec![model_card(st, &st.base_name, &base_root, None)];
    for a in st.sched.shared.adapters() {
        data.push(model_card(st, &a.name, &a.path.display().to_string(), Some(&st.base_name)));
    }
    data
}

async fn list_models(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let r = st.auth.check(&headers).map(|_| json_response(&json!({ "object": "list", "data": model_cards(&st) })));
    st.respond(r)
}

async fn get_model(State(st): State<Arc<AppState>>, headers: HeaderMap, UrlPath(id): UrlPath<String>) -> Response {
    let r = st.auth.check(&headers).and_then(|_| {
        model_cards(&st)
            .into_iter()
            .find(|c| c["id"] == id.as_str())
            .map(|c| json_response(&c))
            .ok_or_else(|| ApiError::model_not_found(&id))
    });
    st.respond(r)
}

/// Which adapter a request runs with.
struct Target {
    adapter: Option<String>,
    discovered: Option<PathBuf>,
    /// Name echoed in responses and used as the metrics label.
    model: String,
}

fn resolve_target(st: &AppState, requested: Option<&str>, caller: &Caller) -> Result<Target, ApiError> {
    let named = requested.filter(|m| *m != st.base_name);
    let adapter = match named {
        Some(n) => Some(n.to_string()),
        None => caller.default_adapter.clone(),
    };
    let Some(a) = adapter else {
        return Ok(Target { adapter: None, discovered: None, model: st.base_name.clone() });
    };
    if st.sched.shared.has_adapter(&a) {
        return Ok(Target { adapter: Some(a.clone()), discovered: None, model: a });
    }
    if let Some(p) = find_in_lora_dirs(&st.lora_dirs, &a) {
        return Ok(Target { adapter: Some(a.clone()), discovered: Some(p), model: a });
    }
    Err(ApiError::model_not_found(&a))
}

async fn chat(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let r = generate(&st, &headers, body, Api::Chat).await;
    st.respond(r)
}

async fn completions(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let r = generate(&st, &headers, body, Api::Completions).await;
    st.respond(r)
}

async fn generate(st: &Arc<AppState>, headers: &HeaderMap, body: Body, api: Api) -> Result<Response, ApiError> {
    let caller = st.auth.check(headers)?;
    let bytes = read_body(headers, body, st.max_body).await?;
    let info = &st.sched.info;
    let req = match api {
        Api::Chat => openai::parse_chat(&bytes, info.max_model_len)?,
        Api::Completions => openai::parse_completion(&bytes, info.max_model_len)?,
    };
    if api == Api::Chat && !info.has_chat_template {
        return Err(ApiError::bad_request("this model has no chat template: use /v1/completions with a plain prompt"));
    }
    let target = resolve_target(st, req.model.as_deref(), &caller)?;
    let prompt_param = if api == Api::Chat { "messages" } else { "prompt" };
    let mut receivers = Vec::with_capacity(req.prompts.len() * req.n);
    for prompt in &req.prompts {
        for j in 0..req.n {
            let mut params = req.params.clone();
            params.seed = params.seed.map(|s| s.wrapping_add(j as u64));
            let job = Job {
                adapter: target.adapter.clone(),
                discovered_path: target.discovered.clone(),
                label: target.model.clone(),
                prompt: prompt.clone(),
                params,
                max_tokens: req.max_tokens,
                prompt_param,
            };
            receivers.push(st.sched.submit(job)?);
        }
    }
    // Every choice is checked (tokenized, lengths) before answering, so errors get a status.
    let mut prompt_tokens = 0;
    for (i, rx) in receivers.iter_mut().enumerate() {
        match rx.recv().await {
            Some(Event::Accepted { prompt_tokens: p }) => {
                if i % req.n == 0 {
                    prompt_tokens += p;
                }
            }
            Some(Event::Error(e)) => return Err(e),
            _ => return Err(ApiError::unavailable("the batch loop has stopped")),
        }
    }
    let meta = Meta {
        api,
        id: random_id(if api == Api::Chat { "chatcmpl" } else { "cmpl" }),
        created: now_secs(),
        model: target.model,
        prompt_tokens,
    };
    if req.stream {
        Ok(stream_response(st.clone(), meta, &req, receivers))
    } else {
        collect_response(meta, &req, receivers).await
    }
}

struct Meta {
    api: Api,
    id: String,
    created: u64,
    model: String,
    prompt_tokens: usize,
}

#[derive(Default)]
struct ChoiceAcc {
    text: String,
    logprobs: Vec<TokenLogprob>,
    finish: Option<Finish>,
    completion_tokens: usize,
}

async fn collect_response(meta: Meta, req: &GenRequest, receivers: Vec<UnboundedReceiver<Event>>) -> Result<Response, ApiError> {
    let mut choices = Vec::with_capacity(receivers.len());
    for mut rx in receivers {
        let mut acc = ChoiceAcc::default();
        loop {
            match rx.recv().await {
                Some(Event::Delta { text, logprobs, .. }) => {
                    acc.text.push_str(&text);
                    acc.logprobs.extend(logprobs);
                }
                Some(Event::Done { finish, completion_tokens, .. }) => {
                    acc.finish = Some(finish);
                    acc.completion_tokens = completion_tokens;
                    break;
                }
                Some(Event::Accepted { .. }) => {}
                Some(Event::Error(e)) => return Err(e),
                None => return Err(ApiError::unavailable("the request was cancelled")),
            }
        }
        choices.push(acc);
    }
    let completion_tokens: usize = choices.iter().map(|c| c.completion_tokens).sum();
    let want_logprobs = req.logprobs.is_some();
    let body = match meta.api {
        Api::Chat => json!({
            "id": meta.id,
            "object": "chat.completion",
            "created": meta.created,
            "model": meta.model,
            "choices": choices.iter().enumerate().map(|(i, c)| json!({
                "index": i,
                "message": { "role": "assistant", "content": c.text },
                "logprobs": if want_logprobs { openai::chat_logprobs(&c.logprobs) } else { Value::Null },
                "finish_reason": c.finish.map(Finish::as_str),
            })).collect::<Vec<_>>(),
            "usage": openai::usage(meta.prompt_tokens, completion_tokens),
        }),
        Api::Completions => json!({
            "id": meta.id,
            "object": "text_completion",
            "created": meta.created,
            "model": meta.model,
            "choices": choices.iter().enumerate().map(|(i, c)| json!({
                "index": i,
                "text": c.text,
                "logprobs": if want_logprobs { openai::completion_logprobs(&c.logprobs, 0) } else { Value::Null },
                "finish_reason": c.finish.map(Finish::as_str),
            })).collect::<Vec<_>>(),
            "usage": openai::usage(meta.prompt_tokens, completion_tokens),
        }),
    };
    Ok(json_response(&body))
}

type Tagged = Box<dyn Stream<Item = (usize, Event)> + Send + Unpin>;

fn tagged(i: usize, mut rx: UnboundedReceiver<Event>) -> Tagged {
    Box::new(stream::poll_fn(move |cx| rx.poll_recv(cx).map(|e| e.map(|e| (i, e)))))
}

/// Turns choice events into SSE frames.
struct SseState {
    st: Arc<AppState>,
    meta: Meta,
    events: SelectAll<Tagged>,
    include_usage: bool,
    continuous_usage: bool,
    want_logprobs: bool,
    started: bool,
    open: usize,
    text_len: Vec<usize>,
    /// Where the next token starts in each choice's text (completions logprobs).
    token_offset: Vec<usize>,
    completion_tokens: Vec<usize>,
    finished: bool,
}

fn frame(v: &Value) -> String {
    format!("data: {v}\n\n")
}

impl SseState {
    fn usage(&self) -> Value {
        openai::usage(self.meta.prompt_tokens, self.completion_tokens.iter().sum())
    }

    fn chunk(&self, choice: Value) -> Value {
        let object = if self.meta.api == Api::Chat { "chat.completion.chunk" } else { "text_completion" };
        let mut v = json!({
            "id": self.meta.id,
            "object": object,
            "created": self.meta.created,
            "model": self.meta.model,
            "choices": [choice],
        });
        if self.continuous_usage {
            v["usage"] = self.usage();
        } else if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    fn opening(&self) -> String {
        if self.meta.api != Api::Chat {
            return String::new();
        }
        (0..self.text_len.len())
            .map(|i| {
                frame(&self.chunk(json!({
                    "index": i,
                    "delta": { "role": "assistant", "content": "" },
                    "logprobs": Value::Null,
                    "finish_reason": Value::Null,
                })))
            })
            .collect()
    }

    fn on_event(&mut self, i: usize, ev: Event) -> String {
        match ev {
            Event::Accepted { .. } => String::new(),
            Event::Delta { text, tokens, logprobs } => {
                self.completion_tokens[i] += tokens;
                let lp = if self.want_logprobs && !logprobs.is_empty() {
                    match self.meta.api {
                        Api::Chat => openai::chat_logprobs(&logprobs),
                        Api::Completions => openai::completion_logprobs(&logprobs, self.token_offset[i]),
                    }
                } else {
                    Value::Null
                };
                self.text_len[i] += text.len();
                self.token_offset[i] += logprobs.iter().map(|t| t.token.len()).sum::<usize>();
                let choice = match self.meta.api {
                    Api::Chat => json!({ "index": i, "delta": { "content": text }, "logprobs": lp, "finish_reason": Value::Null }),
                    Api::Completions => json!({ "index": i, "text": text, "logprobs": lp, "finish_reason": Value::Null }),
                };
                frame(&self.chunk(choice))
            }
            Event::Done { finish, completion_tokens, .. } => {
                self.completion_tokens[i] = completion_tokens;
                let choice = match self.meta.api {
                    Api::Chat => json!({ "index": i, "delta": {}, "logprobs": Value::Null, "finish_reason": finish.as_str() }),
                    Api::Completions => json!({ "index": i, "text": "", "logprobs": Value::Null, "finish_reason": finish.as_str() }),
                };
                let mut out = frame(&self.chunk(choice));
                self.open -= 1;
                if self.open == 0 {
                    if self.include_usage {
                        let object = if self.meta.api == Api::Chat { "chat.completion.chunk" } else { "text_completion" };
                        out.push_str(&frame(&json!({
                            "id": self.meta.id,
                            "object": object,
                            "created": self.meta.created,
                            "model": self.meta.model,
                            "choices": [],
                            "usage": self.usage(),
                        })));
                    }
                    out.push_str("data: [DONE]\n\n");
                    self.finished = true;
                }
                out
            }
            Event::Error(e) => self.error(e),
        }
    }

    fn error(&mut self, e: ApiError) -> String {
        self.st.metrics.error(e.status.as_u16());
        self.finished = true;
        format!("{}data: [DONE]\n\n", frame(&e.body()))
    }
}

fn stream_response(st: Arc<AppState>, meta: Meta, req: &GenRequest, receivers: Vec<UnboundedReceiver<Event>>) -> Response {
    let n = receivers.len();
    let state = SseState {
        st,
        meta,
        events: stream::select_all(receivers.into_iter().enumerate().map(|(i, rx)| tagged(i, rx))),
        include_usage: req.include_usage,
        continuous_usage: req.continuous_usage,
        want_logprobs: req.logprobs.is_some(),
        started: false,
        open: n,
        text_len: vec![0; n],
        token_offset: vec![0; n],
        completion_tokens: vec![0; n],
        finished: false,
    };
    let body = stream::unfold(state, |mut s| async move {
        if s.finished {
            return None;
        }
        let mut out = String::new();
        if !s.started {
            s.started = true;
            out = s.opening();
            if !out.is_empty() {
                return Some((Ok::<_, Infallible>(Bytes::from(out)), s));
            }
        }
        while out.is_empty() {
            out = match s.events.next().await {
                Some((i, ev)) => s.on_event(i, ev),
                None => s.error(ApiError::unavailable("the request was cancelled")),
            };
        }
        Some((Ok(Bytes::from(out)), s))
    });
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream")),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

async fn load_lora(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let r = load_lora_inner(&st, &headers, body).await;
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

async fn load_lora_inner(st: &Arc<AppState>, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
    lora_updates_enabled(st)?;
    st.auth.check_admin(headers)?;
    let bytes = read_body(headers, body, st.max_body).await?;
    let mut f = Fields::parse(&bytes)?;
    let name = f.string("lora_name")?.ok_or_else(|| ApiError::invalid_param("lora_name", "'lora_name' is required"))?;
    let path = f.string("lora_path")?.ok_or_else(|| ApiError::invalid_param("lora_path", "'lora_path' is required"))?;
    let replace = f.bool("load_inplace")?.unwrap_or(false);
    f.finish()?;
    check_adapter_name(&name)?;
    if name == st.base_name {
        return Err(ApiError::invalid_param("lora_name", format!("'{name}' is the base model's name")));
    }
    if !replace && st.sched.shared.has_adapter(&name) {
        return Err(ApiError::invalid_param("lora_name", format!("The lora adapter '{name}' has already been loaded.")));
    }
    let dir = resolve_adapter_path(&st.adapter_roots, &path)?;
    let info = st.sched.info.clone();
    let t = Instant::now();
    let read_name = name.clone();
    let read_dir = dir.clone();
    let loaded = tokio::task::spawn_blocking(move || LoraModel::load(&read_name, &read_dir, &info.shapes, info.max_lora_rank))
        .await
        .map_err(|e| ApiError::internal(format!("adapter reader failed: {e}")))?;
    let seconds = t.elapsed().as_secs_f64();
    let model = match loaded {
        Ok(m) => m,
        Err(e) => {
            st.metrics.adapter_load_failures.inc();
            tracing::warn!(adapter = %name, path = %dir.display(), "adapter load refused: {e}");
            return Err(ApiError::from_engine(&e).with_param("lora_path"));
        }
    };
    st.metrics.adapter_load_latency.observe(seconds);
    let outcome = st.sched.insert_adapter(model, seconds, replace).await?;
    tracing::info!(adapter = %name, path = %dir.display(), ms = format!("{:.1}", seconds * 1e3), ?outcome, "load_lora_adapter");
    let msg = match outcome {
        InsertOutcome::Resident => format!("Success: LoRA adapter '{name}' added successfully."),
        InsertOutcome::Registered => {
            format!("Success: LoRA adapter '{name}' added successfully (all adapter slots are busy: it becomes resident on first use).")
        }
    };
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], msg).into_response())
}

async fn unload_lora(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        lora_updates_enabled(&st)?;
        st.auth.check_admin(&headers)?;
        let bytes = read_body(&headers, body, st.max_body).await?;
        let mut f = Fields::parse(&bytes)?;
        let name = f.string("lora_name")?.ok_or_else(|| ApiError::invalid_param("lora_name", "'lora_name' is required"))?;
        f.ignore(&["lora_int_id"]);
        f.finish()?;
        st.sched.unload_adapter(&name).await?;
        Ok((StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], format!("Success: LoRA adapter '{name}' removed successfully."))
            .into_response())
    }
    .await;
    st.respond(r)
}
