//! Where adapters may come from: adapter names, and the checks that keep
//! `load_lora_adapter` inside the configured adapter roots (no `..`, no path or symlink that
//! resolves outside them). An adapter is a PEFT directory or a GGUF adapter file.
//! `--lora-dir` scanning and lookup by name are the engine's
//! ([`loramux_engine::lora::scan_lora_dir`], [`loramux_engine::lora::LoraManager::resolve`]).

use std::path::{Component, Path, PathBuf};

use crate::error::ApiError;

/// Files a PEFT adapter directory is read from; each must resolve inside the roots too.
const ADAPTER_FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];

/// Checks an adapter name: what clients put in `model`.
pub fn check_adapter_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty() || name.len() > 256 {
        return Err(ApiError::invalid_param("lora_name", "adapter names must have 1 to 256 characters"));
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ApiError::invalid_param("lora_name", "adapter names cannot contain whitespace or control characters"));
    }
    Ok(())
}

/// Canonical forms of the roots that exist (missing ones are skipped with a warning).
pub fn canonical_roots(roots: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for r in roots {
        match r.canonicalize() {
            Ok(c) => {
                if !out.contains(&c) {
                    out.push(c)
                }
            }
            Err(e) => tracing::warn!(root = %r.display(), "adapter root skipped: {e}"),
        }
    }
    out
}

fn inside(path: &Path, roots: &[PathBuf]) -> bool {
    roots.iter().any(|r| path.starts_with(r))
}

/// Whether what the loader will read lies inside the roots: the files of a PEFT directory
/// (a GGUF adapter is its own canonical path, already checked).
fn files_inside(path: &Path, roots: &[PathBuf]) -> bool {
    !path.is_dir() || ADAPTER_FILES.iter().all(|f| match path.join(f).canonicalize() {
        Ok(c) => inside(&c, roots),
        Err(_) => true, // missing files are reported by the loader
    })
}

/// Resolves a `lora_path` from `load_lora_adapter` (a PEFT directory or a GGUF adapter
/// file) against the canonical `roots`: relative paths are taken under each root in turn;
/// the result (after resolving symlinks) and a directory's adapter files must lie inside a root.
pub fn resolve_adapter_path(roots: &[PathBuf], requested: &str) -> Result<PathBuf, ApiError> {
    let param = "lora_path";
    if roots.is_empty() {
        return Err(ApiError::forbidden(
            "no adapter roots are configured: start the server with --lora-dir or --allowed-lora-root to load adapters at run time",
        )
        .with_param(param));
    }
    if requested.is_empty() {
        return Err(ApiError::invalid_param(param, "lora_path is empty"));
    }
    if requested.contains('\0') {
        return Err(ApiError::invalid_param(param, "lora_path contains a NUL byte"));
    }
    let p = Path::new(requested);
    if p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(ApiError::forbidden("lora_path may not contain '..'").with_param(param));
    }
    let candidates: Vec<PathBuf> = if p.is_absolute() { vec![p.to_path_buf()] } else { roots.iter().map(|r| r.join(p)).collect() };
    let mut outside = false;
    for c in candidates {
        let Ok(canon) = c.canonicalize() else { continue };
        if !inside(&canon, roots) || !files_inside(&canon, roots) {
            outside = true;
            continue;
        }
        if !canon.is_dir() && !canon.is_file() {
            return Err(ApiError::invalid_param(param, format!("{requested} is neither a PEFT adapter directory nor a GGUF adapter file")));
        }
        return Ok(canon);
    }
    if outside {
        return Err(ApiError::forbidden(format!(
            "lora_path {requested} resolves outside the allowed adapter roots"
        ))
        .with_param(param));
    }
    Err(ApiError::not_found(format!("no adapter directory or GGUF file {requested} under the allowed adapter roots")).with_param(param))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_roots() {
        let tmp = std::env::temp_dir().join(format!("loramux-adapters-{}", std::process::id()));
        let root = tmp.join("root");
        let other = tmp.join("other");
        std::fs::create_dir_all(root.join("good")).unwrap();
        std::fs::create_dir_all(other.join("evil")).unwrap();
        std::fs::write(root.join("good/adapter_config.json"), "{}").unwrap();
        std::fs::write(other.join("evil/adapter_config.json"), "{}").unwrap();
        std::os::unix::fs::symlink(other.join("evil"), root.join("link")).unwrap();
        std::fs::create_dir_all(root.join("sneaky")).unwrap();
        std::os::unix::fs::symlink(other.join("evil/adapter_config.json"), root.join("sneaky/adapter_config.json")).unwrap();
        std::fs::write(root.join("good.gguf"), "GGUF").unwrap();
        std::fs::write(other.join("evil.gguf"), "GGUF").unwrap();
        std::os::unix::fs::symlink(other.join("evil.gguf"), root.join("link.gguf")).unwrap();
        let roots = canonical_roots(std::slice::from_ref(&root));
        assert_eq!(resolve_adapter_path(&roots, "good").unwrap(), roots[0].join("good"));
        assert!(resolve_adapter_path(&roots, root.join("good").to_str().unwrap()).is_ok());
        assert_eq!(resolve_adapter_path(&roots, "link").unwrap_err().status, 403);
        assert_eq!(resolve_adapter_path(&roots, "good.gguf").unwrap(), roots[0].join("good.gguf"));
        assert_eq!(resolve_adapter_path(&roots, "link.gguf").unwrap_err().status, 403);
        assert_eq!(resolve_adapter_path(&roots, other.join("evil.gguf").to_str().unwrap()).unwrap_err().status, 403);
        assert_eq!(resolve_adapter_path(&roots, "sneaky").unwrap_err().status, 403);
        assert_eq!(resolve_adapter_path(&roots, "good/../good").unwrap_err().status, 403);
        assert_eq!(resolve_adapter_path(&roots, other.join("evil").to_str().unwrap()).unwrap_err().status, 403);
        assert_eq!(resolve_adapter_path(&roots, "missing").unwrap_err().status, 404);
        assert_eq!(resolve_adapter_path(&[], "good").unwrap_err().status, 403);
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
