//! The body of `POST /v1/adapters`: [`parse_upload`] reads a `multipart/form-data` body
//! (already in memory, bounded by `--max-upload-bytes`) into an [`UploadForm`]. It is a plain
//! function over bytes, so the fuzz target `upload_multipart` drives it without a server.
//! Only known parts are accepted: anything else (a `lora_path`, say) is refused, so an upload
//! can never make the server read a path of its own disk.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use axum::body::Bytes;

/// Why an upload's body was refused, naming the form field at fault.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FormError {
    /// The part (`adapter_config.json`, `name`, ...) or `multipart` for the framing.
    pub field: String,
    pub message: String,
}

impl FormError {
    fn new(field: &str, message: impl Into<String>) -> Self {
        Self { field: field.to_string(), message: message.into() }
    }
}

/// The adapter's files as uploaded.
#[derive(Clone, Debug, PartialEq)]
pub enum AdapterFiles {
    /// A PEFT adapter: `adapter_config.json` and `adapter_model.safetensors`.
    Peft { config: Bytes, weights: Bytes },
    /// A llama.cpp GGUF LoRA file, with the file name it was sent under.
    Gguf { file: Bytes, filename: Option<String> },
}

/// A parsed upload.
#[derive(Clone, Debug, PartialEq)]
pub struct UploadForm {
    pub files: AdapterFiles,
    /// `name`: what the adapter is served as, under the tenant's namespace.
    pub name: Option<String>,
    /// `overwrite=true`: replace an adapter of the same name instead of a 409.
    pub overwrite: bool,
    /// `tenant`: whose namespace (the admin key only).
    pub tenant: Option<String>,
    /// `routing.json`: makes the adapter routable by `model: "auto"`.
    pub routing: Option<Bytes>,
}

/// Longest text field (`name`, `tenant`, `overwrite`).
const MAX_TEXT: usize = 256;

/// Fields that are never accepted: they would name a file on the server's disk.
const PATH_FIELDS: [&str; 4] = ["lora_path", "path", "adapter_path", "file_path"];

/// Parses a `multipart/form-data` body with the request's `content_type` header. Parts:
/// `adapter_config.json` + `adapter_model.safetensors`, or `adapter` (a GGUF file; a part of
/// any name whose file name ends in `.gguf` is taken as it too); optional `name`,
/// `overwrite`, `tenant`, `routing.json`. A repeated or unknown part is refused.
pub fn parse_upload(content_type: &str, body: Bytes) -> Result<UploadForm, FormError> {
    let boundary = multer::parse_boundary(content_type)
        .map_err(|e| FormError::new("content-type", format!("expected multipart/form-data with a boundary: {e}")))?;
    let stream = futures_util::stream::iter([Ok::<Bytes, std::io::Error>(body)]);
    let multipart = multer::Multipart::new(stream, boundary);
    match poll_ready(read_parts(multipart)) {
        Some(r) => r,
        None => Err(FormError::new("multipart", "the body could not be read at once")),
    }
}

/// Runs a future that never waits (it reads from memory) to its end, without a runtime.
fn poll_ready<T>(fut: impl Future<Output = T>) -> Option<T> {
    let mut fut = pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

#[derive(Default)]
struct Parts {
    config: Option<Bytes>,
    weights: Option<Bytes>,
    gguf: Option<(Bytes, Option<String>)>,
    name: Option<String>,
    overwrite: Option<bool>,
    tenant: Option<String>,
    routing: Option<Bytes>,
}

async fn read_parts(mut multipart: multer::Multipart<'_>) -> Result<UploadForm, FormError> {
    let framing = |e: multer::Error| FormError::new("multipart", e.to_string());
    let mut parts = Parts::default();
    while let Some(field) = multipart.next_field().await.map_err(framing)? {
        let name = field.name().unwrap_or("").to_string();
        let filename = field.file_name().map(str::to_string);
        let data = field.bytes().await.map_err(|e| FormError::new(&name, e.to_string()))?;
        parts.add(&name, filename, data)?;
    }
    parts.finish()
}

fn set<T>(slot: &mut Option<T>, field: &str, value: T) -> Result<(), FormError> {
    if slot.replace(value).is_some() {
        return Err(FormError::new(field, "this part is given twice"));
    }
    Ok(())
}

fn text(field: &str, data: &Bytes) -> Result<String, FormError> {
    if data.len() > MAX_TEXT {
        return Err(FormError::new(field, format!("at most {MAX_TEXT} bytes")));
    }
    let s = std::str::from_utf8(data).map_err(|_| FormError::new(field, "not UTF-8 text"))?;
    Ok(s.trim().to_string())
}

impl Parts {
    fn add(&mut self, name: &str, filename: Option<String>, data: Bytes) -> Result<(), FormError> {
        let gguf_file = filename.as_deref().is_some_and(|f| f.to_ascii_lowercase().ends_with(".gguf"));
        match name {
            "adapter_config.json" => set(&mut self.config, name, data),
            "adapter_model.safetensors" => set(&mut self.weights, name, data),
            "routing.json" => set(&mut self.routing, name, data),
            "name" => set(&mut self.name, name, text(name, &data)?),
            "tenant" => set(&mut self.tenant, name, text(name, &data)?),
            "overwrite" => {
                let v = match text(name, &data)?.as_str() {
                    "true" | "1" => true,
                    "false" | "0" | "" => false,
                    other => return Err(FormError::new(name, format!("'{}' is not true or false", other.escape_debug()))),
                };
                set(&mut self.overwrite, name, v)
            }
            "adapter" => set(&mut self.gguf, name, (data, filename)),
            _ if PATH_FIELDS.contains(&name) => {
                Err(FormError::new(name, "uploads take the adapter's files as parts; a path on the server is never read"))
            }
            _ if gguf_file => set(&mut self.gguf, "adapter", (data, filename)),
            _ => Err(FormError::new(
                if name.is_empty() { "multipart" } else { name },
                "unknown part: expected adapter_config.json and adapter_model.safetensors, or adapter (a .gguf file); name, overwrite, tenant, routing.json",
            )),
        }
    }

    fn finish(self) -> Result<UploadForm, FormError> {
        let files = match (self.config, self.weights, self.gguf) {
            (Some(config), Some(weights), None) => AdapterFiles::Peft { config, weights },
            (None, None, Some((file, filename))) => AdapterFiles::Gguf { file, filename },
            (Some(_), None, None) => return Err(FormError::new("adapter_model.safetensors", "is required with adapter_config.json")),
            (None, Some(_), None) => return Err(FormError::new("adapter_config.json", "is required with adapter_model.safetensors")),
            (None, None, None) => {
                return Err(FormError::new("adapter", "no adapter: send adapter_config.json and adapter_model.safetensors, or a .gguf file as adapter"))
            }
            _ => return Err(FormError::new("adapter", "send either a PEFT adapter (two files) or a GGUF file, not both")),
        };
        Ok(UploadForm { files, name: self.name, overwrite: self.overwrite.unwrap_or(false), tenant: self.tenant, routing: self.routing })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CT: &str = "multipart/form-data; boundary=XyZ";

    fn body(parts: &[(&str, Option<&str>, &[u8])]) -> Bytes {
        let mut b = Vec::new();
        for (name, filename, data) in parts {
            b.extend_from_slice(b"--XyZ\r\n");
            let fname = filename.map(|f| format!("; filename=\"{f}\"")).unwrap_or_default();
            b.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"{fname}\r\n\r\n").as_bytes());
            b.extend_from_slice(data);
            b.extend_from_slice(b"\r\n");
        }
        b.extend_from_slice(b"--XyZ--\r\n");
        b.into()
    }

    #[test]
    fn peft_and_gguf_uploads() {
        let f = parse_upload(CT, body(&[("adapter_config.json", Some("c.json"), b"{}"), ("adapter_model.safetensors", None, b"W"), ("name", None, b" sql "), ("overwrite", None, b"true")])).unwrap();
        assert_eq!(f.files, AdapterFiles::Peft { config: Bytes::from_static(b"{}"), weights: Bytes::from_static(b"W") });
        assert_eq!((f.name.as_deref(), f.overwrite, f.tenant), (Some("sql"), true, None));
        let f = parse_upload(CT, body(&[("file", Some("x.GGUF"), b"GGUF"), ("routing.json", None, b"{}")])).unwrap();
        assert!(matches!(f.files, AdapterFiles::Gguf { ref filename, .. } if filename.as_deref() == Some("x.GGUF")));
        assert!(f.routing.is_some() && !f.overwrite);
    }

    #[test]
    fn refusals_name_the_part() {
        let field = |ct: &str, b: Bytes| parse_upload(ct, b).unwrap_err().field;
        assert_eq!(field("application/json", body(&[])), "content-type");
        assert_eq!(field(CT, body(&[("lora_path", None, b"/etc/passwd"), ("adapter", None, b"x")])), "lora_path");
        assert_eq!(field(CT, body(&[("adapter_config.json", None, b"{}")])), "adapter_model.safetensors");
        assert_eq!(field(CT, body(&[("adapter", None, b"a"), ("adapter", None, b"b")])), "adapter");
        assert_eq!(field(CT, body(&[("adapter", None, b"a"), ("overwrite", None, b"maybe")])), "overwrite");
        assert_eq!(field(CT, body(&[("adapter", None, b"a"), ("colour", None, b"red")])), "colour");
        assert_eq!(field(CT, body(&[])), "adapter");
        assert_eq!(field(CT, Bytes::from_static(b"--XyZ\r\nnot a header\r\n")), "multipart");
        assert_eq!(field(CT, body(&[("adapter", None, b"a"), ("name", None, &[0xff])])), "name");
    }
}
