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

    // Pinned adapters are never evicted: with both slots in use a third cannot load.
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
fn byte_limit_bounds_the_resident_set() {
    let probe = engine(LoraLimits::default());
    let shapes = probe.loras().shapes().clone();
    let size = |n: &str| loramux_engine::lora::LoraModel::load(n, &tiny().join("adapters").join(n), &shapes, 64).unwrap().bytes;
    let (a, b) = (size("a"), size("b"));
    let mut e = engine(LoraLimits { max_loras: 8, max_rank: 16, max_bytes: a + b - 1 });
    e.loras_mut().load("a", &tiny().join("adapters/a")).unwrap();
    e.loras_mut().load("b", &tiny().join("adapters/b")).unwrap();
    assert_eq!(e.loras().resident_count(), 1, "a was evicted to make room for b");
    assert!(e.loras().resident_bytes() <= a + b - 1);
}
