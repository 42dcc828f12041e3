//! Sampling-controls section: what presence/frequency/repetition penalties, `logit_bias` and
//! `min_p` cost per decode step at the batch size a server runs (issue #24: at most 5 % of
//! decode tokens/s at batch 32).

use loramux_engine::SamplingParams;

use super::{decode_step_seconds_with, load, median, row, EngineBenchConfig, Row, ROUNDS};

/// Rows of the batch.
const SAMPLER_BATCH: usize = 32;

/// Median decode step time of a batch of 32 sampled rows (temperature 0.8, top_p 0.95):
/// plain; with the penalties (presence 0.5, frequency 0.5, repetition 1.2) and 300
/// `logit_bias` entries; and with `min_p` 0.05 on top (which also shrinks what top_p sorts).
/// Rounds interleaved, medians kept.
pub fn sampler(cfg: &EngineBenchConfig, rows: &mut Vec<Row>, progress: &dyn Fn(&str)) {
    let mut engine = load(cfg, false, 1);
    let tokens = cfg.decode_steps + 2;
    let plain = SamplingParams { ignore_eos: true, temperature: 0.8, top_p: 0.95, seed: Some(1), ..SamplingParams::greedy(tokens) };
    let penalties = SamplingParams {
        presence_penalty: 0.5,
        frequency_penalty: 0.5,
        repetition_penalty: 1.2,
        logit_bias: (0..300u32).map(|i| (i * 97 % 40_000 + 100, if i % 2 == 0 { 5.0 } else { -5.0 })).collect(),
        ..plain.clone()
    };
    let min_p = SamplingParams { min_p: 0.05, ..penalties.clone() };
    let configs = [
        ("sampled (temperature 0.8, top_p 0.95)", plain),
        ("+ presence/frequency/repetition penalties and 300 logit_bias entries", penalties),
        ("+ min_p 0.05 as well", min_p),
    ];
    let adapters = vec![None; SAMPLER_BATCH];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    for round in 0..ROUNDS {
        progress(&format!("sampler: round {}", round + 1));
        for ((_, params), t) in configs.iter().zip(&mut times) {
            t.push(decode_step_seconds_with(&mut engine, &adapters, cfg.prompt_len, cfg.decode_steps, None, params).median);
        }
    }
    let times: Vec<f64> = times.into_iter().map(median).collect();
    let n = SAMPLER_BATCH;
    for ((label, _), t) in configs.iter().zip(&times) {
        rows.push(row("sampler", format!("decode tok/s, {label}"), n, n as f64 / t, "tok/s"));
    }
    rows.push(row("sampler", "penalties + logit_bias / plain, decode tok/s", n, times[0] / times[1], "x"));
    rows.push(row("sampler", "penalties + logit_bias + min_p / plain, decode tok/s", n, times[0] / times[2], "x"));
}
