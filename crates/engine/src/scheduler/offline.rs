//! Offline batches (`loramux generate`, tests, the engine benchmark): every request
//! through the same [`Scheduler`] the server uses, so what is measured is what is served.
//! It lives here, not in the engine, because it is scheduling: the engine runs the passes
//! the scheduler plans and never names the scheduler.

use super::{Scheduler, SchedulerConfig};
use crate::engine::Engine;
use crate::error::Result;
use crate::input::Request;
use crate::sequence::Completion;

impl Engine {
    /// Runs requests to completion as one mixed batch (every adapter in the same forward
    /// passes, scheduled as the server schedules them); results come back in input order.
    pub fn generate(&mut self, requests: &[Request]) -> Result<Vec<Completion>> {
        let processed = requests.iter().map(|r| self.input().process(r.clone())).collect::<Result<Vec<_>>>()?;
        Scheduler::new(SchedulerConfig::for_batch(processed.len()), self)?.run_to_completion(self, processed)
    }
}
