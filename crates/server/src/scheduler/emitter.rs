//! The end of the one-way flow: each step's outputs become events on the streams of the
//! requests they belong to, and the metrics gateways and dashboards read (TTFT and
//! inter-token latency per adapter, queue time, token counts, vLLM's gauges) move with them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use loramux_engine::lora::{AdapterInfo, LoraManager, LoraManagerStats};
use loramux_engine::prefix_cache::PrefixCacheStats;
use loramux_engine::tokenizer::Tokenizer;
use loramux_engine::{Completion, RequestEvent, RequestId, SampledToken, Scheduler, StepReport};
use tokio::sync::mpsc as tmpsc;

use super::Event;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::protocol::{PromptLogprobs, PromptTokenLogprob, TokenLogprob};
use crate::tenants::RequestTenant;

/// One request's stream and timings.
struct Stream {
    events: tmpsc::UnboundedSender<Event>,
    label: String,
    tenant: Arc<RequestTenant>,
    arrival: Instant,
    first_token: Option<Instant>,
    last_token: Instant,
}

pub(super) struct Emitter {
    metrics: Arc<Metrics>,
    tokenizer: Arc<Tokenizer>,
    streams: HashMap<RequestId, Stream>,
    next_id: RequestId,
    max_loras: usize,
    /// `vllm:lora_requests_info`'s running and waiting lists as last published.
    lora_info: (String, String),
    last_stats: LoraManagerStats,
    last_prefix: PrefixCacheStats,
    /// Adapters whose per-adapter series are published.
    adapter_labels: HashSet<String>,
    /// `--target-ttft-ms` and `--target-tpot-ms`: finished requests are counted against them.
    targets: (Option<Duration>, Option<Duration>),
}

impl Emitter {
    pub fn new(metrics: Arc<Metrics>, tokenizer: Arc<Tokenizer>, max_loras: usize, targets: (Option<Duration>, Option<Duration>)) -> Self {
        Self {
            metrics,
            tokenizer,
            streams: HashMap::new(),
            next_id: 0,
            max_loras,
            lora_info: (String::new(), String::new()),
            last_stats: LoraManagerStats::default(),
            last_prefix: PrefixCacheStats::default(),
            adapter_labels: HashSet::new(),
            targets,
        }
    }

    /// A new request's stream; returns the id the scheduler knows it by.
    pub fn register(&mut self, events: tmpsc::UnboundedSender<Event>, label: String, tenant: Arc<RequestTenant>, arrival: Instant) -> RequestId {
        self.next_id += 1;
        self.streams.insert(self.next_id, Stream { events, label, tenant, arrival, first_token: None, last_token: arrival });
        self.next_id
    }

    /// Fails one request (the HTTP layer counts the error when it answers).
    pub fn reject(&mut self, id: RequestId, e: ApiError) {
        if let Some(s) = self.streams.remove(&id) {
            self.metrics.requests.with_label_values(&[&s.label, "error"]).inc();
            let _ = s.events.send(Event::Error(e));
        }
    }

    /// Fails every request still open.
    pub fn fail_all(&mut self, e: ApiError) {
        let ids: Vec<RequestId> = self.streams.keys().copied().collect();
        for id in ids {
            self.reject(id, e.clone());
        }
    }

    /// Requests whose client went away: forgotten here, to be aborted in the scheduler.
    pub fn cancelled(&mut self) -> Vec<RequestId> {
        let gone: Vec<RequestId> = self.streams.iter().filter(|(_, s)| s.events.is_closed()).map(|(&id, _)| id).collect();
        for id in &gone {
            if let Some(s) = self.streams.remove(id) {
                self.metrics.requests.with_label_values(&[&s.label, "abort"]).inc();
            }
        }
        if !gone.is_empty() {
            tracing::debug!(requests = gone.len(), "cancelled requests of disconnected clients");
        }
        gone
    }

    /// The prompt's log-probabilities with token texts, when they were asked for.
    fn prompt_logprobs(&self, c: &Completion) -> Option<Box<PromptLogprobs>> {
        let lps = c.prompt_logprobs.as_ref()?;
        let decode = |id: u32| self.tokenizer.decode(&[id], false).unwrap_or_default();
        let first_id = *c.prompt_token_ids.first()?;
        let rest = lps
            .iter()
            .map(|t| PromptTokenLogprob {
                id: t.id,
                token: decode(t.id),
                logprob: t.logprob,
                rank: t.rank.unwrap_or(0),
                top: t.top.iter().map(|&(id, lp)| (id, decode(id), lp)).collect(),
            })
            .collect();
        let text = self.tokenizer.decode(&c.prompt_token_ids, false).unwrap_or_default();
        Some(Box::new(PromptLogprobs { text, first: decode(first_id), first_id, rest }))
    }

    fn token_logprob(&self, t: &SampledToken) -> TokenLogprob {
        let decode = |id: u32| self.tokenizer.decode(&[id], false).unwrap_or_default();
        TokenLogprob { token: decode(t.id), logprob: t.logprob, top: t.top.iter().map(|&(id, lp)| (decode(id), lp)).collect() }
    }

    /// Sends each output of a step to its request and records its metrics.
    pub fn deliver(&mut self, report: StepReport) {
        let now = Instant::now();
        let m = self.metrics.clone();
        if let Some(b) = report.batch {
            m.batch_size.observe(b.seqs as f64);
            m.batch_tokens.observe(b.rows as f64);
            m.step_seconds.observe(b.seconds);
        }
        m.preemptions.inc_by(report.preemptions as u64);
        for (_, seconds) in &report.adapters_loaded {
            m.adapter_load_latency.observe(*seconds);
        }
        m.adapter_load_failures.inc_by(report.adapter_load_failures as u64);
        for (name, seconds) in &report.unmerges {
            m.lora_unmerges.with_label_values(&[name]).inc();
            m.lora_unmerge_seconds.observe(*seconds);
            m.lora_merged.reset();
        }
        for (name, seconds) in &report.merges {
            m.lora_merges.with_label_values(&[name]).inc();
            m.lora_merge_seconds.observe(*seconds);
            m.lora_merged.reset();
            m.lora_merged.with_label_values(&[name]).set(1.0);
        }
        for out in report.outputs {
            match out.event {
                RequestEvent::Started { prompt_tokens } => {
                    let Some(s) = self.streams.get(&out.id) else { continue };
                    let queued = now.duration_since(s.arrival).as_secs_f64();
                    m.queue_time.with_label_values(&[&s.label]).observe(queued);
                    m.tenant_queue_seconds.with_label_values(&[&s.tenant.label]).observe(queued);
                    m.prompt_tokens.with_label_values(&[&s.label]).inc_by(prompt_tokens as u64);
                    m.tenant_prompt_tokens.with_label_values(&[&s.tenant.label]).inc_by(prompt_tokens as u64);
                    m.vllm_prompt_tokens.inc_by(prompt_tokens as u64);
                    let _ = s.events.send(Event::Accepted { prompt_tokens });
                }
                RequestEvent::Output { text, new_tokens, logprobs } => {
                    let logprobs: Vec<TokenLogprob> = logprobs.iter().map(|t| self.token_logprob(t)).collect();
                    let Some(s) = self.streams.get_mut(&out.id) else { continue };
                    if new_tokens > 0 {
                        let label = [s.label.as_str()];
                        match s.first_token {
                            None => {
                                let ttft = now.duration_since(s.arrival).as_secs_f64();
                                m.ttft.with_label_values(&label).observe(ttft);
                                m.vllm_ttft.observe(ttft);
                                s.first_token = Some(now);
                            }
                            Some(_) => {
                                let itl = now.duration_since(s.last_token).as_secs_f64();
                                m.itl.with_label_values(&label).observe(itl);
                                m.vllm_itl.observe(itl);
                            }
                        }
                        s.last_token = now;
                        m.generation_tokens.with_label_values(&label).inc_by(new_tokens as u64);
                        m.tenant_generation_tokens.with_label_values(&[&s.tenant.label]).inc_by(new_tokens as u64);
                        s.tenant.add_generated(new_tokens);
                        m.vllm_generation_tokens.inc_by(new_tokens as u64);
                    }
                    if !text.is_empty() || !logprobs.is_empty() {
                        let _ = s.events.send(Event::Delta { text, tokens: new_tokens, logprobs });
                    }
                }
                RequestEvent::Finished { mut completion } => {
                    let Some(s) = self.streams.remove(&out.id) else { continue };
                    let finish = completion.finish_reason;
                    let e2e = now.duration_since(s.arrival).as_secs_f64();
                    m.e2e.with_label_values(&[&s.label]).observe(e2e);
                    m.vllm_e2e.observe(e2e);
                    m.vllm_success.with_label_values(&[finish.as_str()]).inc();
                    m.requests.with_label_values(&[&s.label, finish.as_str()]).inc();
                    self.count_targets(&s, completion.token_ids.len());
                    let _ = s.events.send(Event::Done {
                        finish,
                        prompt_tokens: completion.prompt_tokens,
                        completion_tokens: completion.token_ids.len(),
                        prompt_logprobs: self.prompt_logprobs(&completion),
                        embedding: completion.embedding.take(),
                    });
                }
                RequestEvent::Failed(e) => self.reject(out.id, ApiError::from_engine(&e)),
            }
        }
    }

    /// Whether a finished request met each latency target set (TTFT from arrival; TPOT: the
    /// mean gap between tokens after the first).
    fn count_targets(&self, s: &Stream, tokens: usize) {
        let (ttft_target, tpot_target) = self.targets;
        let Some(first) = s.first_token else { return };
        let count = |target: &str, met: bool| self.metrics.slo_requests.with_label_values(&[target, if met { "true" } else { "false" }]).inc();
        if let Some(t) = ttft_target {
            count("ttft", first.duration_since(s.arrival) <= t);
        }
        if let (Some(t), true) = (tpot_target, tokens > 1) {
            count("tpot", s.last_token.duration_since(first) <= t * (tokens as u32 - 1));
        }
    }

    /// Per-adapter gauges (resident, bytes, pinned, requests, last use) and the
    /// known/resident totals. Series are updated in place, so a scrape never sees them
    /// missing; those of adapters no longer known are removed.
    pub fn adapter_gauges(&mut self, list: &[AdapterInfo], loras: &LoraManager) {
        let m = &self.metrics;
        let known: HashSet<&str> = list.iter().map(|a| a.name.as_str()).collect();
        for gone in self.adapter_labels.iter().filter(|n| !known.contains(n.as_str())) {
            let label = [gone.as_str()];
            let _ = m.adapter_resident.remove_label_values(&label);
            let _ = m.adapter_bytes.remove_label_values(&label);
            let _ = m.adapter_pinned.remove_label_values(&label);
            let _ = m.adapter_requests.remove_label_values(&label);
            let _ = m.adapter_last_used.remove_label_values(&label);
        }
        for a in list {
            let label = [a.name.as_str()];
            m.adapter_resident.with_label_values(&label).set(if a.resident.is_some() { 1.0 } else { 0.0 });
            m.adapter_bytes.with_label_values(&label).set(a.bytes as f64);
            m.adapter_pinned.with_label_values(&label).set(if a.pinned { 1.0 } else { 0.0 });
            let counter = m.adapter_requests.with_label_values(&label);
            if a.requests < counter.get() {
                counter.reset(); // unloaded and loaded again since the last publish: counting afresh
            }
            counter.inc_by(a.requests - counter.get());
            match a.last_used.and_then(|t| t.duration_since(UNIX_EPOCH).ok()) {
                Some(t) => m.adapter_last_used.with_label_values(&label).set(t.as_secs_f64()),
                None => {
                    let _ = m.adapter_last_used.remove_label_values(&label);
                }
            }
        }
        self.adapter_labels = known.into_iter().map(str::to_string).collect();
        m.adapters_known.set(list.len() as i64);
        m.adapters_resident.set(loras.resident_count() as i64);
        m.adapters_resident_bytes.set(loras.resident_bytes() as i64);
    }

    /// Queue, KV and adapter gauges after a step, and the adapter load counters.
    pub fn scheduler_gauges(&mut self, scheduler: &Scheduler, stats: &LoraManagerStats, prefix: PrefixCacheStats) {
        let m = &self.metrics;
        m.vllm_prefix_queries.inc_by(prefix.queried_tokens - self.last_prefix.queried_tokens);
        m.vllm_prefix_hits.inc_by(prefix.hit_tokens - self.last_prefix.hit_tokens);
        m.prefix_cache_evictions.inc_by(prefix.evicted_blocks - self.last_prefix.evicted_blocks);
        m.prefix_cache_bytes.set(prefix.bytes as i64);
        self.last_prefix = prefix;
        m.adapter_loads.inc_by(stats.loads - self.last_stats.loads);
        m.adapter_evictions.inc_by(stats.evictions - self.last_stats.evictions);
        m.adapter_load_seconds.inc_by((stats.load_seconds - self.last_stats.load_seconds).max(0.0));
        self.last_stats = stats.clone();
        m.set_queue(scheduler.num_running(), scheduler.num_waiting());
        if let Some(c) = scheduler.step_coefficients() {
            m.step_model.with_label_values(&["base"]).set(c.base);
            m.step_model.with_label_values(&["per_decode_row"]).set(c.per_decode_row);
            m.step_model.with_label_values(&["per_prefill_token"]).set(c.per_prefill_token);
        }
        for (client, units) in scheduler.fair_counters() {
            // Requests without a tenant share the counter named "" (one queue, first come first served).
            if !client.is_empty() {
                m.tenant_service.with_label_values(&[client]).set(units);
            }
        }
        let (used, capacity) = scheduler.kv_usage_bytes();
        m.set_kv(used, capacity);
        let running = scheduler.running_adapters().join(",");
        let waiting = scheduler.waiting_adapters().join(",");
        if (running.as_str(), waiting.as_str()) != (self.lora_info.0.as_str(), self.lora_info.1.as_str()) {
            m.set_lora_info(self.max_loras, &running, &waiting);
            self.lora_info = (running, waiting);
        }
    }
}
