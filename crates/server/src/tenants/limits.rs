//! Per-tenant limits: a sliding 60-second log of admitted requests and of their token cost
//! (exact, no bucket rounding; a tenant's log holds at most its per-minute limit of entries),
//! and the count of requests in flight. [`Admission`] is the guard a request holds until its
//! answer is sent or its client leaves: dropping it frees the concurrency slot and gives back
//! the completion tokens that were reserved but not generated.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::IntGauge;

use super::TenantLimits;

/// The window rates are counted over.
pub(crate) const WINDOW: Duration = Duration::from_secs(60);

/// What the batch loop knows of a request's tenant: its metrics label, and the tokens
/// generated for it so far (what the token limit keeps of the reservation).
#[derive(Debug)]
pub struct RequestTenant {
    /// A configured tenant's name, or one fixed label for requests without a tenant.
    pub label: String,
    generated: AtomicU64,
}

impl RequestTenant {
    pub fn new(label: String) -> Self {
        Self { label, generated: AtomicU64::new(0) }
    }

    /// Counts tokens generated for the request.
    pub fn add_generated(&self, tokens: usize) {
        self.generated.fetch_add(tokens as u64, Ordering::Relaxed);
    }

    fn generated(&self) -> u64 {
        self.generated.load(Ordering::Relaxed)
    }
}

/// Why a tenant's request was refused, with when to retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    Concurrency,
    Requests { retry_after: Duration },
    Tokens { retry_after: Duration },
    /// The request alone costs more than the tokens-per-minute limit.
    TooLarge,
}

/// One admitted request's token cost in the log.
struct Spend {
    id: u64,
    at: Instant,
    tokens: u64,
}

#[derive(Default)]
struct Window {
    requests: VecDeque<Instant>,
    spends: VecDeque<Spend>,
    tokens: u64,
    in_flight: u32,
    next_id: u64,
}

impl Window {
    fn expire(&mut self, now: Instant) {
        let live = |at: Instant| now.saturating_duration_since(at) < WINDOW;
        while self.requests.front().is_some_and(|&at| !live(at)) {
            self.requests.pop_front();
        }
        while let Some(s) = self.spends.front().filter(|s| !live(s.at)) {
            self.tokens -= s.tokens;
            self.spends.pop_front();
        }
    }

    /// When enough of the logged tokens expire for `cost` more to fit under `limit`.
    fn tokens_free_at(&self, cost: u64, limit: u64) -> Option<Instant> {
        let excess = self.tokens.saturating_add(cost).checked_sub(limit).filter(|e| *e > 0)?;
        let mut freed = 0;
        for s in &self.spends {
            freed += s.tokens;
            if freed >= excess {
                return Some(s.at + WINDOW);
            }
        }
        None
    }
}

/// A tenant's counters. They live in the store by tenant name, so a reload that keeps the
/// name keeps them.
#[derive(Default)]
pub(crate) struct Usage {
    window: Mutex<Window>,
}

impl Usage {
    /// Admits a request of `cost` tokens at `now` under `limits`, or says why not. Returns
    /// the id of its entry in the token log.
    pub fn admit(&self, limits: &TenantLimits, cost: u64, now: Instant) -> Result<u64, Refusal> {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        w.expire(now);
        if limits.max_concurrency.is_some_and(|max| w.in_flight >= max) {
            return Err(Refusal::Concurrency);
        }
        if let Some(rpm) = limits.requests_per_minute.map(|r| r as usize) {
            if w.requests.len() >= rpm {
                let frees = w.requests[w.requests.len() - rpm] + WINDOW;
                return Err(Refusal::Requests { retry_after: frees.saturating_duration_since(now) });
            }
        }
        if let Some(tpm) = limits.tokens_per_minute {
            if cost > tpm {
                return Err(Refusal::TooLarge);
            }
            if let Some(frees) = w.tokens_free_at(cost, tpm) {
                return Err(Refusal::Tokens { retry_after: frees.saturating_duration_since(now) });
            }
        }
        w.next_id += 1;
        let id = w.next_id;
        w.requests.push_back(now);
        w.spends.push_back(Spend { id, at: now, tokens: cost });
        w.tokens += cost;
        w.in_flight += 1;
        Ok(id)
    }

    /// Ends the request admitted as `id`: frees its slot and gives back `refund` tokens (if
    /// its entry is still in the window).
    pub fn release(&self, id: u64, refund: u64) {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        w.in_flight = w.in_flight.saturating_sub(1);
        if let Some(s) = w.spends.iter_mut().find(|s| s.id == id) {
            let r = refund.min(s.tokens);
            s.tokens -= r;
            w.tokens -= r;
        }
    }
}

/// A tenant's hold on its limits while a request runs.
struct Held {
    usage: Arc<Usage>,
    id: u64,
    /// Completion tokens reserved at admission (`max_tokens` per choice).
    reserved: u64,
}

/// Held by a request until its answer is sent (streams: their last byte) or its client
/// leaves; dropping it releases the tenant's concurrency slot, refunds the unused completion
/// tokens and lowers the in-flight gauge.
pub struct Admission {
    /// The request's tenant, as the batch loop sees it.
    pub tenant: Arc<RequestTenant>,
    in_flight: IntGauge,
    held: Option<Held>,
}

impl Admission {
    /// A request without tenant limits (open server, admin key).
    pub(crate) fn unlimited(tenant: Arc<RequestTenant>, in_flight: IntGauge) -> Self {
        in_flight.inc();
        Self { tenant, in_flight, held: None }
    }

    /// A request admitted under a tenant's limits as log entry `id`.
    pub(crate) fn limited(tenant: Arc<RequestTenant>, in_flight: IntGauge, usage: Arc<Usage>, id: u64, reserved: u64) -> Self {
        in_flight.inc();
        Self { tenant, in_flight, held: Some(Held { usage, id, reserved }) }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.in_flight.dec();
        if let Some(h) = &self.held {
            h.usage.release(h.id, h.reserved.saturating_sub(self.tenant.generated()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(c: Option<u32>, r: Option<u32>, t: Option<u64>) -> TenantLimits {
        TenantLimits { max_concurrency: c, requests_per_minute: r, tokens_per_minute: t }
    }

    #[test]
    fn requests_slide_out_of_the_window() {
        let u = Usage::default();
        let l = limits(None, Some(2), None);
        let t0 = Instant::now();
        let a = u.admit(&l, 1, t0).unwrap();
        u.admit(&l, 1, t0 + Duration::from_secs(10)).unwrap();
        u.release(a, 0);
        let e = u.admit(&l, 1, t0 + Duration::from_secs(20)).unwrap_err();
        assert_eq!(e, Refusal::Requests { retry_after: Duration::from_secs(40) });
        assert!(u.admit(&l, 1, t0 + WINDOW).is_ok(), "the first one expired");
        // A lowered limit waits for enough expiries.
        let e = u.admit(&limits(None, Some(1), None), 1, t0 + WINDOW).unwrap_err();
        assert_eq!(e, Refusal::Requests { retry_after: Duration::from_secs(60) });
    }

    #[test]
    fn tokens_reserve_then_refund() {
        let u = Usage::default();
        let l = limits(None, None, Some(100));
        let t0 = Instant::now();
        let a = u.admit(&l, 80, t0).unwrap();
        let e = u.admit(&l, 30, t0 + Duration::from_secs(5)).unwrap_err();
        assert_eq!(e, Refusal::Tokens { retry_after: Duration::from_secs(55) });
        u.release(a, 50); // 30 of 80 kept
        u.admit(&l, 70, t0 + Duration::from_secs(5)).unwrap();
        assert_eq!(u.admit(&l, 101, t0).unwrap_err(), Refusal::TooLarge);
        let e = u.admit(&l, 1, t0 + Duration::from_secs(6)).unwrap_err();
        assert_eq!(e, Refusal::Tokens { retry_after: Duration::from_secs(54) }, "the first entry frees enough");
    }

    #[test]
    fn concurrency_and_the_guard() {
        let u = Arc::new(Usage::default());
        let l = limits(Some(1), None, Some(1000));
        let gauge = IntGauge::new("g", "g").unwrap();
        let tag = Arc::new(RequestTenant::new("t".into()));
        let id = u.admit(&l, 110, Instant::now()).unwrap();
        let guard = Admission::limited(tag.clone(), gauge.clone(), u.clone(), id, 100);
        assert_eq!(gauge.get(), 1);
        assert_eq!(u.admit(&l, 1, Instant::now()).unwrap_err(), Refusal::Concurrency);
        tag.add_generated(40);
        drop(guard);
        assert_eq!(gauge.get(), 0);
        let w = u.window.lock().unwrap();
        assert_eq!((w.in_flight, w.tokens), (0, 50), "10 prompt + 40 generated kept");
    }
}
