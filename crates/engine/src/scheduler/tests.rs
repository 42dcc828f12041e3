//! The fair-share rules that need a TPOT target's fitted step time: who may start past the
//! soft row limit ([`super::admission`]) and whose prompts go first in a pass
//! ([`super::budget`]). A synthetic fit (5 ms + 2 ms a decode row + 1 ms a prefill token,
//! a 25 ms target) gives a batch of 8 rows and 17 prefill tokens a step on the tiny Llama.

use std::sync::Arc;
use std::time::Duration;

use super::{Demand, Scheduler, SchedulerConfig, SchedulingPolicy};
use crate::{Engine, EngineOptions, FairShare, ModelLocation, Prompt, Request, SamplingParams};

fn tiny_scheduler(policy: SchedulingPolicy) -> (Engine, Scheduler) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny/llama");
    let e = Engine::load(&ModelLocation::HfDir(dir), &EngineOptions::default()).unwrap();
    let cfg = SchedulerConfig { max_num_seqs: 16, policy, target_tpot: Some(Duration::from_millis(25)), ..SchedulerConfig::for_batch(16) };
    let mut sched = Scheduler::new(cfg, &e).unwrap();
    for i in 0..64usize {
        let (d, p) = (i % 8, (i * 7) % 40);
        sched.step_model.observe(d, p, 0.005 + 0.002 * d as f64 + 0.001 * p as f64);
    }
    assert_eq!(sched.batch_limit(), 8);
    (e, sched)
}

fn queue(sched: &mut Scheduler, e: &mut Engine, id: u64, client: &str, prompt_len: u32) {
    let request = Request {
        lora: None,
        prompt: Prompt::Tokens((0..prompt_len).map(|i| 5 + (i * 31 + id as u32 * 17) % 370).collect()),
        params: SamplingParams { ignore_eos: true, ..SamplingParams::greedy(8) },
    };
    let p = e.input().process(request).unwrap().with_share(FairShare { client: Arc::from(client), weight: 1.0 });
    let ticket = sched.admission_gate().try_enter(Demand::of(&p)).unwrap();
    sched.add_request(e, ticket, id, p, None).unwrap();
}

fn admit(sched: &mut Scheduler, e: &mut Engine) {
    let mut outputs = Vec::new();
    sched.admit(e, &mut outputs);
}

/// Six heavy prompts started before one light prompt: the light client, within its 4 rows
/// while heavy holds 6, has its whole prompt planned first (past the 17 tokens of room);
/// first come, first served, the room goes to heavy's older prompts and light waits.
fn planned_light_tokens(policy: SchedulingPolicy) -> (usize, usize) {
    let (mut e, mut sched) = tiny_scheduler(policy);
    for id in 0..6 {
        queue(&mut sched, &mut e, id, "heavy", 24);
    }
    admit(&mut sched, &mut e);
    queue(&mut sched, &mut e, 100, "light", 40);
    admit(&mut sched, &mut e);
    assert_eq!(sched.num_running(), 7);
    if policy == SchedulingPolicy::Fair {
        // Shares are rounded up: of 7 rows, each of the two clients may hold 4.
        let shares: Vec<(String, usize, usize)> = sched.row_standings(7, None).into_iter().map(|c| (c.client.to_string(), c.rows, c.fair_rows)).collect();
        assert_eq!(shares, [("heavy".to_string(), 6, 4), ("light".to_string(), 1, 4)]);
    }
    let take = sched.plan_chunks();
    let light = sched.running.iter().position(|r| r.id == 100).unwrap();
    let heavy: usize = take.iter().enumerate().filter(|&(i, _)| i != light).map(|(_, t)| t).sum();
    (take[light], heavy)
}

#[test]
fn a_client_within_its_row_share_has_its_prompt_prefilled_first() {
    assert_eq!(planned_light_tokens(SchedulingPolicy::Fair), (40, 0), "light's whole prompt, and the room it used up");
    assert_eq!(planned_light_tokens(SchedulingPolicy::Fcfs), (0, 17), "arrival order: the room goes to heavy");
}

/// The batch at its limit of 8 (heavy 7 rows, light 1), light then charged
/// `light_ahead_tokens` generated tokens more; then (if `heavy_waits`) one more heavy
/// request and `light_more` light ones arrive: how many start past the limit.
fn started_past_limit(policy: SchedulingPolicy, heavy_waits: bool, light_ahead_tokens: usize, light_more: u64) -> usize {
    let (mut e, mut sched) = tiny_scheduler(policy);
    for id in 0..7 {
        queue(&mut sched, &mut e, id, "heavy", 16);
    }
    admit(&mut sched, &mut e);
    queue(&mut sched, &mut e, 100, "light", 16);
    admit(&mut sched, &mut e);
    assert_eq!(sched.num_running(), 8);
    sched.fair.generated(Some(&FairShare { client: Arc::from("light"), weight: 1.0 }), light_ahead_tokens);
    if heavy_waits {
        queue(&mut sched, &mut e, 7, "heavy", 16);
    }
    for id in 101..101 + light_more {
        queue(&mut sched, &mut e, id, "light", 16);
    }
    admit(&mut sched, &mut e);
    sched.num_running() - 8
}

#[test]
fn past_the_soft_limit_only_a_client_below_its_row_share_and_not_ahead_starts() {
    // Light's requests start at once while it holds fewer than its 4 of 8 rows.
    assert_eq!(started_past_limit(SchedulingPolicy::Fair, false, 0, 3), 3);
    assert_eq!(started_past_limit(SchedulingPolicy::Fair, false, 0, 4), 3, "the fourth waits for a row");
    // A heavy request waits too (heavy holds more than its share, so it does not go past):
    // light, even with heavy in service, still starts...
    assert_eq!(started_past_limit(SchedulingPolicy::Fair, true, 0, 2), 2);
    // ...but not once it is more than a request ahead: the counters decide as rows free.
    assert_eq!(started_past_limit(SchedulingPolicy::Fair, true, 200, 2), 0);
    // First come, first served: nobody goes past the limit.
    assert_eq!(started_past_limit(SchedulingPolicy::Fcfs, false, 0, 3), 0);
}
