//! Admission: which waiting requests join the running batch this step. Preempted
//! sequences come back first, oldest first; then waiting requests in fair-share order
//! (the client with the least weighted service first, [`super::fair`]; first come, first
//! served without clients) while there are sequence slots (under a TPOT target's soft limit,
//! past it only for a client short of its weighted share of rows) and KV blocks, each only once its adapter is resident
//! (the adapter manager reads it off the loop meanwhile, and later requests on resident
//! adapters go ahead). A request blocked on adapter capacity longer than `adapter_wait`
//! stops later adapter requests from pinning more slots, so it cannot starve.

use std::time::Instant;

use super::budget::blocks;
use super::{failed, RequestEvent, RequestId, RequestOutput, Running, Scheduler, SchedulingPolicy};
use crate::engine::Engine;
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
            let candidate = if past_limit { self.next_candidate_under_share(&passed, limit) } else { self.next_candidate(&passed) };
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

    /// Whether `share`'s client holds fewer running rows than its weighted share of `limit`
    /// among the clients running now: under fair share, such a client may go past a TPOT
    /// target's soft limit (never past `max_num_seqs`), so a light tenant's request starts
    /// at once instead of waiting for a heavy tenant's row to end. Linear scans of the
    /// running batch, no allocation.
    fn under_row_share(&self, share: Option<&crate::input::FairShare>, limit: usize) -> bool {
        let Some(me) = share else { return false };
        if self.cfg.policy != SchedulingPolicy::Fair {
            return false;
        }
        let same = |a: &crate::input::FairShare, b: &crate::input::FairShare| a.client == b.client;
        let mut total_weight = me.weight;
        let mut mine = 0usize;
        for (k, r) in self.running.iter().enumerate() {
            let Some(s) = &r.share else { continue };
            if same(s, me) {
                mine += 1;
            } else if !self.running[..k].iter().any(|e| e.share.as_ref().is_some_and(|t| same(t, s))) {
                total_weight += s.weight;
            }
        }
        (mine as f64) < (limit as f64 * me.weight / total_weight).floor()
    }

    /// Past a TPOT target's soft limit: the waiting request whose turn it is among clients
    /// short of their share of rows ([`Self::under_row_share`], judged once per client run).
    fn next_candidate_under_share(&self, passed: &[RequestId], limit: usize) -> Option<usize> {
        if self.cfg.policy != SchedulingPolicy::Fair {
            return None;
        }
        let mut best: Option<(f64, usize)> = None;
        let mut last: Option<(&crate::input::FairShare, bool)> = None;
        for (i, w) in self.waiting.iter().enumerate() {
            let Some(share) = w.request.share() else { continue };
            if passed.contains(&w.id) {
                continue;
            }
            let under = match last {
                Some((s, under)) if s.client == share.client => under,
                _ => self.under_row_share(Some(share), limit),
            };
            last = Some((share, under));
            if !under {
                continue;
            }
            let c = self.fair.counter(Some(share));
            if best.is_none_or(|(bc, _)| c < bc) {
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
