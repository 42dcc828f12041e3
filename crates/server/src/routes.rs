//! HTTP routes: the OpenAI endpoints (chat, completions, models), vLLM's adapter
//! load/unload, health and metrics. Handlers parse and check the request, hand it to the
//! batch loop and turn its events into a JSON response or an SSE stream.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::stream::{self, SelectAll, Stream, StreamExt};
use loramux_engine::{FinishReason, LoraRequest};
use rand::Rng;
use serde::Serialize;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::adapters::{check_adapter_name, resolve_adapter_path};
use crate::auth::{Auth, Caller};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::openai::{self, Api, Fields, GenRequest};
use crate::protocol::{
    ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatDelta, ChatLogprobs, ChatMessageOut, Completion,
    CompletionChoice, CompletionLogprobs, ModelCard, ModelList, Role, TokenLogprob, Usage, Version,
};
use crate::scheduler::{Event, InsertOutcome, Job, SchedulerHandle};

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
        match tokio::time::timeout(self.http_read_timeout, read_body(headers, body, self.max_body)).await {
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
    json_response(&Version { version: env!("CARGO_PKG_VERSION").to_string() })
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"))],
        st.metrics.render(),
    )
        .into_response()
}

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

fn model_cards(st: &AppState) -> Vec<ModelCard> {
    let mut data = vec![model_card(st, &st.base_name, None)];
    for a in st.sched.shared.adapters() {
        data.push(model_card(st, &a.name, Some(&st.base_name)));
    }
    data
}

async fn list_models(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let r = st.auth.check(&headers).map(|_| json_response(&ModelList { data: model_cards(&st) }));
    st.respond(r)
}

async fn get_model(State(st): State<Arc<AppState>>, headers: HeaderMap, UrlPath(id): UrlPath<String>) -> Response {
    let r = st.auth.check(&headers).and_then(|_| {
        model_cards(&st)
            .into_iter()
            .find(|c| c.id == id)
            .map(|c| json_response(&c))
            .ok_or_else(|| ApiError::model_not_found(&id))
    });
    st.respond(r)
}

/// Which adapter a request runs with: the one `model` names, else the caller's default,
/// else the base model. Whether the adapter exists is the batch loop's answer.
struct Target {
    lora: Option<LoraRequest>,
    /// Name echoed in responses and used as the metrics label.
    model: String,
}

fn resolve_target(st: &AppState, requested: Option<&str>, caller: &Caller) -> Target {
    let named = requested.filter(|m| *m != st.base_name);
    match named.map(str::to_string).or_else(|| caller.default_adapter.clone()) {
        Some(a) => Target { lora: Some(LoraRequest::new(a.clone())), model: a },
        None => Target { lora: None, model: st.base_name.clone() },
    }
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
    let bytes = st.read_body(headers, body).await?;
    let input = &st.sched.input;
    let req = match api {
        Api::Chat => openai::parse_chat(&bytes, input.max_model_len())?,
        Api::Completions => openai::parse_completion(&bytes, input.max_model_len())?,
    };
    if api == Api::Chat && input.chat_template().is_none() {
        return Err(ApiError::bad_request("this model has no chat template: use /v1/completions with a plain prompt"));
    }
    let target = resolve_target(st, req.model.as_deref(), &caller);
    let prompt_param = if api == Api::Chat { "messages" } else { "prompt" };
    let deadline = st.request_timeout.map(|t| Instant::now() + t);
    // Tokenized and checked here, on the handler's thread: the batch loop only schedules.
    let mut jobs = Vec::with_capacity(req.prompts.len() * req.n);
    for prompt in &req.prompts {
        let ids = input.tokenize(prompt).map_err(|e| ApiError::from_input(&e, prompt_param))?;
        for j in 0..req.n {
            let mut params = req.params.clone();
            params.seed = params.seed.map(|s| s.wrapping_add(j as u64));
            let request = input
                .process_tokens(target.lora.clone(), ids.clone(), prompt, params)
                .map_err(|e| ApiError::from_input(&e, prompt_param))?;
            jobs.push(Job { request, label: target.model.clone(), deadline });
        }
    }
    let mut receivers = Vec::with_capacity(jobs.len());
    for job in jobs {
        receivers.push(st.sched.submit(job)?);
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
    finish: Option<FinishReason>,
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
    let usage = Usage::new(meta.prompt_tokens, choices.iter().map(|c| c.completion_tokens).sum());
    let want_logprobs = req.logprobs.is_some();
    let (id, created, model) = (meta.id, meta.created, meta.model);
    let choices = choices.into_iter().enumerate();
    Ok(match meta.api {
        Api::Chat => json_response(&ChatCompletion {
            id,
            created,
            model,
            choices: choices
                .map(|(index, c)| ChatChoice {
                    index,
                    message: ChatMessageOut { role: Role::Assistant, content: c.text },
                    logprobs: want_logprobs.then(|| ChatLogprobs::new(c.logprobs)),
                    finish_reason: c.finish,
                })
                .collect(),
            usage,
        }),
        Api::Completions => json_response(&Completion {
            id,
            created,
            model,
            choices: choices
                .map(|(index, c)| CompletionChoice {
                    index,
                    text: c.text,
                    logprobs: want_logprobs.then(|| CompletionLogprobs::new(c.logprobs, 0)),
                    finish_reason: c.finish,
                })
                .collect(),
            usage: Some(Some(usage)),
        }),
    })
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
    /// Where the next token starts in each choice's text (completions logprobs).
    token_offset: Vec<usize>,
    completion_tokens: Vec<usize>,
    finished: bool,
}

/// One SSE event.
fn frame(v: &impl Serialize) -> String {
    format!("data: {}\n\n", serde_json::to_string(v).unwrap_or_default())
}

impl SseState {
    fn usage(&self) -> Usage {
        Usage::new(self.meta.prompt_tokens, self.completion_tokens.iter().sum())
    }

    /// A chunk's `usage`: the running counts, `null`, or left out (see [`ChatCompletionChunk::usage`]).
    fn chunk_usage(&self) -> Option<Option<Usage>> {
        if self.continuous_usage {
            Some(Some(self.usage()))
        } else if self.include_usage {
            Some(None)
        } else {
            None
        }
    }

    /// A chat chunk frame.
    fn chat_frame(&self, choices: Vec<ChatChunkChoice>, usage: Option<Option<Usage>>) -> String {
        frame(&ChatCompletionChunk { id: self.meta.id.clone(), created: self.meta.created, model: self.meta.model.clone(), choices, usage })
    }

    /// A completions chunk frame.
    fn completion_frame(&self, choices: Vec<CompletionChoice>, usage: Option<Option<Usage>>) -> String {
        frame(&Completion { id: self.meta.id.clone(), created: self.meta.created, model: self.meta.model.clone(), choices, usage })
    }

    /// The frame for a piece of choice `i`: new text (`None` in chat's last chunk, whose delta
    /// is empty), the logprobs of its tokens, or the finish reason.
    fn choice_frame(&self, i: usize, text: Option<String>, logprobs: Vec<TokenLogprob>, finish_reason: Option<FinishReason>) -> String {
        let logprobs = (self.want_logprobs && !logprobs.is_empty()).then_some(logprobs);
        match self.meta.api {
            Api::Chat => {
                let choice = ChatChunkChoice {
                    index: i,
                    delta: ChatDelta { role: None, content: text },
                    logprobs: logprobs.map(ChatLogprobs::new),
                    finish_reason,
                };
                self.chat_frame(vec![choice], self.chunk_usage())
            }
            Api::Completions => {
                let choice = CompletionChoice {
                    index: i,
                    text: text.unwrap_or_default(),
                    logprobs: logprobs.map(|l| CompletionLogprobs::new(l, self.token_offset[i])),
                    finish_reason,
                };
                self.completion_frame(vec![choice], self.chunk_usage())
            }
        }
    }

    /// Chat's first chunk per choice names the role.
    fn opening(&self) -> String {
        if self.meta.api != Api::Chat {
            return String::new();
        }
        (0..self.completion_tokens.len())
            .map(|i| {
                let choice = ChatChunkChoice {
                    index: i,
                    delta: ChatDelta { role: Some(Role::Assistant), content: Some(String::new()) },
                    logprobs: None,
                    finish_reason: None,
                };
                self.chat_frame(vec![choice], self.chunk_usage())
            })
            .collect()
    }

    fn on_event(&mut self, i: usize, ev: Event) -> String {
        match ev {
            Event::Accepted { .. } => String::new(),
            Event::Delta { text, tokens, logprobs } => {
                self.completion_tokens[i] += tokens;
                let advance: usize = logprobs.iter().map(|t| t.token.len()).sum();
                let out = self.choice_frame(i, Some(text), logprobs, None);
                self.token_offset[i] += advance;
                out
            }
            Event::Done { finish, completion_tokens, .. } => {
                self.completion_tokens[i] = completion_tokens;
                let mut out = self.choice_frame(i, None, Vec::new(), Some(finish));
                self.open -= 1;
                if self.open == 0 {
                    if self.include_usage {
                        let usage = Some(Some(self.usage()));
                        out.push_str(&match self.meta.api {
                            Api::Chat => self.chat_frame(Vec::new(), usage),
                            Api::Completions => self.completion_frame(Vec::new(), usage),
                        });
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
    let bytes = st.read_body(headers, body).await?;
    let mut f = Fields::parse(&bytes)?;
    let name = f.string("lora_name")?.ok_or_else(|| ApiError::invalid_param("lora_name", "'lora_name' is required"))?;
    let path = f.string("lora_path")?.ok_or_else(|| ApiError::invalid_param("lora_path", "'lora_path' is required"))?;
    let replace = f.bool("load_inplace")?.unwrap_or(false);
    f.finish()?;
    check_adapter_name(&name)?;
    let dir = resolve_adapter_path(&st.adapter_roots, &path)?;
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
        let bytes = st.read_body(&headers, body).await?;
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
