//! LoRA sections: unmerged against merged and base by rank, mixed batches over many
//! adapters, and `--auto-merge`.

use std::time::Duration;

use super::{decode_step_seconds, decode_step_seconds_with, load, median, row, EngineBenchConfig, Row, ROUNDS};
use crate::synth::write_random_adapter;

/// Unmerged vs merged vs base decode step time by rank (float base), and mixed batches
/// over many distinct adapters (model as shipped).
pub fn lora_cost(cfg: &EngineBenchConfig, rows: &mut Vec<Row>, progress: &dyn Fn(&str)) {
    let mut engine = load(cfg, true, 4);
    let shapes = engine.loras().shapes().clone();
    for &r in &cfg.lora_ranks {
        let dir = cfg.work_dir.join(format!("rank{r}"));
        write_random_adapter(&dir, &shapes, r, r as u64).expect("write adapter");
        engine.loras_mut().load("x", &dir).expect("load adapter");
        for &b in &cfg.lora_batches {
            progress(&format!("rank {r} batch {b}"));
            let (mut base, mut unmerged, mut merged) = (Vec::new(), Vec::new(), Vec::new());
            // Interleaved rounds, so a slow spell of the machine lands on all three alike.
            for _ in 0..ROUNDS {
                base.push(decode_step_seconds(&mut engine, &vec![None; b], cfg.prompt_len, cfg.decode_steps).median);
                unmerged.push(decode_step_seconds(&mut engine, &vec![Some("x".to_string()); b], cfg.prompt_len, cfg.decode_steps).median);
                engine.merge_adapter("x").expect("merge");
                merged.push(decode_step_seconds(&mut engine, &vec![Some("x".to_string()); b], cfg.prompt_len, cfg.decode_steps).median);
                engine.unmerge_adapter();
            }
            let (base, unmerged, merged) = (median(base), median(unmerged), median(merged));
            let label = format!("rank {r} all-linear, float32 base");
            rows.push(row("lora_step_ms", format!("{label}: base"), b, base * 1e3, "ms"));
            rows.push(row("lora_step_ms", format!("{label}: merged"), b, merged * 1e3, "ms"));
            rows.push(row("lora_step_ms", format!("{label}: unmerged"), b, unmerged * 1e3, "ms"));
            rows.push(row("lora_ratio", format!("{label}: unmerged / merged"), b, unmerged / merged, "x"));
        }
        engine.loras_mut().unload("x").expect("unload");
    }

    let max_adapters = cfg.adapter_counts.iter().copied().max().unwrap_or(1);
    let mut engine = load(cfg, false, max_adapters);
    for i in 0..max_adapters {
        let dir = cfg.work_dir.join(format!("mixed{i}"));
        write_random_adapter(&dir, &shapes, 16, 1000 + i as u64).expect("write adapter");
        engine.loras_mut().load(&format!("m{i}"), &dir).expect("load adapter");
    }
    let b = cfg.mixed_batch;
    // Every configuration once per round, rounds interleaved; each figure is the median.
    let configs: Vec<Option<usize>> = std::iter::once(None).chain(cfg.adapter_counts.iter().copied().map(Some)).collect();
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    for round in 0..ROUNDS {
        for (config, t) in configs.iter().zip(&mut times) {
            progress(&format!("{b} sequences over {} adapters, round {}", config.unwrap_or(0), round + 1));
            let adapters: Vec<Option<String>> = (0..b).map(|i| config.map(|k| format!("m{}", i % k))).collect();
            t.push(decode_step_seconds(&mut engine, &adapters, cfg.prompt_len, cfg.decode_steps).median);
        }
    }
    let steps: Vec<f64> = times.into_iter().map(median).collect();
    let one = configs.iter().zip(&steps).find(|(c, _)| **c == Some(1)).map(|(_, &s)| s);
    for (config, &step) in configs.iter().zip(&steps) {
        match config {
            None => rows.push(row("mixed_step_ms", "no adapter", b, step * 1e3, "ms")),
            Some(k) => {
                rows.push(row("mixed_step_ms", format!("{k} distinct rank-16 adapters"), b, step * 1e3, "ms"));
                if let Some(one) = one {
                    rows.push(row("mixed_ratio", format!("{k} adapters / 1 adapter"), b, step / one, "x"));
                }
            }
        }
    }
}

/// `--auto-merge` on a float base: decode step time of one-adapter traffic (folded after
/// the first step) against the base and against the same traffic unmerged, two-adapter
/// traffic with and without `--auto-merge` (never folded), and the fold and unfold times.
pub fn auto_merge(cfg: &EngineBenchConfig, rows: &mut Vec<Row>, progress: &dyn Fn(&str)) {
    let mut engine = load(cfg, true, 4);
    let shapes = engine.loras().shapes().clone();
    for (name, seed) in [("x", 31), ("y", 32)] {
        let dir = cfg.work_dir.join(format!("merge-{name}"));
        write_random_adapter(&dir, &shapes, 16, seed).expect("write adapter");
        engine.loras_mut().load(name, &dir).expect("load adapter");
    }
    let b = cfg.mixed_batch;
    let on = Some(Duration::ZERO);
    let one: Vec<Option<String>> = vec![Some("x".into()); b];
    let two: Vec<Option<String>> = (0..b).map(|i| Some(["x", "y"][i % 2].to_string())).collect();
    let cases: [(&str, &[Option<String>], Option<Duration>); 5] = [
        ("base", &vec![None; b], None),
        ("1 adapter, unmerged", &one, None),
        ("1 adapter, --auto-merge", &one, on),
        ("2 adapters, unmerged", &two, None),
        ("2 adapters, --auto-merge", &two, on),
    ];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for round in 0..ROUNDS {
        progress(&format!("auto-merge, round {}", round + 1));
        for ((_, adapters, after), t) in cases.iter().zip(&mut times) {
            let params = loramux_engine::SamplingParams { ignore_eos: true, ..loramux_engine::SamplingParams::greedy(cfg.decode_steps + 2) };
            t.push(decode_step_seconds_with(&mut engine, adapters, cfg.prompt_len, cfg.decode_steps, *after, &params).median);
            engine.unmerge_adapter();
        }
    }
    let steps: Vec<f64> = times.into_iter().map(median).collect();
    let label = "rank-16 all-linear, float32 base";
    for ((case, _, _), step) in cases.iter().zip(&steps) {
        rows.push(row("auto_merge", format!("{label}: {case}, decode step"), b, step * 1e3, "ms"));
    }
    rows.push(row("auto_merge", "1 adapter --auto-merge / base, decode step", b, steps[2] / steps[0], "x"));
    rows.push(row("auto_merge", "1 adapter --auto-merge / unmerged, decode step", b, steps[2] / steps[1], "x"));
    rows.push(row("auto_merge", "2 adapters --auto-merge / unmerged, decode step", b, steps[4] / steps[3], "x"));
    progress("merge and unmerge times");
    let (mut merge, mut unmerge) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        merge.push(engine.merge_adapter("x").expect("merge") * 1e3);
        unmerge.push(engine.unmerge_adapter() * 1e3);
    }
    rows.push(row("auto_merge", format!("{label}: merge (fold B·A into the weights), median of 5"), 1, median(merge), "ms"));
    rows.push(row("auto_merge", format!("{label}: unmerge (restore the kept weights), median of 5"), 1, median(unmerge), "ms"));
}

