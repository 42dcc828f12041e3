//! Fair share between clients (VTC, `scheduler/fair.rs`) on the tiny Llama: with the batch
//! full, a heavy client that queued 10x the requests of a light one does not make the light
//! one wait behind all of them; two backlogged clients of weights 2:1 are served tokens 2:1;
//! a client's own requests keep their order; without clients admission is first come, first
//! served. Each assertion fails with first-come-first-served admission.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use loramux_engine::{Engine, EngineOptions, FairShare, ModelLocation, Prompt, Request, RequestEvent, SamplingParams, Scheduler, SchedulerConfig};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny/llama")
}

fn request(seed: u32, max_tokens: usize) -> Request {
    Request {
        lora: None,
        prompt: Prompt::Tokens((0..16).map(|i| 5 + (i * 31 + seed * 17) % 370).collect()),
        params: SamplingParams { ignore_eos: true, ..SamplingParams::greedy(max_tokens) },
    }
}

fn share(name: &str, weight: f64) -> FairShare {
    FairShare { client: Arc::from(name), weight }
}

/// Queues `requests` (id, client) at once, runs with `max_num_seqs` rows, and returns the
/// ids in the order they started and each id's step of finishing.
fn run(requests: &[(u64, Option<FairShare>)], max_num_seqs: usize, max_tokens: usize) -> (Vec<u64>, Vec<(u64, usize)>) {
    let mut e = Engine::load(&ModelLocation::HfDir(tiny()), &EngineOptions::default()).unwrap();
    let cfg = SchedulerConfig { max_num_seqs, ..SchedulerConfig::for_batch(requests.len()) };
    let mut sched = Scheduler::new(cfg, &e).unwrap();
    for (id, client) in requests {
        let mut p = e.input().process(request(*id as u32, max_tokens)).unwrap();
        if let Some(c) = client {
            p = p.with_share(c.clone());
        }
        let ticket = sched.admission_gate().try_enter(loramux_engine::scheduler::Demand::of(&p)).unwrap();
        sched.add_request(&mut e, ticket, *id, p, None).unwrap();
    }
    let (mut started, mut finished) = (Vec::new(), Vec::new());
    let mut step = 0;
    while sched.has_unfinished() {
        for out in sched.step(&mut e).outputs {
            match out.event {
                RequestEvent::Started { .. } => started.push(out.id),
                RequestEvent::Finished { .. } => finished.push((out.id, step)),
                RequestEvent::Failed(err) => panic!("request {} failed: {err}", out.id),
                _ => {}
            }
        }
        step += 1;
        assert!(step < 10_000);
    }
    (started, finished)
}

#[test]
fn a_light_client_is_not_queued_behind_a_heavy_one() {
    // Heavy queued 20 requests (ids 0..20) before light's 2 (ids 100, 101).
    let (heavy, light) = (share("heavy", 1.0), share("light", 1.0));
    let mut reqs: Vec<(u64, Option<FairShare>)> = (0..20).map(|i| (i, Some(heavy.clone()))).collect();
    reqs.extend([(100, Some(light.clone())), (101, Some(light.clone()))]);
    let (started, _) = run(&reqs, 2, 8);
    let pos = |id| started.iter().position(|s| *s == id).unwrap();
    // Fair share: light's requests start among the first few, not after the 20 heavy ones.
    assert!(pos(100) <= 2 && pos(101) <= 5, "start order {started:?}");
    // Each client's own requests keep their order.
    let heavy_order: Vec<u64> = started.iter().copied().filter(|id| *id < 100).collect();
    assert_eq!(heavy_order, (0..20).collect::<Vec<_>>());
    // Without clients: first come, first served.
    let plain: Vec<(u64, Option<FairShare>)> = reqs.iter().map(|(id, _)| (*id, None)).collect();
    let (started, _) = run(&plain, 2, 8);
    assert_eq!(started, plain.iter().map(|r| r.0).collect::<Vec<_>>());
}

#[test]
fn weights_split_service_two_to_one_while_both_are_backlogged() {
    let (a, b) = (share("a", 2.0), share("b", 1.0));
    // Both backlogged with 30 equal requests each; one row at a time.
    let mut reqs: Vec<(u64, Option<FairShare>)> = (0..30).map(|i| (i, Some(a.clone()))).collect();
    reqs.extend((100..130).map(|i| (i, Some(b.clone()))));
    let (started, _) = run(&reqs, 1, 4);
    // Over the first 30 admissions (both still backlogged), a gets twice b's.
    let first: Vec<u64> = started[..30].to_vec();
    let (na, nb) = (first.iter().filter(|id| **id < 100).count(), first.iter().filter(|id| **id >= 100).count());
    assert!((19..=21).contains(&na) && (9..=11).contains(&nb), "a {na}, b {nb} of the first 30: {first:?}");
}
