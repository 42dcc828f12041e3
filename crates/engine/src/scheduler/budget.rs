//! The two budgets of a step: tokens per forward pass (decode rows first, then prefill
//! chunks in arrival order, vLLM's chunked prefill; under fair share a client within its
//! share of rows first) and KV-cache blocks (the newest
//! sequence is preempted, its cache dropped and recomputed later, while the planned pass
//! would not fit). The plan computed here is the one the pass runs.

use super::{Running, Scheduler};
use crate::kv::{KvCache, KV_BLOCK_TOKENS};
use crate::sequence::Sequence;

/// Most prompt rows of a prompt-logprobs request in one pass: each keeps a row of logits
/// (vocabulary × 4 bytes, ~190 KiB for SmolLM2), so a pass holds at most ~50 MB of them.
pub const PROMPT_LOGPROBS_CHUNK: usize = 256;

/// Prefill tokens a step may always take under a TPOT target, however full the batch.
const MIN_PREFILL_CHUNK: usize = 16;

/// KV blocks that hold `tokens` positions.
pub(super) fn blocks(tokens: usize) -> usize {
    KvCache::blocks_for(tokens)
}

/// KV blocks a sequence's cache holds now.
pub(super) fn cache_blocks(seq: &Sequence) -> usize {
    seq.cache().capacity_tokens() / KV_BLOCK_TOKENS
}

fn is_active(r: &Running) -> bool {
    !r.preempted && r.seq.finish.is_none()
}

impl Scheduler {
    /// Tokens each running sequence feeds in the next pass (0: not in it): one for every
    /// decoding sequence, then prompt chunks in arrival order with what the budget leaves.
    /// Under fair share, while some client holds more than its weighted share of the
    /// batch's rows, the prompts of the clients within theirs go first and may use the whole
    /// token budget, past a TPOT target's prefill room: a light tenant's first token then
    /// waits for one step, not for a prompt spread thin over many, and the heavy tenant's
    /// time per output token pays one longer step per light request.
    /// Without chunked prefill a prompt runs whole or waits for a later pass.
    pub(super) fn plan_chunks(&self) -> Vec<usize> {
        let mut take = vec![0usize; self.running.len()];
        let mut decode_rows = 0;
        for (i, r) in self.running.iter().enumerate() {
            if is_active(r) && r.seq.pending_len() == 1 && decode_rows < self.cfg.max_num_batched_tokens {
                take[i] = 1;
                decode_rows += 1;
            }
        }
        let mut prefills: Vec<usize> =
            (0..self.running.len()).filter(|&i| take[i] == 0 && is_active(&self.running[i]) && self.running[i].seq.pending_len() > 0).collect();
        let within_share = if prefills.is_empty() { Vec::new() } else { self.clients_within_share() };
        let goes_first = |i: usize| self.running[i].share.as_ref().is_some_and(|s| within_share.contains(&s.client));
        prefills.sort_by_key(|&i| (!goes_first(i), self.running[i].seq.id));
        let token_budget = self.cfg.max_num_batched_tokens.saturating_sub(decode_rows);
        let mut room = self.prefill_budget(decode_rows);
        let mut used = 0;
        for i in prefills {
            let budget = if goes_first(i) { token_budget - used } else { room.min(token_budget - used) };
            let seq = &self.running[i].seq;
            // Every row of a prompt-logprobs prefill keeps its logits: bound them per pass.
            let cap = if seq.params().prompt_logprobs.is_some() { PROMPT_LOGPROBS_CHUNK } else { usize::MAX };
            let pending = seq.pending_len().min(cap);
            let n = if self.cfg.enable_chunked_prefill || cap != usize::MAX {
                pending.min(budget)
            } else if pending <= budget {
                pending
            } else {
                0
            };
            take[i] = n;
            used += n;
            room = room.saturating_sub(n);
        }
        take
    }

    /// Clients holding no more than their weighted share of the batch's rows while another
    /// holds more: whose prompts go first ([`Self::plan_chunks`]). Empty without fair share,
    /// with one client, or while every client is within its share.
    fn clients_within_share(&self) -> Vec<std::sync::Arc<str>> {
        let standings = self.row_standings(self.batch_limit(), None);
        if !standings.iter().any(|c| c.rows > c.fair_rows) {
            return Vec::new();
        }
        standings.into_iter().filter(|c| c.rows <= c.fair_rows).map(|c| c.client).collect()
    }

    /// Prompt tokens a pass with `decode_rows` decoding sequences may prefill: what the
    /// token budget leaves, and under a TPOT target what the fitted step time leaves (at
    /// least MIN_PREFILL_CHUNK tokens, so prompts always move).
    pub(super) fn prefill_budget(&self, decode_rows: usize) -> usize {
        let budget = self.cfg.max_num_batched_tokens.saturating_sub(decode_rows);
        match (self.cfg.target_tpot, self.step_model.coefficients()) {
            (Some(t), Some(c)) => budget.min(c.prefill_room(decode_rows, super::latency::planned_step(t)).max(MIN_PREFILL_CHUNK)),
            _ => budget,
        }
    }

    /// KV blocks the running (not preempted) sequences hold after a pass feeding `take`.
    fn blocks_after(&self, take: &[usize]) -> usize {
        self.running
            .iter()
            .zip(take)
            .filter(|(r, _)| !r.preempted)
            .map(|(r, &t)| cache_blocks(&r.seq).max(blocks(r.seq.cached_len() + t)))
            .sum()
    }

    /// KV blocks the running (not preempted) sequences need to produce their next token:
    /// what admission must leave room for.
    pub(super) fn committed_blocks(&self) -> usize {
        self.running.iter().filter(|r| !r.preempted).map(|r| blocks(r.seq.len() + 1).max(cache_blocks(&r.seq))).sum()
    }

    /// Preempts the newest sequences while the planned pass would overflow the KV budget;
    /// one sequence always fits (checked when the scheduler was made). Returns how many.
    pub(super) fn preempt_to_fit(&mut self) -> usize {
        let mut preempted = 0;
        while self.blocks_after(&self.plan_chunks()) > self.budget_blocks {
            if self.running.iter().filter(|r| !r.preempted).count() <= 1 {
                break;
            }
            let Some(victim) = (0..self.running.len()).filter(|&i| !self.running[i].preempted).max_by_key(|&i| self.running[i].seq.id)
            else {
                break;
            };
            let r = &mut self.running[victim];
            tracing::debug!(seq = r.seq.id, "KV cache full: preempting the newest sequence (recomputed later)");
            r.seq.drop_cache();
            r.preempted = true;
            preempted += 1;
        }
        preempted
    }
}
