//! The adapter upload body (`POST /v1/adapters`): `multipart/form-data` bytes to an upload
//! form. The input's first line is the content type when it starts with `multipart/`, else
//! the whole input is a body under a fixed boundary. Any `Err` is fine (the server answers
//! 400 naming the part); panics are bugs. A parsed form promises an adapter (two PEFT files
//! or one GGUF file), and checking its name never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use loramux_server::uploads::{check_upload_name, parse_upload, AdapterFiles};

fuzz_target!(|data: &[u8]| {
    let (content_type, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) if data.starts_with(b"multipart/") => (String::from_utf8_lossy(&data[..i]).into_owned(), &data[i + 1..]),
        _ => ("multipart/form-data; boundary=XyZ".to_string(), data),
    };
    let Ok(form) = parse_upload(&content_type, body.to_vec().into()) else { return };
    match &form.files {
        AdapterFiles::Peft { config, weights } => assert!(config.len() + weights.len() <= body.len()),
        AdapterFiles::Gguf { file, .. } => assert!(file.len() <= body.len()),
    }
    if let Some(name) = &form.name {
        assert!(name.len() <= 256);
        let _ = check_upload_name(name);
    }
});
