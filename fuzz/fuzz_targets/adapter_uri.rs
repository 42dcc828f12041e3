//! Adapter URIs (`s3://`, `hf://`, `https://`, `#sha256=` pins; issue #23), as given on the
//! command line, in `load_lora_adapter`'s `lora_path` and in the `--lora-sync` file: any text is
//! a local path, a URI, or an error naming the URI, never a panic; an accepted URI parses the
//! same from its own display (the form the disk cache keys on), and a prefix joined with an
//! adapter name stays a URI of the same store. The same text read as the AWS shared
//! credentials or config file (S3 sources without `AWS_*` keys) is a profile, none, or an
//! error naming a line, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use loramux_server::sources::{AdapterUri, AwsProfile};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for profile in ["default", "team"] {
        if let Err(e) = AwsProfile::from_texts(profile, Some(text), Some(text)) {
            assert!(e.contains("line "), "{e}");
        }
    }
    let Ok(Some(uri)) = AdapterUri::parse(text) else { return };
    let shown = uri.to_string();
    let again = AdapterUri::parse(&shown).expect("an accepted URI parses again").expect("still a URI");
    assert_eq!(again, uri, "{text:?} -> {shown:?}");
    let _ = (uri.shape(), uri.kind(), uri.without_pin());
    let joined = uri.join("adapter");
    assert_eq!(joined.kind(), uri.kind());
    assert!(joined.sha256.is_none());
});
