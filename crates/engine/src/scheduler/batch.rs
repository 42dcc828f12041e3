//! Running the planned pass and reporting what it produced. A pass that fails (an error
//! or a panic inside the forward pass) is rolled back and run again one adapter group at
//! a time, so a bad adapter fails only the sequences that use it and the rest of the batch
//! goes on.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::time::Instant;

use super::{failed, BatchStats, RequestEvent, RequestOutput, Scheduler, StepReport};
use crate::engine::Engine;
use crate::sequence::Sequence;
use crate::error::EngineError;
use crate::error::panic_message;

/// Runs one pass over `batch`, turning a panic into an error; on failure the sequences
/// that did not get their token are put back as they were.
fn execute_isolated(engine: &mut Engine, batch: &mut [&mut Sequence], take: &[usize]) -> Result<usize, String> {
    let marks: Vec<_> = batch.iter().map(|s| s.mark()).collect();
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| engine.execute(batch, take)));
    let message = match result {
        Ok(Ok(rows)) => return Ok(rows),
        Ok(Err(e)) => format!("forward pass failed: {e}"),
        Err(panic) => format!("forward pass panicked: {}", panic_message(&*panic)),
    };
    for (s, mark) in batch.iter_mut().zip(marks) {
        s.rollback_unless_advanced(mark);
    }
    Err(message)
}

impl Scheduler {
    pub(super) fn run_batch(&mut self, engine: &mut Engine, report: &mut StepReport) {
        let take = self.plan_chunks();
        let members: Vec<usize> = (0..self.running.len()).filter(|&i| take[i] > 0).collect();
        let decode_rows = members.iter().filter(|&&i| take[i] == 1 && self.running[i].seq.pending_len() == 1).count();
        if !members.is_empty() {
            let t = Instant::now();
            let mut failures: Vec<(usize, String)> = Vec::new();
            let chunks: Vec<usize> = members.iter().map(|&i| take[i]).collect();
            let mut batch: Vec<&mut Sequence> = Vec::with_capacity(members.len());
            {
                let mut rest = self.running.iter_mut().enumerate().filter(|(i, _)| take[*i] > 0);
                batch.extend((&mut rest).map(|(_, r)| &mut r.seq));
            }
            let marks: Vec<_> = batch.iter().map(|s| s.mark()).collect();
            let rows = match execute_isolated(engine, &mut batch, &chunks) {
                Ok(rows) => rows,
                Err(message) => {
                    tracing::error!("{message}; running the batch again one adapter at a time");
                    // Sequences that got their token before the failure are done for this step.
                    let mut groups: BTreeMap<Option<usize>, Vec<usize>> = BTreeMap::new();
                    for (k, s) in batch.iter().enumerate() {
                        if !s.advanced_since(&marks[k]) {
                            groups.entry(s.slot()).or_default().push(k);
                        }
                    }
                    let mut rows = 0;
                    let mut slots: Vec<Option<&mut Sequence>> = batch.into_iter().map(Some).collect();
                    for (_, ks) in groups {
                        let mut group: Vec<&mut Sequence> = ks.iter().map(|&k| slots[k].take().expect("each sequence once")).collect();
                        let group_take: Vec<usize> = ks.iter().map(|&k| chunks[k]).collect();
                        match execute_isolated(engine, &mut group, &group_take) {
                            Ok(r) => rows += r,
                            Err(m) => {
                                tracing::error!("{m}; failing the {} sequences of this adapter", ks.len());
                                failures.extend(ks.iter().map(|&k| (members[k], m.clone())));
                            }
                        }
                    }
                    rows
                }
            };
            let seconds = t.elapsed().as_secs_f64();
            if failures.is_empty() {
                self.step_model.observe(decode_rows, rows.saturating_sub(decode_rows), seconds);
            }
            report.batch = Some(BatchStats { seqs: members.len(), rows, decode_rows, seconds });
            failures.sort_by_key(|f| std::cmp::Reverse(f.0));
            for (i, message) in failures {
                let mut r = self.running.swap_remove(i);
                engine.finish_sequence(&mut r.seq);
                report.outputs.push(failed(r.id, EngineError::StepFailed(message)));
            }
        }
        self.collect_outputs(engine, &mut report.outputs);
    }

    /// Reports new text and ends, and retires finished sequences.
    fn collect_outputs(&mut self, engine: &mut Engine, outputs: &mut Vec<RequestOutput>) {
        let mut i = 0;
        while i < self.running.len() {
            let r = &mut self.running[i];
            let new_tokens = r.seq.output_ids.len() - r.sent_tokens;
            self.fair.generated(r.share.as_ref(), new_tokens);
            if new_tokens > 0 || r.seq.finish.is_some() {
                let logprobs = r.seq.logprobs[r.sent_logprobs..].to_vec();
                r.sent_tokens = r.seq.output_ids.len();
                r.sent_logprobs = r.seq.logprobs.len();
                let text = r.seq.take_new_text().to_string();
                if !text.is_empty() || !logprobs.is_empty() || new_tokens > 0 {
                    outputs.push(RequestOutput { id: r.id, event: RequestEvent::Output { text, new_tokens, logprobs } });
                }
            }
            if self.running[i].seq.finish.is_some() {
                let mut r = self.running.swap_remove(i);
                let out = r.seq.output_ids.len() as f64;
                self.typical_output.add(out, 0.05);
                if r.seq.finish == Some(crate::sequence::FinishReason::Stop) {
                    self.natural_output.add(out, 0.05);
                }
                engine.finish_sequence(&mut r.seq);
                outputs.push(RequestOutput { id: r.id, event: RequestEvent::Finished { completion: Box::new(r.seq.into_completion()) } });
                continue;
            }
            i += 1;
        }
    }
}
