//! The tenants file parser (`--tenants FILE`): TOML text to checked tenants. Any `Err` is
//! fine (the server refuses the file, or keeps the previous one on reload); panics are bugs.
//! What a parsed file promises is asserted: valid unique names, finite positive weights, a
//! default adapter its tenant may use, and key lookup and adapter matching that never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use loramux_server::tenants::{parse_tenants, Glob, Tenants};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // A pattern matches itself literally; matching stays polynomial on any input.
    assert!(Glob::new(text).matches(text));
    let _ = Glob::new(text).matches("");
    let Ok(tenants) = parse_tenants(text) else { return };
    let mut names: Vec<&str> = tenants.iter().map(|t| t.name.as_str()).collect();
    for t in &tenants {
        assert!(!t.name.is_empty() && t.name.len() <= 64, "{:?}", t.name);
        assert!(t.weight.is_finite() && t.weight > 0.0);
        if let Some(d) = &t.default_adapter {
            assert!(t.may_use(d), "{t:?}");
        }
        let _ = t.may_use(text);
    }
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), tenants.len(), "names are unique");
    let set = Tenants::new(tenants);
    let _ = set.find(text);
});
