//! `loramux bench` end to end: every scenario runs with tiny settings against a real
//! loramux server it starts on loopback (the tiny Llama fixture and its adapters) —
//! `quality` in-process on SmolLM2-135M and the task adapters of `adapters/tasks` — its
//! result validates against the committed JSON Schema, `bench report` re-renders it, and
//! bad arguments end with a clear message and a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn tiny() -> String {
    repo().join("fixtures/tiny/llama").display().to_string()
}

fn adapter(name: &str) -> String {
    format!("{name}={}", repo().join("fixtures/tiny/llama/adapters").join(name).display())
}

fn loramux(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loramux"))
        .args(args)
        .env("LORAMUX_LOG", "warn")
        .output()
        .expect("loramux runs")
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// Validates `result` against the committed schema of its scenario.
fn check_schema(scenario: &str, result: &Value) {
    let schemas = read_json(&repo().join("docs/bench-results.schema.json"));
    let validator = jsonschema::validator_for(&schemas[scenario]).expect("schema compiles");
    let errors: Vec<String> = validator.iter_errors(result).map(|e| format!("{} at {}", e, e.instance_path())).collect();
    assert!(errors.is_empty(), "{scenario} result does not match the schema: {errors:#?}");
}

fn plots_written(dir: &Path, stem: &str) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            n.starts_with(stem) && (n.ends_with(".png") || n.ends_with(".svg"))
        })
        .count()
}

#[test]
fn committed_schema_is_the_generated_one() {
    let out = loramux(&["bench", "schema"]);
    ok(&out);
    let generated: Value = serde_json::from_slice(&out.stdout).unwrap();
    let committed = read_json(&repo().join("docs/bench-results.schema.json"));
    assert_eq!(generated, committed, "docs/bench-results.schema.json is stale: regenerate with `loramux bench schema`");
}

#[test]
fn switch_scenario_end_to_end_and_report() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().display().to_string();
    let out = loramux(&[
        "bench", "switch", "--model", &tiny(), "--lora", &adapter("a"), "--lora", &adapter("b"), "--adapter-a", "a",
        "--adapter-b", "b", "--requests", "6", "--runs", "2", "--concurrency", "2", "--max-tokens", "4", "--out", &out_dir,
    ]);
    ok(&out);
    let json_path = dir.path().join("switch.json");
    let r = read_json(&json_path);
    check_schema("switch", &r);
    assert_eq!(r["metadata"]["scenario"], "switch");
    let runs = r["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 4);
    for run in runs {
        assert_eq!(run["samples"].as_array().unwrap().len(), 6);
        assert_eq!(run["errors"], 0, "{run}");
        assert!(run["throughput_req_per_sec"].as_f64().unwrap() > 0.0);
        // Both adapters are resident from startup: no run needs an adapter load.
        assert_eq!(run["adapter_loads"].as_f64(), Some(0.0));
    }
    let alternating = &runs[1]["samples"];
    assert_eq!(alternating[0]["model"], "a");
    assert_eq!(alternating[1]["model"], "b");
    let ratio = r["summary"]["alternating_over_single"].as_f64().unwrap();
    let tp = |i: usize| runs[i]["throughput_req_per_sec"].as_f64().unwrap();
    let expected = (tp(1) + tp(3)) / (tp(0) + tp(2));
    assert!((ratio - expected).abs() < 1e-9, "{ratio} vs {expected}");
    assert!(plots_written(dir.path(), "switch") >= 4);
    let md = std::fs::read_to_string(dir.path().join("switch.md")).unwrap();
    assert!(md.contains("single_run_1") && md.contains("alternating_run_2"));

    // `bench report` re-renders the same Markdown from the JSON alone.
    std::fs::remove_file(dir.path().join("switch.md")).unwrap();
    std::fs::remove_file(dir.path().join("switch_throughput.png")).unwrap();
    ok(&loramux(&["bench", "report", &json_path.display().to_string()]));
    assert_eq!(std::fs::read_to_string(dir.path().join("switch.md")).unwrap(), md);
    assert!(dir.path().join("switch_throughput.png").is_file());
}

#[test]
fn deployment_scenario_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let out = loramux(&[
        "bench", "deployment", "--model", &tiny(), "--tasks", "3", "--seeds", "1", "--rank", "4", "--samples", "3",
        "--warmup", "1", "--max-tokens", "4", "--out", &dir.path().display().to_string(),
    ]);
    ok(&out);
    let r = read_json(&dir.path().join("deployment_benchmark_results.json"));
    check_schema("deployment", &r);
    assert_eq!(r["metadata"]["num_samples"], 3);
    assert_eq!(r["metadata"]["warmup_samples"], 1);
    let rows = r["results"].as_array().unwrap();
    let count = |t: &str| rows.iter().filter(|x| x["config_type"] == t).count();
    assert_eq!((count("single_lora"), count("full_ft"), count("multi_lora_2"), count("multi_lora_3")), (3, 3, 1, 1));
    for row in rows {
        assert_eq!(row["errors"], 0, "{row}");
        assert_eq!(row["latencies_ms"].as_array().unwrap().len(), 3);
        assert!(row["peak_memory_mb"].as_f64().unwrap() >= row["rss_after_mb"].as_f64().unwrap());
        assert!(row["rss_after_mb"].as_f64().unwrap() > 0.0);
        // Every request generated exactly max_tokens (ignore_eos).
        for s in row["samples"].as_array().unwrap() {
            assert_eq!(s["completion_tokens"], 4, "{s}");
        }
    }
    let multi3 = rows.iter().find(|x| x["config_type"] == "multi_lora_3").unwrap();
    assert_eq!(multi3["adapters"].as_array().unwrap().len(), 3);
    let t = &r["analysis"]["lora_vs_merged"]["paired_t_test"];
    assert_eq!(t["n"], 3);
    assert!(t["p_value"].as_f64().unwrap() >= 0.0 && t["p_value"].as_f64().unwrap() <= 1.0);
    assert!(r["analysis"]["conclusion"].as_str().unwrap().contains("merged"));
    assert!(plots_written(dir.path(), "deployment_benchmark_results") >= 6);
}

#[test]
fn swap_scenario_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let out = loramux(&[
        "bench", "swap", "--model", &tiny(), "--load-samples", "3", "--load-rank", "4", "--switch-samples", "6",
        "--ranks", "4,8", "--rank-concurrency", "1,2", "--max-tokens", "4", "--counts", "1,5", "--count-rank", "4",
        "--count-requests", "10", "--count-concurrency", "2", "--max-loras", "2", "--out", &dir.path().display().to_string(),
    ]);
    ok(&out);
    let r = read_json(&dir.path().join("swap.json"));
    check_schema("swap", &r);
    assert_eq!(r["costs"]["cold_load_ms"].as_array().unwrap().len(), 3);
    // The server's memory, read from its /metrics: before the loads, then after each.
    let rss = r["costs"]["rss_after_loads_mb"].as_array().unwrap();
    assert_eq!(rss.len(), 4, "{rss:?}");
    assert!(rss.iter().all(|m| m.as_f64().unwrap() > 0.0), "{rss:?}");
    assert!(r["costs"]["switch_ttft"]["n"].as_u64().unwrap() >= 2);
    assert_eq!(r["rank_sweep"].as_array().unwrap().len(), 6, "base + 2 ranks, 2 concurrencies");
    let counts = r["count_sweep"].as_array().unwrap();
    assert_eq!(counts.len(), 6);
    let rr5 = counts.iter().find(|p| p["adapters_on_disk"] == 5 && p["popularity"] == "round_robin").unwrap();
    assert_eq!(rr5["errors"], 0);
    assert_eq!(rr5["distinct_adapters_used"], 5);
    assert!(rr5["peak_memory_mb"].as_f64().unwrap() > 0.0, "{rr5}");
    // Five adapters round-robin through two slots: the server had to load lazily.
    assert!(rr5["adapter_loads"].as_f64().unwrap() >= 3.0, "{rr5}");
    assert!(plots_written(dir.path(), "swap") >= 6);
}

#[test]
fn load_scenario_counts_server_errors_without_failing() {
    let dir = tempfile::tempdir().unwrap();
    // Outputs of up to 200 tokens against a 64-token context: some requests are refused
    // with 400; the run goes on and reports them.
    let out = loramux(&[
        "bench", "load", "--model", &tiny(), "--lora", &adapter("a"), "--lora", &adapter("b"), "--server-arg=--max-model-len=64",
        "--rates", "20,40", "--duration", "1", "--prompt-words", "2:4", "--output-tokens", "2:200", "--popularity", "zipf",
        "--out", &dir.path().display().to_string(),
    ]);
    ok(&out);
    let r = read_json(&dir.path().join("load.json"));
    check_schema("load", &r);
    assert_eq!(r["models"], serde_json::json!(["a", "b"]));
    let points = r["points"].as_array().unwrap();
    assert_eq!(points.len(), 2);
    let total: u64 = points.iter().map(|p| p["requests"].as_u64().unwrap()).sum();
    let errors: u64 = points.iter().map(|p| p["errors"].as_u64().unwrap()).sum();
    assert!(total >= 20, "{total} requests");
    assert!(errors > 0 && errors < total, "{errors} errors of {total}");
    let failed = points[0]["samples"].as_array().unwrap().iter().chain(points[1]["samples"].as_array().unwrap()).find(|s| s["ok"] == false).unwrap();
    assert!(failed["error"].as_str().unwrap().contains("HTTP 400"), "{failed}");
    for p in points {
        assert!(p["ttft"]["p50"].as_f64().unwrap() > 0.0);
        assert!(p["goodput_req_per_sec"].as_f64().unwrap() <= p["throughput_req_per_sec"].as_f64().unwrap());
    }
    assert!(plots_written(dir.path(), "load") >= 4);
}

#[test]
fn bad_arguments_end_with_a_clear_message() {
    let out = loramux(&["bench", "teleport"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("unrecognized subcommand"), "{}", stderr(&out));

    let out = loramux(&["bench", "switch", "--url", "http://127.0.0.1:9", "--out", "/tmp/loramux-bench-unreachable"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cannot reach http://127.0.0.1:9"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"));

    let out = loramux(&["bench", "switch", "--model", &tiny(), "--lora", &adapter("a"), "--adapter-a", "a", "--adapter-b", "nope", "--out", "/tmp/loramux-bench-nope"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("does not serve nope"), "{}", stderr(&out));

    let out = loramux(&["bench", "report", "/nonexistent/result.json"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("/nonexistent/result.json"), "{}", stderr(&out));
}

/// The task adapters of SmolLM2-135M (`adapters/tasks/<task>/`), or `None` with a note when
/// this checkout does not have them yet.
fn task_adapters() -> Option<PathBuf> {
    let dir = repo().join("adapters/tasks");
    if !dir.join("sql/heldout.jsonl").is_file() {
        eprintln!("note: {} has no task adapters yet; skipping the quality scenario", dir.display());
        return None;
    }
    Some(dir)
}

#[test]
fn quality_scenario_end_to_end_and_report() {
    let Some(tasks) = task_adapters() else { return };
    let dir = tempfile::tempdir().unwrap();
    // A sweep of one trained rank (the task adapter itself) and one still training.
    let sweep = dir.path().join("sweep");
    std::fs::create_dir_all(sweep.join("sql-r64")).unwrap();
    std::os::unix::fs::symlink(tasks.join("sql"), sweep.join("sql-r8")).unwrap();
    let out = loramux(&[
        "bench", "quality", "--adapters", &tasks.display().to_string(), "--only", "sql", "--limit", "4", "--speed-tokens", "4",
        "--sweep", &sweep.display().to_string(), "--out", &dir.path().display().to_string(),
    ]);
    ok(&out);
    let r = read_json(&dir.path().join("quality.json"));
    check_schema("quality", &r);
    let task = &r["tasks"][0];
    assert_eq!(task["task"], "sql");
    let variants: Vec<&str> = task["variants"].as_array().unwrap().iter().map(|v| v["variant"].as_str().unwrap()).collect();
    assert_eq!(variants, ["base", "unmerged", "unmerged_f32", "merged_f32"]);
    for v in task["variants"].as_array().unwrap() {
        let samples = v["quality"]["samples"].as_array().unwrap();
        assert_eq!(samples.len(), 4);
        assert!(samples.iter().all(|s| s["answer_logprob"].as_f64().unwrap() < 0.0 && s["answer_tokens"].as_u64().unwrap() > 1));
        assert!(v["speed"]["batch16_tok_s"].as_f64().unwrap() > 0.0);
    }
    let (base, lora) = (&task["variants"][0]["quality"], &task["variants"][1]["quality"]);
    assert!(lora["mean_answer_logprob"].as_f64().unwrap() > base["mean_answer_logprob"].as_f64().unwrap() + 5.0, "{base} {lora}");
    assert_eq!(task["merged_agreement"]["share_identical"], 1.0, "{}", task["merged_agreement"]);
    assert!(task["merged_agreement"]["max_abs_delta_logprob"].as_f64().unwrap() < 1e-2);
    // The sweep's rank-8 point is the task adapter again: the same answers.
    let sweep = r["sweep"].as_array().unwrap();
    assert_eq!(sweep.len(), 1, "{sweep:?}");
    assert_eq!(sweep[0]["rank"], 8);
    assert_eq!(sweep[0]["quality"]["exact_match"], task["variants"][1]["quality"]["exact_match"]);
    assert!(r["notes"].as_array().unwrap().iter().any(|n| n.as_str().unwrap().contains("sql-r64")), "{}", r["notes"]);
    let md = std::fs::read_to_string(dir.path().join("quality.md")).unwrap();
    assert!(md.contains("LoRA vs merged, same answers? 4/4") && md.contains("## Rank sweep: sql"), "{md}");
    assert_eq!(plots_written(dir.path(), "quality_sql_"), 8, "4 sweep plots, PNG and SVG");

    // `bench report` re-renders it.
    std::fs::remove_file(dir.path().join("quality.md")).unwrap();
    ok(&loramux(&["bench", "report", &dir.path().join("quality.json").display().to_string()]));
    assert!(dir.path().join("quality.md").is_file());
    assert_eq!(plots_written(dir.path(), "quality_tasks"), 2);
}

#[test]
fn quality_scenario_rejects_bad_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = loramux(&["bench", "quality", "--adapters", &empty.display().to_string(), "--no-sweep"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no task adapters"), "{}", stderr(&out));

    let task = dir.path().join("tasks/sql");
    std::fs::create_dir_all(&task).unwrap();
    std::fs::write(task.join("adapter_config.json"), "{}").unwrap();
    std::fs::write(task.join("heldout.jsonl"), "{\"prompt\": \"a\", \"answer\": \"1\"}\n{\"prompt\": \"b\"}\n").unwrap();
    let out = loramux(&["bench", "quality", "--adapters", &dir.path().join("tasks").display().to_string(), "--no-sweep"]);
    assert!(!out.status.success());
    let heldout = format!("{}:2: no \"answer\" field", task.join("heldout.jsonl").display());
    assert!(stderr(&out).contains(&heldout), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"));
}
