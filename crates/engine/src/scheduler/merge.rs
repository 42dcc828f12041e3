//! Automatic merge and unmerge by traffic (dLoRA, OSDI'24). While one adapter has held
//! every running and waiting request for the hysteresis time, its update is folded into
//! the float base weights, so its rows cost what base rows cost; the moment a request for
//! the base or another adapter is queued, the fold is undone (the original weights were
//! kept, so this is a swap) before that request is admitted.

use std::time::Instant;

use super::{Scheduler, StepReport};
use crate::engine::Engine;

/// Who the requests in the scheduler are for.
#[derive(Debug, PartialEq, Eq)]
enum Traffic {
    /// No request at all.
    Idle,
    /// Every request is on this adapter.
    Sole(String),
    /// Some request is on the base or the requests span adapters.
    Mixed,
}

impl Traffic {
    /// A sole adapter not yet resident counts as mixed traffic.
    fn filter_resident(self, engine: &Engine) -> Traffic {
        match self {
            Traffic::Sole(name) if engine.loras().get_by_name(&name).is_none() => Traffic::Mixed,
            other => other,
        }
    }
}

/// When the current sole adapter started holding all the traffic.
#[derive(Debug, Default)]
pub(super) struct MergeState {
    sole_since: Option<(String, Instant)>,
    /// Unmerges done outside a step (an unload or replace), reported with the next one.
    unreported: Vec<(String, f64)>,
}

impl Scheduler {
    fn traffic(&self) -> Traffic {
        let running = self.running.iter().filter(|r| r.seq.finish.is_none()).map(|r| r.seq.lora());
        let waiting = self.waiting.iter().map(|w| w.request.lora());
        let mut sole: Option<&str> = None;
        for lora in running.chain(waiting) {
            match (lora.map(|l| l.lora_name.as_str()), sole) {
                (None, _) => return Traffic::Mixed,
                (Some(name), None) => sole = Some(name),
                (Some(name), Some(s)) if name == s => {}
                _ => return Traffic::Mixed,
            }
        }
        sole.map_or(Traffic::Idle, |s| Traffic::Sole(s.to_string()))
    }

    /// Merges the adapter that has held all traffic for the hysteresis time, unmerges as
    /// soon as anything else is queued; timings go to the report.
    pub(super) fn steer_merge(&mut self, engine: &mut Engine, report: &mut StepReport) {
        report.unmerges.append(&mut self.merge.unreported);
        let Some(after) = self.cfg.auto_merge_after else { return };
        let traffic = self.traffic();
        if let Some(merged) = engine.merged_adapter().map(str::to_string) {
            if matches!(&traffic, Traffic::Mixed) || matches!(&traffic, Traffic::Sole(s) if *s != merged) {
                let seconds = engine.unmerge_adapter();
                tracing::info!(adapter = %merged, ms = format!("{:.2}", seconds * 1e3), "adapter unmerged: other traffic arrived");
                report.unmerges.push((merged, seconds));
                self.merge.sole_since = None;
            }
            return;
        }
        // Only a resident adapter is merged: reading one is not the loop's work.
        let Traffic::Sole(name) = traffic.filter_resident(engine) else {
            self.merge.sole_since = None;
            return;
        };
        let now = Instant::now();
        match &self.merge.sole_since {
            Some((held, since)) if *held == name => {
                if now.duration_since(*since) < after {
                    return;
                }
            }
            _ => {
                self.merge.sole_since = Some((name.clone(), now));
                if !after.is_zero() {
                    return;
                }
            }
        }
        match engine.merge_adapter(&name) {
            Ok(seconds) => {
                tracing::info!(adapter = %name, ms = format!("{:.1}", seconds * 1e3), "adapter merged: it holds all traffic");
                report.merges.push((name, seconds));
            }
            Err(e) => {
                tracing::warn!(adapter = %name, "automatic merge failed, serving unmerged: {e}");
                self.merge.sole_since = None;
            }
        }
    }

    /// Undoes a merge of `name` before its weights change or go (unload, replace).
    pub(super) fn unmerge_if(&mut self, engine: &mut Engine, name: &str) {
        if engine.merged_adapter() == Some(name) {
            let seconds = engine.unmerge_adapter();
            self.merge.unreported.push((name.to_string(), seconds));
            self.merge.sole_since = None;
        }
    }
}
