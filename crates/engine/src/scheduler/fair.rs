//! Fair share between clients (tenants): the Virtual Token Counter of Sheng et al.,
//! "Fairness in Serving Large Language Models" (OSDI '24), inside continuous batching.
//! Each client has a counter of the service it received, weighted: `W_PROMPT` per prompt
//! token when its request is admitted, `W_OUTPUT` per generated token as it is generated,
//! both divided by the client's weight. Admission takes the next request of the waiting
//! client with the smallest counter (a client's own requests keep their order), so while
//! clients are backlogged the service each receives stays within a bound of its share
//! whatever each offers. A client that comes back after a quiet spell has its counter
//! lifted to the smallest counter among the clients waiting (or, with none waiting, to
//! the counter of the last client admitted), so idling banks no credit. Requests without a
//! client all share one counter: with no tenants, admission is first come, first served.

use std::collections::HashMap;
use std::sync::Arc;

use crate::input::FairShare;

/// Service units per prompt token (the paper's `w_p`).
pub const W_PROMPT: f64 = 1.0;
/// Service units per generated token (the paper's `w_q`: a generated token costs a forward
/// pass row each, prompt tokens share theirs, as OpenAI's prices weigh them).
pub const W_OUTPUT: f64 = 2.0;

/// Which waiting request is admitted next (vLLM's `--scheduling-policy`, with `fair` added).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SchedulingPolicy {
    /// Arrival order, whoever sent it.
    Fcfs,
    /// The client with the least weighted service first (VTC); arrival order without clients.
    #[default]
    Fair,
}

impl std::str::FromStr for SchedulingPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fcfs" => Ok(Self::Fcfs),
            "fair" => Ok(Self::Fair),
            other => Err(format!("'{other}' is not a scheduling policy (fcfs, fair)")),
        }
    }
}

/// Every client's counter.
#[derive(Debug, Default)]
pub struct VirtualCounters {
    counters: HashMap<Arc<str>, f64>,
    /// The counter of the client admitted last: the lift for a client arriving at an
    /// empty queue.
    last_admitted: f64,
}

fn key(share: Option<&FairShare>) -> &str {
    share.map_or("", |s| &s.client)
}

impl VirtualCounters {
    /// A client's counter (0 for one never served).
    pub fn counter(&self, share: Option<&FairShare>) -> f64 {
        self.counters.get(key(share)).copied().unwrap_or(0.0)
    }

    /// Counters of clients by name, for metrics (no copy: read on every step).
    pub fn iter(&self) -> impl Iterator<Item = (&str, f64)> + '_ {
        self.counters.iter().map(|(k, c)| (k.as_ref(), *c))
    }

    /// A request of `share` arrived; `waiting` are the clients with requests waiting
    /// (before this one). Lifts the counter of a client that had none.
    pub fn arrive<'a>(&mut self, share: Option<&FairShare>, mut waiting: impl Iterator<Item = Option<&'a FairShare>>) {
        let me = key(share);
        let mut others_min: Option<f64> = None;
        for w in waiting.by_ref() {
            if key(w) == me {
                return; // already backlogged: its counter stands
            }
            let c = self.counter(w);
            others_min = Some(others_min.map_or(c, |m: f64| m.min(c)));
        }
        let floor = others_min.unwrap_or(self.last_admitted);
        match self.counters.get_mut(me) {
            Some(c) => *c = c.max(floor),
            None => {
                self.counters.insert(Arc::from(me), floor);
            }
        }
    }

    /// A request of `share` was admitted with `prompt_tokens` to prefill.
    pub fn admitted(&mut self, share: Option<&FairShare>, prompt_tokens: usize) {
        let c = self.charge(share, W_PROMPT * prompt_tokens as f64);
        self.last_admitted = c;
    }

    /// `tokens` were generated for a request of `share`.
    pub fn generated(&mut self, share: Option<&FairShare>, tokens: usize) {
        if tokens > 0 {
            self.charge(share, W_OUTPUT * tokens as f64);
        }
    }

    fn charge(&mut self, share: Option<&FairShare>, units: f64) -> f64 {
        let add = units / share.map_or(1.0, |s| s.weight);
        // Looked up first: a client's name is copied only the first time it is charged, not
        // on every step of every running sequence.
        if let Some(c) = self.counters.get_mut(key(share)) {
            *c += add;
            return *c;
        }
        self.counters.insert(Arc::from(key(share)), add);
        add
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(name: &str, weight: f64) -> FairShare {
        FairShare { client: Arc::from(name), weight }
    }

    #[test]
    fn counters_weigh_tokens_and_lift_returning_clients() {
        let (a, b) = (share("a", 1.0), share("b", 2.0));
        let mut v = VirtualCounters::default();
        v.arrive(Some(&a), std::iter::empty());
        v.admitted(Some(&a), 100);
        v.generated(Some(&a), 10);
        assert_eq!(v.counter(Some(&a)), 120.0);
        // b, weight 2, pays half per token; arriving while a waits, it is lifted to a's counter.
        v.arrive(Some(&b), [Some(&a)].into_iter());
        assert_eq!(v.counter(Some(&b)), 120.0);
        v.admitted(Some(&b), 100);
        assert_eq!(v.counter(Some(&b)), 170.0);
        // A client already waiting is not lifted.
        v.arrive(Some(&a), [Some(&a), Some(&b)].into_iter());
        assert_eq!(v.counter(Some(&a)), 120.0);
        // With nobody waiting, a newcomer starts at the last admitted counter.
        let c = share("c", 1.0);
        v.arrive(Some(&c), std::iter::empty());
        assert_eq!(v.counter(Some(&c)), 170.0);
        // Requests without a client share one counter.
        v.admitted(None, 5);
        assert_eq!(v.counter(None), 5.0);
    }
}
