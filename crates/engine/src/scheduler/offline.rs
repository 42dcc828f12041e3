//! Offline batches (`loramux generate`, tests, the engine benchmark): every request
//! through the same [`Scheduler`] the server uses, so what is measured is what is served.
//! It lives here, not in the engine, because it is scheduling: the engine runs the passes
//! the scheduler plans and never names the scheduler.

use std::collections::HashMap;
use std::sync::Arc;

use super::{RequestEvent, RequestId, Scheduler, SchedulerConfig};
use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::input::{ProcessedRequest, Request};
use crate::sequence::Completion;

impl Engine {
    /// Runs requests to completion as one mixed batch (every adapter in the same forward
    /// passes, scheduled as the server schedules them); results come back in input order.
    pub fn generate(&mut self, requests: &[Request]) -> Result<Vec<Completion>> {
        let processed = requests.iter().map(|r| self.input().process(r.clone())).collect::<Result<Vec<_>>>()?;
        Scheduler::new(SchedulerConfig::for_batch(processed.len()), self)?.run_to_completion(self, processed)
    }
}

impl Scheduler {
    /// Runs `requests` to completion (no deadlines, every request admitted at once when the
    /// limits allow); results in input order.
    pub fn run_to_completion(mut self, engine: &mut Engine, requests: Vec<ProcessedRequest>) -> Result<Vec<Completion>> {
        let n = requests.len();
        for (id, r) in requests.into_iter().enumerate() {
            let ticket = self.gate.try_enter(super::Demand::of(&r))?;
            self.add_request(engine, ticket, id as RequestId, r, None)?;
        }
        let mut done: HashMap<RequestId, Completion> = HashMap::with_capacity(n);
        while self.has_unfinished() || !self.pending.is_empty() {
            for out in self.step(engine).outputs {
                match out.event {
                    RequestEvent::Finished { completion } => {
                        done.insert(out.id, *completion);
                    }
                    RequestEvent::Failed(e) => {
                        self.abort_all(engine);
                        return Err(Arc::try_unwrap(e).unwrap_or_else(|e| EngineError::StepFailed(e.to_string())));
                    }
                    RequestEvent::Started { .. } | RequestEvent::Output { .. } => {}
                }
            }
        }
        (0..n as RequestId).map(|id| done.remove(&id).ok_or_else(|| EngineError::StepFailed(format!("request {id} did not finish")))).collect()
    }
}
