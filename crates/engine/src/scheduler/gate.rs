//! The waiting queue's bound, checked on the threads that submit requests (an HTTP 429
//! needs no trip through the batch loop). Two bounds: the queue's length adapted to the
//! rate the server starts requests at, and, under a TTFT target (`--target-ttft-ms`), an
//! estimate of each newcomer's time to first token from the batch loop's step-time model
//! ([`super::latency`]): what would wait past its target is refused at once, with the
//! time after which it would fit, rather than served late.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{EngineError, OverloadReason, Result};
use crate::input::ProcessedRequest;

/// What a request asks of the server, as far as its wait and its first token go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Demand {
    pub prompt_tokens: usize,
    pub max_tokens: usize,
}

impl Demand {
    /// The demand of a processed request (its prompt and resolved `max_tokens`).
    pub fn of(request: &ProcessedRequest) -> Self {
        Self { prompt_tokens: request.prompt_ids().len(), max_tokens: request.max_tokens() }
    }
}

/// The batch loop's state as the TTFT estimate needs it, published after every step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Outlook {
    /// Sequences the batch may hold (`--max-num-seqs`, or fewer under a TPOT target).
    pub rows: usize,
    /// Sequences running now.
    pub running: usize,
    /// Steps until the first running sequence is expected to finish (infinite: none runs).
    pub first_free_steps: f64,
    /// Prompt tokens of running sequences still to prefill.
    pub pending_prefill_tokens: usize,
    /// Predicted seconds of one step of the batch as it runs.
    pub step_seconds: f64,
    /// Prompt tokens a step prefills.
    pub prefill_tokens_per_step: f64,
    /// Output tokens of requests that stopped by themselves (end of sequence, a stop
    /// string) before `max_tokens`, on average (0: none yet).
    pub natural_output: f64,
}

/// [`Outlook`] in atomics (`f64` as bits), written by the batch loop, read by submitters;
/// fields may be a step apart, which an estimate tolerates.
#[derive(Debug, Default)]
struct SharedOutlook {
    ready: AtomicUsize,
    rows: AtomicUsize,
    running: AtomicUsize,
    pending_prefill_tokens: AtomicUsize,
    first_free_steps: AtomicU64,
    step_seconds: AtomicU64,
    prefill_tokens_per_step: AtomicU64,
    natural_output: AtomicU64,
}

impl SharedOutlook {
    fn load(&self) -> Option<Outlook> {
        let f = |a: &AtomicU64| f64::from_bits(a.load(Ordering::Relaxed));
        (self.ready.load(Ordering::Acquire) == 1).then(|| Outlook {
            rows: self.rows.load(Ordering::Relaxed),
            running: self.running.load(Ordering::Relaxed),
            pending_prefill_tokens: self.pending_prefill_tokens.load(Ordering::Relaxed),
            first_free_steps: f(&self.first_free_steps),
            step_seconds: f(&self.step_seconds),
            prefill_tokens_per_step: f(&self.prefill_tokens_per_step),
            natural_output: f(&self.natural_output),
        })
    }

    fn store(&self, o: &Outlook) {
        let f = |a: &AtomicU64, v: f64| a.store(v.to_bits(), Ordering::Relaxed);
        self.rows.store(o.rows, Ordering::Relaxed);
        self.running.store(o.running, Ordering::Relaxed);
        self.pending_prefill_tokens.store(o.pending_prefill_tokens, Ordering::Relaxed);
        f(&self.first_free_steps, o.first_free_steps);
        f(&self.step_seconds, o.step_seconds);
        f(&self.prefill_tokens_per_step, o.prefill_tokens_per_step);
        f(&self.natural_output, o.natural_output);
        self.ready.store(1, Ordering::Release);
    }
}

/// Share of the TTFT target an admitted request's estimate may use: the rest absorbs the
/// estimate's error (arrivals between publications, outputs ending early or late).
const TTFT_HEADROOM: f64 = 0.8;

/// The bound of the waiting queue, shared with the threads that submit requests so they
/// can refuse one at once (HTTP 429) without waiting for the batch loop. Full means
/// `capacity` requests waiting; or, with a TTFT target and a fitted step-time model, a
/// newcomer whose estimated first token comes later than the target; or, before the model
/// is fitted or without a target but with a queue-delay bound, as many waiting as the
/// server starts in that many seconds (the rate is measured while requests wait, when it
/// is the server's capacity, not the arrival rate), so the bound follows the machine.
#[derive(Debug)]
pub struct AdmissionGate {
    capacity: usize,
    queued: AtomicUsize,
    /// Expected output tokens and prompt tokens of the waiting requests: the work ahead
    /// of a newcomer, in decode rows and in prefill.
    queued_tokens: AtomicUsize,
    queued_prompt_tokens: AtomicUsize,
    /// Longest expected wait admitted, seconds (infinite: no bound).
    max_delay: f64,
    /// Time to first token admitted, seconds (`None`: no estimate is made).
    target_ttft: Option<f64>,
    /// Requests waiting at most under a TTFT target before the loop has published an
    /// estimate (a quarter of a batch: a cold server does not take a burst it cannot judge).
    cold_limit: usize,
    /// Requests started per second while others waited (`f64` bits; 0: not measured yet).
    start_rate: AtomicU64,
    outlook: SharedOutlook,
}

/// A place in the waiting queue, held from submission until the request starts, fails or
/// is dropped; dropping it frees the place and the work it announced.
#[derive(Debug)]
pub struct AdmissionTicket {
    gate: Arc<AdmissionGate>,
    tokens: usize,
    prompt_tokens: usize,
}

impl AdmissionGate {
    /// A gate letting at most `capacity` requests wait at once, no more than the server
    /// starts in `max_delay` (when given), and, with `target_ttft`, only requests expected
    /// to get their first token within it (`cold_limit` at most until it can tell).
    pub fn new(capacity: usize, max_delay: Option<Duration>, target_ttft: Option<Duration>, cold_limit: usize) -> Arc<Self> {
        Arc::new(Self {
            capacity,
            cold_limit: cold_limit.clamp(1, capacity.max(1)),
            queued: AtomicUsize::new(0),
            queued_tokens: AtomicUsize::new(0),
            queued_prompt_tokens: AtomicUsize::new(0),
            max_delay: max_delay.map_or(f64::INFINITY, |d| d.as_secs_f64()),
            target_ttft: target_ttft.map(|d| d.as_secs_f64()),
            start_rate: AtomicU64::new(0f64.to_bits()),
            outlook: SharedOutlook::default(),
        })
    }

    /// Requests the queue admits now: `capacity`; or, until the TTFT estimate judges,
    /// fewer when the measured start rate says they would wait longer than the delay bound,
    /// and no more than `cold_limit` under a TTFT target.
    fn limit(&self, estimating: bool) -> usize {
        if estimating {
            return self.capacity;
        }
        let cold = if self.target_ttft.is_some() { self.cold_limit } else { self.capacity };
        let rate = f64::from_bits(self.start_rate.load(Ordering::Relaxed));
        if self.max_delay.is_finite() && rate > 0.0 {
            (cold as f64).min((rate * self.max_delay).ceil().max(1.0)) as usize
        } else {
            cold
        }
    }

    /// Expected output tokens of a request: its `max_tokens`, or fewer when requests that
    /// stop by themselves typically stop sooner.
    fn expected_output(o: &Outlook, max_tokens: usize) -> f64 {
        let m = max_tokens.max(1) as f64;
        if o.natural_output > 0.0 { m.min(o.natural_output.max(1.0)) } else { m }
    }

    /// Estimated seconds until a newcomer's first token: the steps until a row frees and
    /// the waiting work ahead of it has started (its output tokens spread over the batch's
    /// rows, or its prompts through the per-step prefill, whichever is slower), plus the
    /// steps that prefill its own prompt.
    pub fn estimate_ttft(&self, demand: Demand) -> Option<f64> {
        let o = self.outlook.load()?;
        let ahead = self.queued.load(Ordering::Acquire);
        let rows = o.rows.max(1);
        let prefill = o.prefill_tokens_per_step.max(1.0);
        // Rows free now go to the requests ahead first; then the newcomer waits for a row to
        // free (the earliest of the running ones to end, or of those that took free rows),
        // and for the rest ahead to start, rows ending at `rows / mean output` a step.
        let free = rows.saturating_sub(o.running);
        let decode_wait = if ahead < free {
            0.0
        } else {
            let mean_output = if ahead > 0 { self.queued_tokens.load(Ordering::Relaxed) as f64 / ahead as f64 } else { 0.0 };
            let first_row = if free > 0 { o.first_free_steps.min(mean_output) } else { o.first_free_steps };
            first_row + (ahead - free) as f64 * mean_output / rows as f64
        };
        let prefill_wait = (o.pending_prefill_tokens + self.queued_prompt_tokens.load(Ordering::Relaxed)) as f64 / prefill;
        let own_prefill = (demand.prompt_tokens.max(1) as f64 / prefill).ceil();
        Some((decode_wait.max(prefill_wait) + own_prefill) * o.step_seconds)
    }

    /// A place in the queue, or [`EngineError::Overloaded`] when it is full or the request
    /// would miss the TTFT target (with the time after which it would likely fit).
    pub fn try_enter(self: &Arc<Self>, demand: Demand) -> Result<AdmissionTicket> {
        let outlook = self.target_ttft.and_then(|_| self.outlook.load());
        let limit = self.limit(outlook.is_some());
        if let (Some(target), Some(estimate)) = (self.target_ttft, outlook.and_then(|_| self.estimate_ttft(demand))) {
            if estimate > target * TTFT_HEADROOM {
                return Err(EngineError::Overloaded {
                    reason: OverloadReason::TtftTarget,
                    message: format!(
                        "the first token would come in about {:.0} ms, past the server's target of {:.0} ms; retry later",
                        estimate * 1e3,
                        target * 1e3
                    ),
                    retry_after: Some(Duration::from_secs_f64(estimate - target * TTFT_HEADROOM)),
                });
            }
        }
        let entered = self.queued.fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| (q < limit).then_some(q + 1));
        if let Err(q) = entered {
            let (reason, message) = if limit < self.capacity {
                (OverloadReason::QueueDelay, format!("{q} requests are waiting already, about {:.1} s of work at the current rate; retry later", self.max_delay))
            } else {
                (OverloadReason::QueueFull, format!("{q} requests are waiting already; retry later"))
            };
            return Err(EngineError::Overloaded { reason, message, retry_after: None });
        }
        let tokens = outlook.map_or(demand.max_tokens, |o| Self::expected_output(&o, demand.max_tokens).ceil() as usize);
        self.queued_tokens.fetch_add(tokens, Ordering::Relaxed);
        self.queued_prompt_tokens.fetch_add(demand.prompt_tokens, Ordering::Relaxed);
        Ok(AdmissionTicket { gate: self.clone(), tokens, prompt_tokens: demand.prompt_tokens })
    }

    /// Folds one measurement of the start rate in (an exponential moving average).
    pub(super) fn observe_start_rate(&self, rate: f64) {
        let old = f64::from_bits(self.start_rate.load(Ordering::Relaxed));
        let new = if old > 0.0 { 0.7 * old + 0.3 * rate } else { rate };
        self.start_rate.store(new.to_bits(), Ordering::Relaxed);
    }

    /// Publishes the batch loop's state for the TTFT estimate.
    pub(super) fn publish(&self, outlook: &Outlook) {
        self.outlook.store(outlook);
    }

    /// Requests holding a place now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }
}

impl Drop for AdmissionTicket {
    fn drop(&mut self) {
        self.gate.queued_tokens.fetch_sub(self.tokens, Ordering::Relaxed);
        self.gate.queued_prompt_tokens.fetch_sub(self.prompt_tokens, Ordering::Relaxed);
        self.gate.queued.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full_batch(step_seconds: f64) -> Outlook {
        Outlook { rows: 4, running: 4, first_free_steps: 10.0, pending_prefill_tokens: 0, step_seconds, prefill_tokens_per_step: 50.0, natural_output: 40.0 }
    }

    #[test]
    fn estimate_counts_the_wait_for_a_row_the_work_ahead_and_the_prompt() {
        // (Rows 4, all running, the first ends in 10 steps; steps of 10 ms.)
        let gate = AdmissionGate::new(100, None, Some(Duration::from_secs(1)), 100);
        let d = Demand { prompt_tokens: 120, max_tokens: 200 };
        assert_eq!(gate.estimate_ttft(d), None, "no estimate before the loop publishes");
        gate.publish(&Outlook { running: 1, ..full_batch(0.01) });
        // A free row: only the prompt's 3 prefill steps.
        assert!((gate.estimate_ttft(d).unwrap() - 0.03).abs() < 1e-9);
        gate.publish(&full_batch(0.01));
        // Full: 10 steps to a free row, then 3 of prefill.
        assert!((gate.estimate_ttft(d).unwrap() - 0.13).abs() < 1e-9);
        // Two requests wait ahead with 40 expected tokens each (requests that stop by
        // themselves stop at 40 on average, before max_tokens):
        // 80 tokens over 4 rows is 20 more steps.
        let _a = gate.try_enter(d).unwrap();
        let _b = gate.try_enter(d).unwrap();
        assert!((gate.estimate_ttft(d).unwrap() - 0.33).abs() < 1e-9);
        drop(_a);
        assert!((gate.estimate_ttft(d).unwrap() - 0.23).abs() < 1e-9, "a started request's work leaves the queue");
        // Free rows taken by the requests ahead: the newcomer waits for the first of them
        // (or of the running ones) to end, not for an average share of their work.
        drop(_b);
        gate.publish(&Outlook { running: 1, first_free_steps: 60.0, ..full_batch(0.01) });
        let long = Demand { prompt_tokens: 1, max_tokens: 48 };
        let gate_no_natural = AdmissionGate::new(100, None, Some(Duration::from_secs(1)), 100);
        gate_no_natural.publish(&Outlook { running: 1, first_free_steps: 60.0, natural_output: 0.0, ..full_batch(0.01) });
        let held: Vec<_> = (0..3).map(|_| gate_no_natural.try_enter(long).unwrap()).collect();
        assert!((gate_no_natural.estimate_ttft(long).unwrap() - 0.49).abs() < 1e-9, "48 steps to a row, 1 of prefill");
        drop(held);
        let _b = gate.try_enter(d).unwrap();
        // Prefill-bound: 4 prompt tokens a step put the 120 waiting ahead 30 steps away, and
        // the newcomer's own 120 another 30.
        gate.publish(&Outlook { prefill_tokens_per_step: 4.0, ..full_batch(0.01) });
        assert!((gate.estimate_ttft(d).unwrap() - 0.60).abs() < 1e-9);
    }

    #[test]
    fn refuses_what_would_miss_the_target_with_the_time_until_it_fits() {
        let gate = AdmissionGate::new(100, Some(Duration::from_secs(1)), Some(Duration::from_secs(1)), 100);
        gate.publish(&full_batch(0.01));
        let d = Demand { prompt_tokens: 50, max_tokens: 40 };
        let mut held = Vec::new();
        let err = loop {
            match gate.try_enter(d) {
                Ok(t) => held.push(t),
                Err(e) => break e,
            }
        };
        // 10 ms steps: 10 to a free row, 10 per request ahead, 1 of prefill stay within
        // 0.8 s of the 1 s target for up to 6 ahead.
        assert_eq!(held.len(), 7);
        match err {
            EngineError::Overloaded { reason: OverloadReason::TtftTarget, retry_after: Some(r), .. } => {
                assert!((r.as_secs_f64() - (0.81 - 0.8)).abs() < 1e-6, "{r:?}")
            }
            e => panic!("{e:?}"),
        }
        // A faster machine (as the fitted model would say) admits more.
        gate.publish(&full_batch(0.005));
        assert!(gate.try_enter(d).is_ok());
    }

    #[test]
    fn counts_bound_the_queue_without_a_target() {
        let gate = AdmissionGate::new(2, None, None, 2);
        gate.publish(&full_batch(10.0));
        let d = Demand { prompt_tokens: 1, max_tokens: 1 };
        let _a = gate.try_enter(d).unwrap();
        let _b = gate.try_enter(d).unwrap();
        assert!(matches!(gate.try_enter(d), Err(EngineError::Overloaded { reason: OverloadReason::QueueFull, .. })));
    }
}
