//! Past saturation, a TTFT target keeps goodput (issue #22): an overloaded server refuses
//! at once, with a Retry-After, what the engine's fitted step time says would get its first
//! token late, and the requests it admits meet the target. The load is shaped in steps of
//! the engine, and the target is set from the step time the server itself fitted, so the
//! result does not depend on the machine's speed.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::future::join_all;
use serde_json::{json, Value};

const COMPLETIONS: &str = "/v1/completions";
/// Rows of the batch: few, so a flood is many steps deep.
const ROWS: usize = 4;
const MET: &str = "loramux_slo_requests_total{met=\"true\",target=\"ttft\"}";
const MISSED: &str = "loramux_slo_requests_total{met=\"false\",target=\"ttft\"}";

fn body(max_tokens: usize) -> Value {
    json!({"model": "tiny", "prompt": "the quick brown fox", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true})
}

/// Seconds of one full step (ROWS decode rows and a short prompt's prefill), from the
/// coefficients the server publishes in /metrics.
async fn fitted_step_seconds(srv: &TestServer) -> f64 {
    let (_, text) = srv.get("/metrics").await;
    let term = |t: &str| metric_value(&text, &format!("loramux_step_model_seconds{{term=\"{t}\"}}"));
    term("base") + ROWS as f64 * term("per_decode_row") + 8.0 * term("per_prefill_token")
}

/// Runs `n` requests one after another so the server fits its step time.
async fn warm(srv: &TestServer, n: usize) {
    for _ in 0..n {
        let (st, v) = srv.post(COMPLETIONS, &body(8)).await;
        assert_eq!(st, 200, "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_saturation_a_ttft_target_refuses_at_once_and_admitted_requests_meet_it() {
    // The step time of this machine, fitted by a server without targets.
    let mut s = tiny_settings();
    s.max_num_seqs = ROWS;
    let probe = TestServer::tiny("llama", s.clone()).await;
    warm(&probe, 6).await;
    let step = fitted_step_seconds(&probe).await;
    probe.shutdown().await;
    assert!(step > 0.0 && step.is_finite(), "a fitted step time: {step}");

    // A target of 40 such steps, and waves of 12 requests x 48 tokens over 4 rows every 20
    // steps: about 10 times the work the server can do in that time.
    let target = Duration::from_secs_f64(40.0 * step);
    s.target_ttft = Some(target);
    s.max_queue_delay = Some(target);
    let srv = Arc::new(TestServer::tiny("llama", s).await);
    warm(&srv, 6).await;
    let (met_before, missed_before) = (srv.metric(MET).await, srv.metric(MISSED).await);
    let send = |srv: Arc<TestServer>| async move {
        let t = Instant::now();
        let r = srv.http.post(format!("{}{COMPLETIONS}", srv.url)).header("content-type", "application/json").body(body(48).to_string()).send().await.unwrap();
        let status = r.status().as_u16();
        let retry = r.headers().get("retry-after").map(|h| h.to_str().unwrap().to_string());
        let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        (status, retry, v, t.elapsed())
    };
    let mut flood = Vec::new();
    for _ in 0..8 {
        flood.extend((0..12).map(|_| tokio::spawn(send(srv.clone()))));
        tokio::time::sleep(target / 2).await;
    }
    let results: Vec<_> = join_all(flood).await.into_iter().map(|r| r.unwrap()).collect();

    let (mut served, mut refused) = (Vec::new(), Vec::new());
    for (status, retry, v, took) in results {
        match status {
            200 => {
                assert_eq!(v["usage"]["completion_tokens"], 48, "an admitted request is served whole: {v}");
                served.push(took);
            }
            429 => {
                assert_eq!(v["error"]["code"], "server_overloaded", "{v}");
                assert!(v["error"]["message"].as_str().unwrap().contains("target"), "the refusal says why: {v}");
                let retry: u64 = retry.expect("a Retry-After header").parse().expect("Retry-After in seconds");
                assert!(retry >= 1);
                refused.push(took);
            }
            _ => panic!("unexpected answer {status}: {v}"),
        }
    }
    assert!(!refused.is_empty(), "a flood ten times what the server can do is partly refused");
    assert!(!served.is_empty(), "and partly served");
    served.sort();
    let slowest_refusal = refused.iter().max().unwrap();
    assert!(
        *slowest_refusal < served[served.len() / 2],
        "refusals come at once ({slowest_refusal:?}), before the median admitted request finishes ({:?})",
        served[served.len() / 2]
    );
    let refusals = srv.metric("loramux_admissions_total{decision=\"refused\",reason=\"ttft_target\"}").await;
    assert_eq!(refusals as usize, refused.len(), "each refusal counted under its reason");

    // The flood's admitted requests met the target.
    let met = srv.metric(MET).await - met_before;
    let missed = srv.metric(MISSED).await - missed_before;
    assert_eq!((met + missed) as usize, served.len(), "every admitted request counted");
    assert!(met / (met + missed) >= 0.8, "admitted requests meet the TTFT target: {met} met, {missed} missed (target {target:?})");
    Arc::into_inner(srv).unwrap().shutdown().await;
}
