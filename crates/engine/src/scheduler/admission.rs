//! Admission: which waiting requests join the running batch this step. Preempted
//! sequences come back first, oldest first; then waiting requests in fair-share order
//! (the client with the least weighted service first, [`super::fair`]; first come, first
//! served without clients) while there are sequence slots (under a TPOT target's soft limit,
//! past it only for a client below its weighted share of rows and not a request ahead in
//! service) and KV blocks, each only once its adapter is resident (the adapter
//! manager reads it off the loop meanwhile, and later requests on resident adapters go
//! ahead). A request blocked on adapter capacity longer than `adapter_wait` stops later
//! adapter requests from pinning more slots, so it cannot starve.

use std::time::Instant;

use super::budget::blocks;
use super::{failed, RequestEvent, RequestId, RequestOutput, Running, Scheduler, SchedulingPolicy};
use super::fair::{W_OUTPUT, W_PROMPT};
use crate::engine::Engine;
use crate::input::FairShare;
use crate::lora::Readiness;

impl Scheduler {
    pub(super) fn admit(&mut self, engine: &mut Engine, outputs: &mut Vec<RequestOutput>) {
        let budget = self.budget_blocks;
        let mut committed = self.committed_blocks();
        let mut preempted: Vec<usize> = (0..self.running.len()).filter(|&i| self.running[i].preempted).collect();
        preempted.sort_by_key(|&i| self.running[i].seq.id);
        for i in preempted {
            let need = blocks(self.running[i].seq.len() + 1);
            if committed + need > budget {
                return;
            }
            self.running[i].preempted = false;
            engine.reuse_cached_prefix(&mut self.running[i].seq);
            committed += need;
        }
        // Adapters read for requests that have since gone must not hold the read-ahead bound.
        let waiting = &self.waiting;
        engine.loras_mut().retain_staged(|name| waiting.iter().any(|w| w.request.lora().is_some_and(|l| l.lora_name == name)));

        let now = Instant::now();
        let mut starving = false;
        // Requests passed over this step (adapter loading or blocked), by id.
        let mut passed: Vec<RequestId> = Vec::new();
        let limit = self.batch_limit();
        while self.running.len() < self.cfg.max_num_seqs {
            let past_limit = self.running.len() >= limit;
            let candidate = if past_limit { self.next_candidate_past_limit(&passed, limit) } else { self.next_candidate(&passed) };
            let Some(i) = candidate else { break };
            let adapter = self.waiting[i].request.lora().map(|l| l.lora_name.clone());
            if let (Some(a), Some(p)) = (&adapter, &self.panic_on_admit) {
                if a == p {
                    panic!("injected fault: admission of a request on adapter '{a}' panics");
                }
            }
            let readiness = match &adapter {
                None => Ok(Readiness::Resident),
                Some(a) => engine.loras_mut().readiness(a),
            };
            match readiness {
                Err(e) => {
                    let w = self.waiting.remove(i).expect("index in range");
                    outputs.push(failed(w.id, e));
                    continue;
                }
                Ok(Readiness::Loading) => {
                    passed.push(self.waiting[i].id);
                    continue;
                }
                Ok(Readiness::Blocked) => {
                    let since = *self.waiting[i].blocked_since.get_or_insert(now);
                    if now.duration_since(since) >= self.cfg.adapter_wait {
                        starving = true;
                    }
                    passed.push(self.waiting[i].id);
                    continue;
                }
                Ok(Readiness::Resident) if starving && adapter.is_some() => {
                    passed.push(self.waiting[i].id);
                    continue;
                }
                Ok(Readiness::Resident) => {}
            }
            let need = blocks(self.waiting[i].request.prompt_ids().len() + 1);
            if committed + need > budget {
                break; // memory goes to the request whose turn it is
            }
            let w = self.waiting.remove(i).expect("index in range");
            let prompt_tokens = w.request.prompt_ids().len();
            let share = w.request.share().cloned();
            self.started_tickets.push(w.ticket);
            match engine.start_sequence(w.request) {
                Ok(seq) => {
                    committed += need;
                    self.fair.admitted(share.as_ref(), prompt_tokens);
                    self.typical_prompt.add(prompt_tokens as f64, 0.05);
                    outputs.push(RequestOutput { id: w.id, event: RequestEvent::Started { prompt_tokens } });
                    self.running.push(Running { id: w.id, seq, share, deadline: w.deadline, sent_tokens: 0, sent_logprobs: 0, preempted: false });
                }
                Err(e) => outputs.push(failed(w.id, e)),
            }
        }
    }

    /// Each client's rows in the running batch and its weighted share of `limit` rows among
    /// the clients running now (and `newcomer`'s, holding none yet if it runs nothing).
    /// Empty unless the policy is fair share. Scans of the running batch; clients are few.
    pub(super) fn row_standings(&self, limit: usize, newcomer: Option<&FairShare>) -> Vec<RowStanding> {
        let mut out: Vec<RowStanding> = Vec::new();
        if self.cfg.policy != SchedulingPolicy::Fair {
            return out;
        }
        let mut weights: Vec<f64> = Vec::new();
        for s in self.running.iter().filter_map(|r| r.share.as_ref()) {
            match out.iter().position(|c| c.client == s.client) {
                Some(k) => out[k].rows += 1,
                None => {
                    out.push(RowStanding { client: s.client.clone(), rows: 1, fair_rows: 0 });
                    weights.push(s.weight);
                }
            }
        }
        if let Some(me) = newcomer.filter(|me| !out.iter().any(|c| c.client == me.client)) {
            out.push(RowStanding { client: me.client.clone(), rows: 0, fair_rows: 0 });
            weights.push(me.weight);
        }
        let total: f64 = weights.iter().sum();
        for (c, w) in out.iter_mut().zip(&weights) {
            c.fair_rows = (limit as f64 * w / total - 1e-9).ceil() as usize;
        }
        out
    }

    /// Past a TPOT target's soft limit: the waiting request, in counter order, of a client
    /// that holds fewer running rows than its weighted share of `limit` (rounded up) among
    /// the clients running now, and whose counter is at most one such request's service
    /// above the smallest counter of the other clients waiting. So a light tenant's request
    /// starts at once instead of waiting for a heavy tenant's row to end (never past
    /// `max_num_seqs`), while a backlogged client cannot keep more rows than its share:
    /// once the extra row puts it a request ahead in service, the counters alone decide
    /// again, so service still follows the weights (VTC's bound grows by one request).
    fn next_candidate_past_limit(&self, passed: &[RequestId], limit: usize) -> Option<usize> {
        if self.cfg.policy != SchedulingPolicy::Fair {
            return None;
        }
        let mut best: Option<(f64, usize)> = None;
        // Judged once per run of one client's requests: below its share, and the smallest
        // counter among the other clients waiting.
        let mut last: Option<(&FairShare, bool, f64)> = None;
        for (i, w) in self.waiting.iter().enumerate() {
            let Some(share) = w.request.share() else { continue };
            if passed.contains(&w.id) {
                continue;
            }
            let (below, others_min) = match last {
                Some((s, below, others_min)) if s.client == share.client => (below, others_min),
                _ => (
                    self.row_standings(limit, Some(share)).iter().any(|c| c.client == share.client && c.rows < c.fair_rows),
                    self.waiting
                        .iter()
                        .filter_map(|o| o.request.share())
                        .filter(|o| o.client != share.client)
                        .map(|o| self.fair.counter(Some(o)))
                        .fold(f64::INFINITY, f64::min),
                ),
            };
            last = Some((share, below, others_min));
            let c = self.fair.counter(Some(share));
            if !below || best.is_some_and(|(bc, _)| c >= bc) {
                continue;
            }
            let request_service = (W_PROMPT * w.request.prompt_ids().len() as f64 + W_OUTPUT * w.request.max_tokens() as f64) / share.weight;
            if c <= others_min + request_service {
                best = Some((c, i));
            }
        }
        best.map(|(_, i)| i)
    }

    /// The waiting request whose turn it is: the oldest not `passed` of the client with the
    /// smallest virtual counter ([`super::fair`]); ties go to the older request, so without
    /// clients this is first come, first served.
    fn next_candidate(&self, passed: &[RequestId]) -> Option<usize> {
        let mut best: Option<(f64, usize)> = None;
        for (i, w) in self.waiting.iter().enumerate() {
            if passed.contains(&w.id) {
                continue;
            }
            let c = match self.cfg.policy {
                SchedulingPolicy::Fair => self.fair.counter(w.request.share()),
                SchedulingPolicy::Fcfs => 0.0,
            };
            if best.is_none_or(|(bc, _)| c < bc) {
                best = Some((c, i));
            }
        }
        best.map(|(_, i)| i)
    }
}

/// One client's place in the running batch's rows ([`Scheduler::row_standings`]).
pub(super) struct RowStanding {
    pub client: std::sync::Arc<str>,
    /// Running sequences it holds (preempted ones keep their place).
    pub rows: usize,
    /// Its weighted share of the batch limit, rounded up to whole rows: of two equal
    /// clients on 7 rows, either may hold 4 (the batch then goes one past the limit).
    pub fair_rows: usize,
}
