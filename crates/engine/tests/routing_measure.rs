//! Which layer and pooling make the best router (issue #20): embeds each task adapter's
//! routing examples (adapters/tasks/<task>/routing.json) and held-out prompts
//! (heldout.jsonl) with SmolLM2-135M's base weights, then prints held-out routing accuracy
//! for each layer x pooling x scoring x centering, the margins, and the time per prompt.
//! A measurement, not a check: `cargo test --release -p loramux-engine --test
//! routing_measure -- --ignored --nocapture` (ROUTING_HELDOUT=n prompts per task, default 40).

use std::path::PathBuf;
use std::time::Instant;

use loramux_engine::registry::{cached_model_path, known_model};
use loramux_engine::routing::{pool, read_routing_file, score_all, AdapterRoute, Pooling, Scoring};
use loramux_engine::{ChatMessage, Engine, EngineOptions, ModelLocation, Prompt};

const TASKS: [&str; 5] = ["sql", "json", "date", "sentiment", "numbers"];
const LAYERS: [usize; 9] = [2, 4, 8, 12, 15, 18, 22, 26, 30];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
#[ignore = "a measurement: run with --ignored --nocapture"]
fn routing_layer_pooling_sweep() {
    let path = cached_model_path(known_model("smollm2-135m").unwrap());
    if !path.exists() {
        eprintln!("skipped: {} is not cached", path.display());
        return;
    }
    let per_task: usize = std::env::var("ROUTING_HELDOUT").ok().and_then(|v| v.parse().ok()).unwrap_or(40);
    let engine = Engine::load(&ModelLocation::Gguf(path), &EngineOptions { max_model_len: Some(2048), ..Default::default() }).unwrap();
    let model = engine.model().base_view();
    let input = engine.input().clone();
    let embed_all = |text: &str| -> (Vec<Vec<f32>>, Vec<Vec<f32>>, f64) {
        let ids = input.tokenize(&Prompt::Chat(vec![ChatMessage::user(text)])).unwrap();
        let t = Instant::now();
        let h = model.hidden_states(&ids, &LAYERS).unwrap();
        let s = t.elapsed().as_secs_f64();
        let mean = h.iter().map(|x| pool(x, if std::env::var("ROUTING_SKIP_FIRST").is_ok() { Pooling::MeanSkipFirst } else { Pooling::Mean }).unwrap()).collect();
        let last = h.iter().map(|x| pool(x, Pooling::LastToken).unwrap()).collect();
        (mean, last, s)
    };
    // examples[pooling][layer][task] = route; queries: (task, [pooling][layer] embedding)
    let mut examples: Vec<Vec<Vec<AdapterRoute>>> = vec![vec![Vec::new(); LAYERS.len()]; 2];
    for task in TASKS {
        let spec = read_routing_file(&repo().join("adapters/tasks").join(task)).unwrap().unwrap();
        let embs: Vec<_> = spec.examples.iter().map(|e| embed_all(e)).collect();
        for l in 0..LAYERS.len() {
            for (p, ex) in examples.iter_mut().enumerate() {
                let v = embs.iter().map(|(m, last, _)| if p == 0 { m[l].clone() } else { last[l].clone() }).collect();
                ex[l].push(AdapterRoute { description: None, examples: v });
            }
        }
    }
    let mut queries = Vec::new();
    for (ti, task) in TASKS.iter().enumerate() {
        let text = std::fs::read_to_string(repo().join("adapters/tasks").join(task).join("heldout.jsonl")).unwrap();
        for line in text.lines().take(per_task) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let (m, last, _) = embed_all(v["prompt"].as_str().unwrap());
            queries.push((ti, m, last));
        }
    }
    let nonsense = ["Tell me a joke about penguins.", "What is the capital of Australia?", "Write a haiku about autumn leaves.", "How do I bake sourdough bread?", "asdf qwerty zxcv"];
    let nonsense: Vec<_> = nonsense.iter().map(|t| embed_all(t)).collect();
    println!("held-out prompts: {} ({per_task} per task), 8 examples per task", queries.len());
    println!("| layer | pooling | scoring | centered | accuracy | median margin (correct) | p10 margin (correct) | median margin (wrong) | max margin (off-topic) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let quant = |v: &mut Vec<f32>, q: f32| -> f32 {
        if v.is_empty() {
            return f32::NAN;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        v[((v.len() - 1) as f32 * q) as usize]
    };
    for (l, layer) in LAYERS.iter().enumerate() {
        for p in 0..2 {
            for scoring in [Scoring::Nearest, Scoring::Centroid] {
                for center in [false, true] {
                    let routes: Vec<&AdapterRoute> = examples[p][l].iter().collect();
                    let decide = |q: &[f32]| {
                        let s = score_all(q, &routes, scoring, center);
                        let mut idx: Vec<usize> = (0..s.len()).collect();
                        idx.sort_by(|&a, &b| s[b].total_cmp(&s[a]));
                        (idx[0], s[idx[0]] - s[idx[1]])
                    };
                    let (mut ok, mut m_ok, mut m_bad) = (0, Vec::new(), Vec::new());
                    for (task, m, last) in &queries {
                        let q = if p == 0 { &m[l] } else { &last[l] };
                        let (best, margin) = decide(q);
                        if best == *task {
                            ok += 1;
                            m_ok.push(margin);
                        } else {
                            m_bad.push(margin);
                        }
                    }
                    let mut off: Vec<f32> = nonsense.iter().map(|(m, last, _)| decide(if p == 0 { &m[l] } else { &last[l] }).1).collect();
                    println!(
                        "| {layer} | {} | {:?} | {center} | {:.1}% | {:.3} | {:.3} | {:.3} | {:.3} |",
                        if p == 0 { "mean" } else { "last" },
                        scoring,
                        100.0 * ok as f64 / queries.len() as f64,
                        quant(&mut m_ok.clone(), 0.5),
                        quant(&mut m_ok, 0.1),
                        quant(&mut m_bad, 0.5),
                        quant(&mut off, 1.0),
                    );
                }
            }
        }
    }
    // Time of one routing pass at each depth (median over the held-out prompts).
    let text = std::fs::read_to_string(repo().join("adapters/tasks/sql/heldout.jsonl")).unwrap();
    for layer in [8usize, 15, 30] {
        let mut times = Vec::new();
        for line in text.lines().take(20) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let ids = input.tokenize(&Prompt::Chat(vec![ChatMessage::user(v["prompt"].as_str().unwrap())])).unwrap();
            let t = Instant::now();
            let h = model.hidden_states(&ids, &[layer]).unwrap();
            let _ = pool(&h[0], Pooling::Mean).unwrap();
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(|a, b| a.total_cmp(b));
        println!("layer {layer}: p50 embedding time {:.1} ms (p90 {:.1} ms)", times[times.len() / 2], times[times.len() * 9 / 10]);
    }
}
