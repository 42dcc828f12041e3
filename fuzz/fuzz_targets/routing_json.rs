//! The adapter routing file (`routing.json`, and the `"routing"` object of a runtime load):
//! any bytes give a spec within the caps or an error naming the field, never a panic; an
//! accepted spec parses the same from its own re-serialisation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use loramux_engine::routing::spec::{MAX_EXAMPLES, MAX_EXAMPLE_CHARS};
use loramux_engine::routing::{parse_routing, parse_routing_value};

fuzz_target!(|data: &[u8]| {
    let Ok(spec) = parse_routing(data, "routing.json") else { return };
    assert!(!spec.examples.is_empty() && spec.examples.len() <= MAX_EXAMPLES);
    assert!(spec.examples.iter().all(|e| !e.trim().is_empty() && e.chars().count() <= MAX_EXAMPLE_CHARS));
    let mut v = serde_json::json!({ "examples": spec.examples });
    if let Some(d) = &spec.description {
        v["description"] = serde_json::Value::String(d.clone());
    }
    assert_eq!(parse_routing_value(&v, "routing").expect("an accepted spec parses again"), spec);
});
