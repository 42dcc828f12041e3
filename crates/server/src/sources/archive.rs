//! Unpacking a PEFT folder shipped as `.tar.gz` or `.zip`: only the adapter's files are
//! taken (`adapter_config.json`, `adapter_model.safetensors`, `routing.json`, found at the top
//! or in one folder), each written under its own fixed name, so no entry's path can reach
//! outside the staging folder; the unpacked bytes count against the same cap as the download
//! (no zip bomb).

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use super::fetch::{PEFT_FILES, ROUTING_FILE};
use super::uri::Shape;

/// The files kept from an archive.
const WANTED: [&str; 3] = [PEFT_FILES[0], PEFT_FILES[1], ROUTING_FILE];

/// Which wanted file an entry is: its last path component, at depth 0 or 1.
fn wanted(entry: &str) -> Option<&'static str> {
    let parts: Vec<&str> = entry.trim_start_matches("./").split('/').filter(|p| !p.is_empty()).collect();
    if parts.is_empty() || parts.len() > 2 || parts.iter().any(|p| *p == "." || *p == "..") {
        return None;
    }
    WANTED.into_iter().find(|w| parts.last() == Some(w))
}

/// Copies at most `budget` bytes of `r` to `dir/name` (fsynced); returns the bytes copied.
fn copy_capped(mut r: impl Read, dir: &Path, name: &str, budget: u64) -> Result<u64, String> {
    let path = dir.join(name);
    if path.exists() {
        return Err(format!("the archive holds {name} twice"));
    }
    let mut out = File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf).map_err(|e| format!("reading {name} from the archive: {e}"))?;
        if k == 0 {
            break;
        }
        n += k as u64;
        if n > budget {
            return Err(format!("unpacked, it is larger than --max-lora-bytes ({budget} bytes left)"));
        }
        out.write_all(&buf[..k]).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    out.sync_all().map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(n)
}

/// Unpacks `archive` into `dir`; an archive without both PEFT files is refused.
pub(crate) fn unpack(archive: &Path, shape: Shape, dir: &Path, max_bytes: u64) -> Result<(), String> {
    let file = File::open(archive).map_err(|e| format!("{}: {e}", archive.display()))?;
    let mut total = 0u64;
    match shape {
        Shape::TarGz => {
            let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
            for entry in tar.entries().map_err(|e| format!("not a .tar.gz: {e}"))? {
                let entry = entry.map_err(|e| format!("damaged .tar.gz: {e}"))?;
                if !entry.header().entry_type().is_file() {
                    continue;
                }
                let path = entry.path().map_err(|e| format!("damaged .tar.gz: {e}"))?.to_string_lossy().into_owned();
                if let Some(name) = wanted(&path) {
                    total += copy_capped(entry, dir, name, max_bytes.saturating_sub(total))?;
                }
            }
        }
        Shape::Zip => {
            let mut zip = zip::ZipArchive::new(file).map_err(|e| format!("not a .zip: {e}"))?;
            for i in 0..zip.len() {
                let entry = zip.by_index(i).map_err(|e| format!("damaged .zip: {e}"))?;
                if !entry.is_file() {
                    continue;
                }
                if let Some(name) = wanted(entry.name()) {
                    total += copy_capped(entry, dir, name, max_bytes.saturating_sub(total))?;
                }
            }
        }
        Shape::Folder | Shape::Gguf => return Err("not an archive".into()),
    }
    for f in PEFT_FILES {
        if !dir.join(f).is_file() {
            return Err(format!("the archive has no {f} (a PEFT adapter folder is expected, at the top or in one folder)"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_adapter_files_are_taken() {
        assert_eq!(wanted("adapter_config.json"), Some("adapter_config.json"));
        assert_eq!(wanted("./pirate/adapter_model.safetensors"), Some("adapter_model.safetensors"));
        assert_eq!(wanted("../../etc/adapter_config.json"), None);
        assert_eq!(wanted("../adapter_config.json"), None);
        assert_eq!(wanted("a/b/adapter_config.json"), None);
        assert_eq!(wanted("README.md"), None);
    }

    #[test]
    fn zip_with_traversal_names_and_bomb() {
        let tmp = tempfile::tempdir().unwrap();
        let zip_path = tmp.path().join("a.zip");
        let mut w = zip::ZipWriter::new(File::create(&zip_path).unwrap());
        let opts = zip::write::SimpleFileOptions::default();
        w.start_file("../adapter_config.json", opts).unwrap();
        w.write_all(b"{}").unwrap();
        w.start_file("x/adapter_config.json", opts).unwrap();
        w.write_all(b"{}").unwrap();
        w.start_file("x/adapter_model.safetensors", opts).unwrap();
        w.write_all(&[0u8; 4096]).unwrap();
        w.finish().unwrap();
        let out = tmp.path().join("out");
        std::fs::create_dir(&out).unwrap();
        unpack(&zip_path, Shape::Zip, &out, 1 << 20).unwrap();
        assert_eq!(std::fs::read(out.join("adapter_config.json")).unwrap(), b"{}");
        assert!(!tmp.path().join("adapter_config.json").exists());
        let out2 = tmp.path().join("out2");
        std::fs::create_dir(&out2).unwrap();
        assert!(unpack(&zip_path, Shape::Zip, &out2, 1000).unwrap_err().contains("--max-lora-bytes"));
    }
}
