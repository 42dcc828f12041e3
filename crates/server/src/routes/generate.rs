//! `POST /v1/chat/completions` and `POST /v1/completions`: parse, pick the adapter, tokenize
//! and check every choice on the handler's thread, submit the jobs to the batch loop, then
//! answer whole ([`collect_response`]) or streamed ([`super::sse::stream_response`]).

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;
use futures_util::stream::StreamExt;
use loramux_engine::{FairShare, FinishReason, LoraRequest, ProcessedRequest, Prompt, ResponseFormat};
use tokio::sync::mpsc::UnboundedReceiver;

use super::choices::{Echo, Meta, Piece};
use super::sse::stream_response;
use super::{now_secs, random_id, AppState};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::openai::{self, Api, GenRequest};
use crate::protocol::{PromptLogprobs, TokenLogprob, Usage};
use crate::scheduler::{Event, Job};
use crate::tenants::{Admission, Cost};

pub(super) async fn chat(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let r = generate(&st, &headers, body, Api::Chat).await;
    st.respond(r)
}

pub(super) async fn completions(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let r = generate(&st, &headers, body, Api::Completions).await;
    st.respond(r)
}

/// Which adapter a request runs with: the one `model` names, else the caller's default,
/// else the base model. Whether the adapter exists is the batch loop's answer.
pub(super) struct Target {
    pub lora: Option<LoraRequest>,
    /// Name echoed in responses and used as the metrics label.
    pub model: String,
}

pub(super) fn resolve_target(st: &AppState, requested: Option<&str>, caller: &Caller) -> Target {
    let named = requested.filter(|m| *m != st.base_name);
    match named.map(str::to_string).or_else(|| caller.default_adapter.clone()) {
        Some(a) => Target { lora: Some(LoraRequest::new(a.clone())), model: a },
        None => Target { lora: None, model: st.base_name.clone() },
    }
}

async fn generate(st: &Arc<AppState>, headers: &HeaderMap, body: Body, api: Api) -> Result<Response, ApiError> {
    let caller = st.auth.check(headers)?;
    let bytes = st.read_body(headers, body).await?;
    let Started { req, meta, receivers, admission, route_header } = start(st, &caller, &bytes, api).await?;
    let mut resp = if req.stream {
        held_until_sent(stream_response(st.clone(), meta, &req, receivers), admission)
    } else {
        collect_response(meta, &req, receivers).await?
    };
    with_route_header(&mut resp, route_header);
    Ok(resp)
}

/// A request the batch loop accepted: its choices' events and what answering needs.
pub(super) struct Started {
    pub req: GenRequest,
    pub meta: Meta,
    pub receivers: Vec<UnboundedReceiver<Event>>,
    /// The tenant's admission, held until the answer is sent.
    pub admission: Admission,
    /// `x-loramux-route`, when `model: "auto"` picked the adapter.
    pub route_header: Option<HeaderValue>,
}

/// Adds the routing decision's header, if any.
pub(super) fn with_route_header(resp: &mut Response, header: Option<HeaderValue>) {
    if let Some(h) = header {
        resp.headers_mut().insert(super::route::ROUTE_HEADER, h);
    }
}

/// Parses a body of `api`, picks the adapter (or routes `auto`), admits the caller and
/// submits every choice; returns once the batch loop accepted them all.
pub(super) async fn start(st: &Arc<AppState>, caller: &Caller, bytes: &[u8], api: Api) -> Result<Started, ApiError> {
    let req = parse(st, bytes, api)?;
    let (target, route_header) = if st.is_router_alias(req.model.as_deref()) {
        let routed = st.route(&req, api, caller).await?;
        let header = routed.header();
        (Target { lora: routed.lora, model: routed.model }, Some(header))
    } else {
        (resolve_target(st, req.model.as_deref(), caller), None)
    };
    let requests = processed(st, &req, &target, api)?;
    let admission = admit(st, caller, &target, cost(&requests, req.best_of)).await?;
    let mut receivers = submit_all(st, caller, &target, &admission, requests)?;
    let prompt_tokens = accepted(&mut receivers, req.best_of).await?;
    let meta = Meta {
        api,
        id: random_id(if api == Api::Chat { "chatcmpl" } else { "cmpl" }),
        created: now_secs(),
        model: target.model,
        prompt_tokens,
    };
    Ok(Started { req, meta, receivers, admission, route_header })
}

/// Admits `caller`'s request for `target` (its tenant's limits), then checks that the tenant
/// may use the adapter (after the same checks and admission as a name nobody knows, and
/// answered the same), and finds an adapter nobody knows yet under a `--lora-dir` URI
/// (fetched and loaded now, one fetch however many requests wait for it, off the batch loop).
pub(super) async fn admit(st: &AppState, caller: &Caller, target: &Target, cost: Cost) -> Result<Admission, ApiError> {
    let admission = st.auth.tenants().admit(caller, cost, &st.metrics)?;
    if target.lora.is_some() && !caller.may_use(&target.model) {
        st.metrics.tenant_refusals.with_label_values(&[caller.label(), "adapter_not_allowed"]).inc();
        return Err(ApiError::model_not_found(&target.model));
    }
    if let Some(lora) = &target.lora {
        st.sources.resolve_unknown(&st.sched, &lora.lora_name).await?;
    }
    Ok(admission)
}

/// Submits each request to the batch loop as `caller`'s (its tenant's fair share), with the
/// server's request deadline; returns each one's event stream.
pub(super) fn submit_all(
    st: &AppState,
    caller: &Caller,
    target: &Target,
    admission: &Admission,
    requests: Vec<ProcessedRequest>,
) -> Result<Vec<UnboundedReceiver<Event>>, ApiError> {
    let deadline = st.request_timeout.map(|t| Instant::now() + t);
    let share = caller.tenant.as_ref().map(|t| FairShare { client: Arc::from(t.name.as_str()), weight: t.weight });
    let mut receivers = Vec::with_capacity(requests.len());
    for request in requests {
        let request = match &share {
            Some(s) => request.with_share(s.clone()),
            None => request,
        };
        let job = Job { request, label: target.model.clone(), tenant: admission.tenant.clone(), deadline };
        receivers.push(st.sched.submit(job, &st.metrics)?);
    }
    Ok(receivers)
}

/// A streamed answer that holds the tenant's admission until its last byte is sent or the
/// client leaves (the body is dropped either way).
pub(super) fn held_until_sent(resp: Response, admission: Admission) -> Response {
    resp.map(|body| {
        Body::from_stream(body.into_data_stream().map(move |chunk| {
            let _held = &admission;
            chunk
        }))
    })
}

/// What a request costs against its tenant's token limit: each prompt once (choices `n` at a
/// time share it), and every choice's `max_tokens`.
fn cost(requests: &[ProcessedRequest], n: usize) -> Cost {
    Cost {
        prompt: requests.iter().step_by(n.max(1)).map(|r| r.prompt_ids().len() as u64).sum(),
        completion: requests.iter().map(|r| r.max_tokens() as u64).sum(),
    }
}

/// The request, parsed and checked against the model (its length, its chat template).
fn parse(st: &AppState, bytes: &[u8], api: Api) -> Result<GenRequest, ApiError> {
    let input = &st.sched.input;
    let mut req = match api {
        Api::Chat => openai::parse_chat(bytes, input.max_model_len())?,
        Api::Completions => openai::parse_completion(bytes, input.max_model_len())?,
    };
    if api == Api::Chat {
        let Some(template) = input.chat_template() else {
            return Err(ApiError::bad_request("this model has no chat template: use /v1/completions with a plain prompt"));
        };
        if let Some(Prompt::Chat(messages)) = req.prompts.first_mut() {
            openai::tools::prepare(messages, req.tools.as_mut(), template.handles_tools());
        }
    }
    Ok(req)
}

/// One request per choice (`best_of`, else `n`, per prompt, seeds counted up), tokenized and checked here, on
/// the handler's thread: the batch loop only schedules.
fn processed(st: &AppState, req: &GenRequest, target: &Target, api: Api) -> Result<Vec<ProcessedRequest>, ApiError> {
    let input = &st.sched.input;
    let prompt_param = if api == Api::Chat { "messages" } else { "prompt" };
    if let Some(tools) = req.tools.as_ref().filter(|t| t.forced_schema().is_none()) {
        // `auto` compiles no grammar: the tools' schemas are checked here all the same.
        let format = ResponseFormat::JsonSchema(tools.any_call_schema());
        input.grammar(&format).map_err(|e| ApiError::from_input(&e, prompt_param).with_param("tools"))?;
    }
    let mut requests = Vec::with_capacity(req.prompts.len() * req.best_of);
    for prompt in &req.prompts {
        let ids = match (prompt, req.tools.as_ref().and_then(|t| t.template_tools())) {
            (Prompt::Chat(messages), Some(tools)) => input.tokenize_chat(messages, Some(tools)),
            _ => input.tokenize(prompt),
        };
        let ids = ids.map_err(|e| ApiError::from_input(&e, prompt_param))?;
        for j in 0..req.best_of {
            let mut params = req.params.clone();
            params.seed = params.seed.map(|s| s.wrapping_add(j as u64));
            let request = input
                .process_tokens(target.lora.clone(), ids.clone(), prompt, params)
                .map_err(|e| forced_call_error(ApiError::from_input(&e, prompt_param), req))?;
            requests.push(request);
        }
    }
    Ok(requests)
}

/// A forced tool call's grammar is made from the tools' `parameters`: a schema that does
/// not compile is the fault of `tools`, not of a `response_format` the client never sent.
fn forced_call_error(e: ApiError, req: &GenRequest) -> ApiError {
    if req.tools.as_ref().is_some_and(|t| t.forced_schema().is_some()) && e.param.as_deref() == Some("response_format") {
        e.with_param("tools")
    } else {
        e
    }
}

/// Waits until the batch loop accepted every choice (so errors still get a status) and
/// returns the prompt tokens, counted once per prompt whatever `n`.
pub(super) async fn accepted(receivers: &mut [UnboundedReceiver<Event>], n: usize) -> Result<usize, ApiError> {
    let mut prompt_tokens = 0;
    for (i, rx) in receivers.iter_mut().enumerate() {
        match rx.recv().await {
            Some(Event::Accepted { prompt_tokens: p }) => {
                if i % n == 0 {
                    prompt_tokens += p;
                }
            }
            Some(Event::Error(e)) => return Err(e),
            _ => return Err(ApiError::unavailable("the batch loop has stopped")),
        }
    }
    Ok(prompt_tokens)
}

#[derive(Default)]
struct ChoiceAcc {
    text: String,
    logprobs: Vec<TokenLogprob>,
    finish: Option<FinishReason>,
    completion_tokens: usize,
    prompt_logprobs: Option<Box<PromptLogprobs>>,
}

/// A choice's events, gathered until it is done.
async fn collect_choice(rx: &mut UnboundedReceiver<Event>) -> Result<ChoiceAcc, ApiError> {
    let mut acc = ChoiceAcc::default();
    loop {
        match rx.recv().await {
            Some(Event::Delta { text, logprobs, .. }) => {
                acc.text.push_str(&text);
                acc.logprobs.extend(logprobs);
            }
            Some(Event::Done { finish, completion_tokens, prompt_logprobs, .. }) => {
                acc.finish = Some(finish);
                acc.completion_tokens = completion_tokens;
                acc.prompt_logprobs = prompt_logprobs;
                return Ok(acc);
            }
            Some(Event::Accepted { .. }) => {}
            Some(Event::Error(e)) => return Err(e),
            None => return Err(ApiError::unavailable("the request was cancelled")),
        }
    }
}

/// Of each prompt's `best_of` choices, the `n` with the highest cumulative log-probability,
/// best first (all of them, in order, without `best_of`).
fn best_of(choices: Vec<ChoiceAcc>, req: &GenRequest) -> Vec<ChoiceAcc> {
    if req.best_of == req.n {
        return choices;
    }
    let score = |c: &ChoiceAcc| c.logprobs.iter().map(|t| f64::from(t.logprob)).sum::<f64>();
    let mut out = Vec::with_capacity(req.prompts.len() * req.n);
    let mut choices = choices.into_iter().peekable();
    while choices.peek().is_some() {
        let mut group: Vec<ChoiceAcc> = choices.by_ref().take(req.best_of).collect();
        group.sort_by(|a, b| score(b).total_cmp(&score(a)));
        out.extend(group.into_iter().take(req.n));
    }
    out
}

/// Every choice once done, as pieces of the answer, and the usage.
pub(super) async fn collect_pieces(prompt_tokens: usize, req: &GenRequest, receivers: Vec<UnboundedReceiver<Event>>) -> Result<(Vec<Piece>, Usage), ApiError> {
    let mut choices = Vec::with_capacity(receivers.len());
    for mut rx in receivers {
        choices.push(collect_choice(&mut rx).await?);
    }
    // Every generated choice is counted, the ones `best_of` leaves out too (as OpenAI bills).
    let usage = Usage::new(prompt_tokens, choices.iter().map(|c| c.completion_tokens).sum());
    let choices = best_of(choices, req);
    let want_logprobs = req.logprobs.is_some();
    let pieces = choices
        .into_iter()
        .enumerate()
        .map(|(index, c)| {
            let prompt_logprobs = req.prompt_logprobs.then(|| c.prompt_logprobs.as_ref().map(|p| p.to_vllm())).flatten();
            // With `echo` (n = 1), choice i answers prompt i: its text as sent, or decoded.
            let echo = c.prompt_logprobs.filter(|_| req.echo).map(|p| {
                let text = match &req.prompts[index] {
                    Prompt::Text(t) => t.clone(),
                    _ => p.text.clone(),
                };
                Echo { text, logprobs: want_logprobs.then_some(p) }
            });
            let piece = Piece {
                text: Some(c.text),
                logprobs: want_logprobs.then_some(c.logprobs),
                finish_reason: c.finish,
                echo,
                prompt_logprobs,
                ..Piece::new(index)
            };
            with_tool_calls(piece, req)
        })
        .collect();
    Ok((pieces, usage))
}

/// Chat with tools: the calls parsed out of a choice's text, with finish reason `tool_calls`
/// (a text that holds no call stays a text answer).
fn with_tool_calls(mut piece: Piece, req: &GenRequest) -> Piece {
    let Some((content, calls)) = req.tools.as_ref().and_then(|t| t.extract(piece.text.as_deref().unwrap_or_default())) else {
        return piece;
    };
    piece.text = content;
    piece.tool_calls = calls;
    if piece.finish_reason == Some(FinishReason::Stop) {
        piece.finish_reason = Some(FinishReason::ToolCalls);
    }
    piece
}

/// The whole answer, once every choice is done.
async fn collect_response(meta: Meta, req: &GenRequest, receivers: Vec<UnboundedReceiver<Event>>) -> Result<Response, ApiError> {
    let (pieces, usage) = collect_pieces(meta.prompt_tokens, req, receivers).await?;
    Ok(meta.whole(pieces, usage))
}
