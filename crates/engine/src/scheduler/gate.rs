//! The waiting queue's bound, checked on the threads that submit requests (an HTTP 429
//! needs no trip through the batch loop), and adapted to the rate the server starts
//! requests at.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{EngineError, Result};

/// The bound of the waiting queue, shared with the threads that submit requests so they
/// can refuse one at once (HTTP 429) when it is full, without waiting for the batch loop.
/// Full means `capacity` requests waiting, or, with a queue-delay bound, as many as the
/// server starts in that many seconds: the rate is measured while requests wait (when it
/// is the server's capacity, not the arrival rate), so the bound follows the machine.
#[derive(Debug)]
pub struct AdmissionGate {
    capacity: usize,
    queued: AtomicUsize,
    /// Longest expected wait admitted, seconds (`f64` bits; infinite: no bound).
    max_delay: f64,
    /// Requests started per second while others waited (`f64` bits; 0: not measured yet).
    start_rate: AtomicU64,
}

/// A place in the waiting queue, held from submission until the request starts, fails or
/// is dropped; dropping it frees the place.
#[derive(Debug)]
pub struct AdmissionTicket(Arc<AdmissionGate>);

impl AdmissionGate {
    /// A gate letting at most `capacity` requests wait at once, and no more than the
    /// server starts in `max_delay` (when given).
    pub fn new(capacity: usize, max_delay: Option<Duration>) -> Arc<Self> {
        Arc::new(Self {
            capacity,
            queued: AtomicUsize::new(0),
            max_delay: max_delay.map_or(f64::INFINITY, |d| d.as_secs_f64()),
            start_rate: AtomicU64::new(0f64.to_bits()),
        })
    }

    /// Requests the queue admits now: `capacity`, or fewer when the measured start rate
    /// says they would wait longer than the delay bound.
    fn limit(&self) -> usize {
        let rate = f64::from_bits(self.start_rate.load(Ordering::Relaxed));
        if self.max_delay.is_finite() && rate > 0.0 {
            (self.capacity as f64).min((rate * self.max_delay).ceil().max(1.0)) as usize
        } else {
            self.capacity
        }
    }

    /// A place in the queue, or [`EngineError::Overloaded`] when it is full.
    pub fn try_enter(self: &Arc<Self>) -> Result<AdmissionTicket> {
        let limit = self.limit();
        let entered = self.queued.fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| (q < limit).then_some(q + 1));
        match entered {
            Ok(_) => Ok(AdmissionTicket(self.clone())),
            Err(q) if limit < self.capacity => Err(EngineError::Overloaded(format!(
                "{q} requests are waiting already, about {:.1} s of work at the current rate; retry later",
                self.max_delay
            ))),
            Err(q) => Err(EngineError::Overloaded(format!("{q} requests are waiting already; retry later"))),
        }
    }

    /// Folds one measurement of the start rate in (an exponential moving average).
    pub(super) fn observe_start_rate(&self, rate: f64) {
        let old = f64::from_bits(self.start_rate.load(Ordering::Relaxed));
        let new = if old > 0.0 { 0.7 * old + 0.3 * rate } else { rate };
        self.start_rate.store(new.to_bits(), Ordering::Relaxed);
    }

    /// Requests holding a place now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }
}

impl Drop for AdmissionTicket {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::AcqRel);
    }
}
