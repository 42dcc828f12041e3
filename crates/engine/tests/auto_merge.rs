//! Automatic merge and unmerge by traffic: an adapter holding every request is folded into
//! the float base weights, and unfolded as soon as a request for the base or another
//! adapter is queued; on the float32 model the greedy tokens are those of the unmerged path.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use loramux_engine::{
    Engine, EngineOptions, LoraLimits, LoraRequest, ModelLocation, Prompt, Request, RequestEvent, SamplingParams, Scheduler,
    SchedulerConfig,
};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny/llama")
}

fn engine() -> Engine {
    let options = EngineOptions { lora: LoraLimits { max_loras: 4, max_rank: 16, ..LoraLimits::default() }, ..EngineOptions::default() };
    let mut e = Engine::load(&ModelLocation::HfDir(tiny()), &options).unwrap();
    for name in ["a", "b"] {
        e.loras_mut().load(name, &tiny().join("adapters").join(name)).unwrap();
    }
    e
}

fn request(adapter: Option<&str>, seed: u32, max_tokens: usize) -> Request {
    Request {
        lora: adapter.map(LoraRequest::new),
        prompt: Prompt::Tokens((0..12).map(|i| 5 + (i * 31 + seed * 17) % 370).collect()),
        params: SamplingParams { ignore_eos: true, ..SamplingParams::greedy(max_tokens) },
    }
}

/// What a run did: each request's tokens, and the merges and unmerges with the step they
/// happened in.
#[derive(Debug, Default)]
struct Run {
    tokens: HashMap<u64, Vec<u32>>,
    merges: Vec<(usize, String)>,
    unmerges: Vec<(usize, String)>,
}

/// Steps `requests` (arrival: the number of forward passes run before it is queued) to
/// completion under `auto_merge_after`; events are recorded by forward pass too.
fn drive(auto_merge_after: Option<Duration>, requests: Vec<(usize, Request)>) -> Run {
    let mut e = engine();
    let cfg = SchedulerConfig { auto_merge_after, ..SchedulerConfig::for_batch(8) };
    let mut sched = Scheduler::new(cfg, &e).unwrap();
    let mut run = Run::default();
    let mut queued = vec![false; requests.len()];
    let mut passes = 0;
    let started = std::time::Instant::now();
    while run.tokens.len() < requests.len() {
        for (id, (arrival, r)) in requests.iter().enumerate() {
            if *arrival <= passes && !queued[id] {
                queued[id] = true;
                let processed = e.input().process(r.clone()).unwrap();
                let ticket = sched.admission_gate().try_enter(loramux_engine::scheduler::Demand::of(&processed)).unwrap();
                sched.add_request(&mut e, ticket, id as u64, processed, None).unwrap();
            }
        }
        let report = sched.step(&mut e);
        run.merges.extend(report.merges.into_iter().map(|(name, _)| (passes, name)));
        run.unmerges.extend(report.unmerges.into_iter().map(|(name, _)| (passes, name)));
        for out in report.outputs {
            match out.event {
                RequestEvent::Finished { completion } => {
                    run.tokens.insert(out.id, completion.token_ids);
                }
                RequestEvent::Failed(err) => panic!("request {} failed: {err}", out.id),
                _ => {}
            }
        }
        match report.batch {
            Some(_) => passes += 1,
            None => std::thread::sleep(Duration::from_millis(1)), // an adapter being read
        }
        assert!(started.elapsed() < Duration::from_secs(60), "did not finish: {run:?}");
    }
    run
}

#[test]
fn sole_adapter_is_merged_with_the_unmerged_paths_tokens_and_unmerged_when_others_arrive() {
    // Three requests on a, then (step 6) one on the base, then (step 12) two on b.
    let requests = vec![
        (0, request(Some("a"), 1, 20)),
        (0, request(Some("a"), 2, 20)),
        (1, request(Some("a"), 3, 20)),
        (6, request(None, 4, 4)),
        (12, request(Some("b"), 5, 6)),
        (12, request(Some("b"), 6, 6)),
    ];
    let want = drive(None, requests.clone());
    assert!(want.merges.is_empty() && want.unmerges.is_empty(), "no merge without --auto-merge");
    let got = drive(Some(Duration::ZERO), requests);
    for id in 0..6 {
        assert_eq!(got.tokens[&id], want.tokens[&id], "request {id}: merging changed the greedy tokens");
    }
    // a is merged at once and unfolded in the very step the base request arrives (6), folded
    // again once the base request is done, unfolded when b arrives (12), and once a or b is
    // done, the other is folded in.
    assert_eq!(got.merges.first(), Some(&(0, "a".to_string())), "{got:?}");
    let unmerge_steps: Vec<usize> = got.unmerges.iter().map(|(s, _)| *s).collect();
    assert_eq!(unmerge_steps, [6, 12], "{got:?}");
    assert!(got.merges.iter().any(|(s, _)| (7..12).contains(s)), "{got:?}");
    assert!(got.merges.iter().any(|(s, _)| *s > 12), "{got:?}");
}

#[test]
fn hysteresis_keeps_short_spells_unmerged() {
    let requests = vec![(0, request(Some("a"), 1, 6)), (0, request(Some("a"), 2, 6))];
    let run = drive(Some(Duration::from_secs(3600)), requests);
    assert!(run.merges.is_empty(), "{run:?}");
}
