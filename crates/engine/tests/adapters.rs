//! Adapter loading: every unsupported or broken adapter is refused with an error naming
//! the field, and leaves the resident set as it was; the LRU resident set honours its
//! count and byte limits and reloads evicted adapters on demand.

use std::path::{Path, PathBuf};

use loramux_engine::{Engine, EngineError, EngineOptions, LoraLimits, LoraRequest, ModelLocation, Prompt, Request, SamplingParams};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny/llama")
}

fn engine(limits: LoraLimits) -> Engine {
    Engine::load(&ModelLocation::HfDir(tiny()), &EngineOptions { lora: limits, ..EngineOptions::default() }).unwrap()
}

/// A copy of fixture adapter `name` whose config is edited by `edit`.
fn edited_copy(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = tiny().join("adapters").join(name);
    std::fs::copy(src.join("adapter_model.safetensors"), dir.path().join("adapter_model.safetensors")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(dir.path().join("adapter_config.json"), cfg.to_string()).unwrap();
    dir
}

fn field_of(err: EngineError) -> (String, String) {
    match err {
        EngineError::Adapter { field, message, .. } => (field, message),
        other => panic!("expected an adapter error, got {other}"),
    }
}

fn greedy(engine: &mut Engine, adapter: Option<&str>) -> Vec<u32> {
    let r = Request {
        lora: adapter.map(LoraRequest::new),
        prompt: Prompt::Tokens(vec![284, 282, 359, 298, 264]),
        params: SamplingParams { ignore_eos: true, ..SamplingParams::greedy(6) },
    };
    engine.generate(&[r]).unwrap().remove(0).token_ids
}

#[test]
fn unsupported_and_broken_adapters_are_refused_by_field() {
    let mut e = engine(LoraLimits { max_loras: 4, max_rank: 16, ..LoraLimits::default() });
    e.loras_mut().load("good", &tiny().join("adapters/a")).unwrap();
    let before = greedy(&mut e, Some("good"));

    let cases: Vec<(tempfile::TempDir, &str)> = vec![
        (edited_copy("b", |c| c["use_dora"] = true.into()), "use_dora"),
        (edited_copy("b", |c| c["modules_to_save"] = serde_json::json!(["lm_head"])), "modules_to_save"),
        (edited_copy("b", |c| c["target_modules"] = serde_json::json!(["q_proj", "embed_tokens"])), "target_modules"),
        (edited_copy("b", |c| c["bias"] = "all".into()), "bias"),
        // The weights are rank 8: a config claiming rank 4 no longer fits.
        (edited_copy("b", |c| c["r"] = 4.into()), "shape"),
        // Targets a module the weights file has nothing for.
        (edited_copy("a", |c| c["target_modules"] = serde_json::json!(["q_proj", "v_proj", "o_proj"])), "target_modules"),
    ];
    for (dir, field) in &cases {
        let err = e.loras_mut().load("bad", dir.path()).unwrap_err();
        assert_eq!(field_of(err).0, *field);
    }

    // Rank above the configured maximum.
    let mut small = engine(LoraLimits { max_loras: 4, max_rank: 4, ..LoraLimits::default() });
    let (field, message) = field_of(small.loras_mut().load("b", &tiny().join("adapters/b")).unwrap_err());
    assert_eq!(field, "r");
    assert!(message.contains("--max-lora-rank"), "{message}");

    // Missing and corrupt files, and a pickle-only adapter.
    let empty = tempfile::tempdir().unwrap();
    assert_eq!(field_of(e.loras_mut().load("bad", empty.path()).unwrap_err()).0, "adapter_config.json");
    let corrupt = edited_copy("a", |_| {});
    let bytes = std::fs::read(corrupt.path().join("adapter_model.safetensors")).unwrap();
    std::fs::write(corrupt.path().join("adapter_model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let (field, message) = field_of(e.loras_mut().load("bad", corrupt.path()).unwrap_err());
    assert_eq!(field, "adapter_model.safetensors");
    assert!(message.contains("corrupt"), "{message}");
    let pickle = edited_copy("a", |_| {});
    std::fs::rename(pickle.path().join("adapter_model.safetensors"), pickle.path().join("adapter_model.bin")).unwrap();
    let (_, message) = field_of(e.loras_mut().load("bad", pickle.path()).unwrap_err());
    assert!(message.contains("save_file"), "the error says how to convert: {message}");

    // Nothing was loaded or changed by any failure.
    assert_eq!(e.loras().resident_count(), 1);
    assert!(e.loras().adapters().iter().all(|a| a.name != "bad"));
    assert_eq!(greedy(&mut e, Some("good")), before);
}

#[test]
fn target_modules_order_does_not_matter() {
    let mut e = engine(LoraLimits { max_loras: 4, max_rank: 16, ..LoraLimits::default() });
    e.loras_mut().load("a", &tiny().join("adapters/a")).unwrap();
    let reversed = edited_copy("a", |c| {
        let mut list: Vec<serde_json::Value> = c["target_modules"].as_array().unwrap().clone();
        list.reverse();
        c["target_modules"] = list.into();
    });
    e.loras_mut().load("a_reversed", reversed.path()).unwrap();
    assert_eq!(greedy(&mut e, Some("a")), greedy(&mut e, Some("a_reversed")));
    assert_ne!(greedy(&mut e, Some("a")), greedy(&mut e, None), "the adapter changes the output");
}

#[test]
fn resident_set_evicts_least_recently_used_idle_adapter_and_reloads_on_demand() {
    let mut e = engine(LoraLimits { max_loras: 2, max_rank: 16, ..LoraLimits::default() });
    for name in ["a", "b", "c"] {
        e.loras_mut().register(name, &tiny().join("adapters").join(name));
    }
    let out_a = greedy(&mut e, Some("a"));
    greedy(&mut e, Some("b"));
    assert_eq!(e.loras().resident_count(), 2);
    greedy(&mut e, Some("a")); // a is now more recent than b
    greedy(&mut e, Some("c")); // evicts b
    let resident: Vec<String> = e.loras().adapters().into_iter().filter(|a| a.resident.is_some()).map(|a| a.name).collect();
    assert_eq!(resident, vec!["a", "c"]);
    assert_eq!(e.loras().stats().evictions, 1);
    greedy(&mut e, Some("b")); // reloaded from disk, evicting a
    assert_eq!(e.loras().stats().loads, 4);
    assert_eq!(greedy(&mut e, Some("a")), out_a, "an evicted adapter reloads identically");

    // Adapters in use are never evicted: with both slots in use a third cannot load.
    let req = |a: &str| Request {
        lora: Some(LoraRequest::new(a)),
        prompt: Prompt::Tokens(vec![1, 2, 3]),
        params: SamplingParams::greedy(2),
    };
    let start = |e: &mut Engine, r: Request| {
        let processed = e.input().process(r)?;
        e.start_sequence(processed)
    };
    let mut s1 = start(&mut e, req("a")).unwrap();
    let resident_now: Vec<String> = e.loras().adapters().into_iter().filter(|a| a.resident.is_some()).map(|a| a.name).collect();
    let other = resident_now.iter().find(|n| *n != "a").unwrap().clone();
    let mut s2 = start(&mut e, req(&other)).unwrap();
    let third = ["a", "b", "c"].into_iter().find(|n| !resident_now.iter().any(|r| r == n)).unwrap();
    assert!(matches!(start(&mut e, req(third)), Err(EngineError::AdapterCapacity(_))));
    e.finish_sequence(&mut s1);
    e.finish_sequence(&mut s2);
    assert!(start(&mut e, req(third)).is_ok());
}

#[test]
fn pinned_adapter_stays_resident_while_others_rotate_and_usage_is_counted() {
    let mut e = engine(LoraLimits { max_loras: 2, max_rank: 16, ..LoraLimits::default() });
    for name in ["a", "b", "c"] {
        e.loras_mut().register(name, &tiny().join("adapters").join(name));
    }
    e.loras_mut().pin("a").unwrap();
    let info = |e: &Engine, n: &str| e.loras().adapters().into_iter().find(|a| a.name == n).unwrap();
    assert!(info(&e, "a").resident.is_some() && info(&e, "a").pinned, "pinning makes it resident at once");
    assert_eq!(info(&e, "a").requests, 0);
    assert!(info(&e, "a").last_used.is_none());
    // b and c share the one unpinned slot; a, least recently used, is never the victim.
    for n in ["b", "c", "b", "c"] {
        greedy(&mut e, Some(n));
        assert!(info(&e, "a").resident.is_some(), "pinned adapter evicted after a request on {n}");
    }
    assert_eq!(e.loras().stats().evictions, 3);
    assert_eq!((info(&e, "b").requests, info(&e, "c").requests, info(&e, "a").requests), (2, 2, 0));
    let before = std::time::SystemTime::now();
    greedy(&mut e, Some("a"));
    assert_eq!(info(&e, "a").requests, 1);
    assert!(info(&e, "a").last_used.unwrap() >= before);
    // The last unpinned slot cannot be pinned, unknown adapters cannot be pinned.
    assert!(matches!(e.loras_mut().pin("b"), Err(EngineError::AdapterCapacity(_))));
    assert!(matches!(e.loras_mut().pin("nope"), Err(EngineError::UnknownAdapter(_))));
    // An unload unpins and forgets the usage; loaded again, it starts afresh.
    e.loras_mut().unload("a").unwrap();
    e.loras_mut().load("a", &tiny().join("adapters/a")).unwrap();
    assert!(!info(&e, "a").pinned);
    assert_eq!(info(&e, "a").requests, 0);
}

#[test]
fn byte_limit_bounds_the_resident_set() {
    let probe = engine(LoraLimits::default());
    let shapes = probe.loras().shapes().clone();
    let size = |n: &str| loramux_engine::lora::LoraModel::load(n, &tiny().join("adapters").join(n), &shapes, 64).unwrap().bytes;
    let (a, b) = (size("a"), size("b"));
    let mut e = engine(LoraLimits { max_loras: 8, max_rank: 16, max_bytes: a + b - 1 });
    e.loras_mut().load("a", &tiny().join("adapters/a")).unwrap();
    e.loras_mut().load("b", &tiny().join("adapters/b")).unwrap();
    assert_eq!(e.loras().resident_count(), 1, "a was evicted to make room for b");
    assert!(e.loras().resident_bytes() < a + b);
}

#[test]
fn lora_dirs_are_scanned_and_looked_up_by_plain_folder_name_only() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, other) = (tmp.path().join("root"), tmp.path().join("other"));
    for dir in [root.join("good"), root.join(".hidden"), root.join("no-config"), other.join("evil")] {
        std::fs::create_dir_all(&dir).unwrap();
    }
    for dir in [root.join("good"), root.join(".hidden"), other.join("evil")] {
        std::fs::write(dir.join("adapter_config.json"), "{}").unwrap();
    }
    // A symlink the operator put in the directory counts: what it holds is their choice.
    std::os::unix::fs::symlink(other.join("evil"), root.join("link")).unwrap();
    let names: Vec<String> = loramux_engine::lora::scan_lora_dir(&root).unwrap().into_iter().map(|x| x.0).collect();
    assert_eq!(names, vec!["good", "link"]);

    let mut e = engine(LoraLimits::default());
    e.loras_mut().add_lora_dir(root.clone());
    e.loras_mut().resolve("good").unwrap();
    // A client-chosen name cannot walk out of the directory.
    for name in ["..", "../other/evil", ".hidden", "good/..", "", "missing"] {
        assert!(e.loras_mut().resolve(name).is_err(), "{name:?} was resolved");
    }
}

#[test]
fn a_lazy_read_finishing_after_an_in_place_load_does_not_bring_the_old_adapter_back() {
    use loramux_engine::lora::{InsertOutcome, LoraModel, Readiness};
    use std::time::{Duration, Instant};

    // One slot, so that evicting x and asking for it again shows what a stale read left behind.
    let mut e = engine(LoraLimits { max_loras: 1, max_rank: 16, ..LoraLimits::default() });
    let shapes = e.loras().shapes().clone();
    let (old, new, other) = (tiny().join("adapters/a"), tiny().join("adapters/b"), tiny().join("adapters/c"));
    e.loras_mut().register("x", &old);
    assert!(matches!(e.loras_mut().readiness("x").unwrap(), Readiness::Loading), "a lazy read of x (from a) starts");

    // An admin replaces x in place (with b) while that read is in flight.
    let replacement = LoraModel::load("x", &new, &shapes, 16).unwrap();
    assert_eq!(e.loras_mut().add(replacement, 0.0, true).unwrap(), InsertOutcome::Resident);
    assert_eq!(e.loras().get_by_name("x").unwrap().path, new);

    // The read of a finishes meanwhile (a tiny adapter reads in milliseconds): it is dropped.
    for _ in 0..50 {
        let events = e.loras_mut().poll_loads();
        assert!(events.loaded.is_empty() && events.failed.is_empty(), "a stale read was reported: {events:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(e.loras().get_by_name("x").unwrap().path, new, "x is still the in-place load");

    // Evicted and wanted again, x comes back as b: nothing of the stale read was kept.
    e.loras_mut().load("y", &other).unwrap();
    assert!(e.loras().get_by_name("x").is_none(), "x was evicted for y");
    let t = Instant::now();
    loop {
        match e.loras_mut().readiness("x").unwrap() {
            Readiness::Resident => break,
            Readiness::Loading => {}
            Readiness::Blocked => panic!("x is blocked with an idle slot"),
        }
        e.loras_mut().poll_loads();
        assert!(t.elapsed() < Duration::from_secs(10), "x never became resident again");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(e.loras().get_by_name("x").unwrap().path, new, "x came back with the in-place load's weights, not the stale read's");

    // And it generates as b does.
    let with_x = greedy(&mut e, Some("x"));
    e.loras_mut().load("b", &new).unwrap();
    assert_eq!(with_x, greedy(&mut e, Some("b")));
}

/// An adapter file truncated and rewritten in place while it is being read (an operator
/// replacing weights under a running server, a lazy re-read after eviction) must give an
/// error or a complete adapter: never SIGBUS, which a memory map of the shrinking file
/// raised and which killed the whole server (scripts/faults.sh truncated_during_read).
#[test]
fn adapter_file_truncated_while_being_read_is_an_error_not_sigbus() {
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicBool, Ordering};

    let shapes = loramux_engine::lora::ModuleShapes::from_config(
        &loramux_engine::ModelConfig::from_hf_file(&tiny().join("config.json")).unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let src = tiny().join("adapters/b");
    std::fs::copy(src.join("adapter_config.json"), dir.path().join("adapter_config.json")).unwrap();
    let weights = dir.path().join("adapter_model.safetensors");
    let full = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    std::fs::write(&weights, &full).unwrap();
    let stop = AtomicBool::new(false);
    let (mut ok, mut refused) = (0, 0);
    std::thread::scope(|s| {
        s.spawn(|| {
            // In place, same inode: shrink (to a header, to nothing), then write it back whole.
            let f = std::fs::OpenOptions::new().write(true).open(&weights).unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                f.set_len([0, 4096, full.len() as u64 / 2][(i % 3) as usize]).unwrap();
                f.write_all_at(&full, 0).unwrap();
                i += 1;
            }
        });
        let end = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while std::time::Instant::now() < end {
            match loramux_engine::lora::LoraModel::load("b", dir.path(), &shapes, 64) {
                Ok(m) => {
                    assert!(m.max_rank > 0);
                    ok += 1;
                }
                Err(EngineError::Adapter { .. }) => refused += 1,
                Err(other) => panic!("unexpected error kind: {other}"),
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert!(ok + refused > 0);
}
