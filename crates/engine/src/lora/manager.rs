//! The adapter set beside one base model (vLLM's `LoRAModelManager`): adapters known by
//! name (registered, or found by folder name in a `--lora-dir`), a bounded resident set
//! occupying numbered slots with least-recently-used eviction of idle, unpinned adapters, and each
//! adapter's readiness for the scheduler: resident, being read off the loop, read and
//! waiting for a slot, or unloaded while requests still run on it. This is the one place
//! that answers "is this adapter known, and can a request on it run now?".
//! Loading never touches the base model.
//!
//! The file is longer than our ~500-line guide on purpose: [`LoraManager`]'s methods all
//! keep one set of invariants (a slot holds one adapter, a pinned or in-use adapter is
//! never evicted, a read's generation must match to be kept), and reading them in one
//! `impl` is how a reviewer checks them.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use super::loader::{AdapterLoader, AdapterReader};
use super::{LoraModel, ModuleShapes};
use crate::error::{EngineError, Result};

/// Adapters resident at once unless configured (vLLM's `--max-loras`).
pub const DEFAULT_MAX_LORAS: usize = 8;
/// Largest adapter rank accepted unless configured (vLLM's `--max-lora-rank`).
pub const DEFAULT_MAX_LORA_RANK: usize = 64;
/// Bytes all resident adapters may occupy unless configured.
pub const DEFAULT_MAX_LORA_BYTES: usize = 2 << 30;

/// Index of a resident adapter; rows of a batch carry one (or none for the base).
pub type LoraSlot = usize;

/// Limits of the resident set.
#[derive(Clone, Debug)]
pub struct LoraLimits {
    /// Adapters resident at once (vLLM's `--max-loras`).
    pub max_loras: usize,
    /// Bytes all resident adapters may occupy.
    pub max_bytes: usize,
    /// Largest rank accepted (vLLM's `--max-lora-rank`).
    pub max_rank: usize,
}

impl Default for LoraLimits {
    fn default() -> Self {
        Self {
            max_loras: DEFAULT_MAX_LORAS,
            max_bytes: DEFAULT_MAX_LORA_BYTES,
            max_rank: DEFAULT_MAX_LORA_RANK,
        }
    }
}

struct Resident {
    model: Arc<LoraModel>,
    last_used: u64,
    /// Sequences currently using the adapter; an adapter in use is never evicted.
    active: usize,
}

/// Counters for metrics.
#[derive(Clone, Debug, Default)]
pub struct LoraManagerStats {
    pub loads: u64,
    pub evictions: u64,
    pub load_seconds: f64,
}

/// What the manager knows about one adapter.
#[derive(Clone, Debug)]
pub struct AdapterInfo {
    pub name: String,
    pub path: PathBuf,
    pub resident: Option<LoraSlot>,
    pub bytes: usize,
    pub active: usize,
    /// Pinned (`--pin-lora`): resident and never evicted.
    pub pinned: bool,
    /// Requests started on it since it became known.
    pub requests: u64,
    /// When a request last started or ended on it.
    pub last_used: Option<SystemTime>,
}

/// How much an adapter has been used, kept across evictions (operators ask which adapters
/// earn their memory).
#[derive(Clone, Copy, Debug, Default)]
struct AdapterUsage {
    requests: u64,
    last_used: Option<SystemTime>,
}

/// Where an adapter stands for a request that wants to run on it now.
#[derive(Debug)]
pub enum Readiness {
    /// Resident: a sequence can pin it.
    Resident,
    /// Being read from disk off the loop.
    Loading,
    /// Read (or readable) but every slot is pinned by running sequences.
    Blocked,
}

/// The answer of a runtime adapter load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InsertOutcome {
    /// Resident now.
    Resident,
    /// Known and validated; every slot is in use, so it becomes resident on first use.
    Registered,
}

/// The answer of an unload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnloadOutcome {
    /// Gone now.
    Removed,
    /// Gone for new requests; removed when its running sequences end.
    WhenIdle,
}

/// What finished reading off the loop since the last poll.
#[derive(Debug, Default)]
pub struct LoadEvents {
    /// Adapters read and validated, with their read time in seconds.
    pub loaded: Vec<(String, f64)>,
    /// Adapters that could not be read: requests waiting for them must fail.
    pub failed: Vec<(String, Arc<EngineError>)>,
}

/// Owns the known adapters, the resident set and each adapter's readiness.
pub struct LoraManager {
    shapes: ModuleShapes,
    reader: AdapterReader,
    limits: LoraLimits,
    known: HashMap<String, PathBuf>,
    slots: Vec<Option<Resident>>,
    by_name: HashMap<String, LoraSlot>,
    clock: u64,
    stats: LoraManagerStats,
    /// Directories whose adapters (PEFT folders, NAME.gguf files) are known by name, found on first use.
    lora_dirs: Vec<PathBuf>,
    /// Unloaded through the API and not loaded again since: a `--lora-dir` adapter is not
    /// found on disk again (vLLM users expect an unload to stick).
    removed: HashSet<String>,
    /// Unloaded while sequences still run on them: removed when the last one ends.
    unloading: HashSet<String>,
    /// Read and validated, waiting for a slot.
    staged: HashMap<String, (LoraModel, f64)>,
    /// Bumped at every runtime load or unload of a name, so a read that started before is
    /// recognised as stale when it finishes.
    generations: HashMap<String, u64>,
    next_generation: u64,
    loader: AdapterLoader,
    /// Adapters never evicted (`--pin-lora`).
    pinned: HashSet<String>,
    usage: HashMap<String, AdapterUsage>,
    /// Bumped whenever a request starts or ends on an adapter, so callers republish usage
    /// only when it changed.
    usage_epoch: u64,
}

/// Whether `name` can be a folder directly under a `--lora-dir` (one plain path component),
/// so a client-chosen name cannot walk out of the directory.
fn is_plain_folder_name(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && !name.contains(['/', '\\', '\0']) && Path::new(name).components().count() == 1
}

/// The adapter called `name` in a `--lora-dir`: the PEFT folder `name` (one with an
/// `adapter_config.json`) or else the GGUF adapter file `name.gguf`.
fn lora_dir_entry(dir: &Path, name: &str) -> Option<PathBuf> {
    if !is_plain_folder_name(name) {
        return None;
    }
    let folder = dir.join(name);
    if folder.join("adapter_config.json").is_file() {
        return Some(folder);
    }
    let file = dir.join(format!("{name}.gguf"));
    file.is_file().then_some(file)
}

/// Adapters of a `--lora-dir` by name: PEFT subdirectories (those with an
/// `adapter_config.json`) by folder name and GGUF adapter files by file stem (`x.gguf` is
/// `x`); where both exist the folder is the one [`LoraManager::resolve`] finds, so it is kept.
pub fn scan_lora_dir(dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Some(file_name) = entry.file_name().to_str().map(str::to_string) else { continue };
        names.push(file_name.strip_suffix(".gguf").map(str::to_string).unwrap_or(file_name));
    }
    names.sort();
    names.dedup();
    Ok(names.into_iter().filter_map(|name| lora_dir_entry(dir, &name).map(|path| (name, path))).collect())
}

impl LoraManager {
    /// An empty manager for a base model with these projection shapes.
    pub fn new(shapes: ModuleShapes, limits: LoraLimits) -> Self {
        let slots = (0..limits.max_loras).map(|_| None).collect();
        Self {
            reader: AdapterReader::new(shapes.clone(), limits.max_rank),
            shapes,
            limits,
            known: HashMap::new(),
            slots,
            by_name: HashMap::new(),
            clock: 0,
            stats: LoraManagerStats::default(),
            lora_dirs: Vec::new(),
            removed: HashSet::new(),
            unloading: HashSet::new(),
            staged: HashMap::new(),
            generations: HashMap::new(),
            next_generation: 0,
            loader: AdapterLoader::new(None),
            pinned: HashSet::new(),
            usage: HashMap::new(),
            usage_epoch: 0,
        }
    }

    /// Makes the off-loop reader of adapter `name` panic (fault-injection tests only).
    #[doc(hidden)]
    pub fn inject_reader_panic(&mut self, name: Option<String>) {
        self.loader = AdapterLoader::new(name);
    }

    /// Shapes adapters are checked against.
    pub fn shapes(&self) -> &ModuleShapes {
        &self.shapes
    }

    /// Resident adapters allowed at once.
    pub fn max_loras(&self) -> usize {
        self.limits.max_loras
    }

    /// Largest rank accepted.
    pub fn max_rank(&self) -> usize {
        self.limits.max_rank
    }

    /// Makes an adapter known without loading it (loaded on first use).
    pub fn register(&mut self, name: &str, path: &Path) {
        self.known.insert(name.to_string(), path.to_path_buf());
    }

    /// Serves the adapters of `dir` (PEFT folders, `NAME.gguf` files) by name; they are read on first use.
    pub fn add_lora_dir(&mut self, dir: PathBuf) {
        if !self.lora_dirs.contains(&dir) {
            self.lora_dirs.push(dir);
        }
    }

    /// Whether requests may name this adapter: known (and not being unloaded), or a folder
    /// or `name.gguf` file of a `--lora-dir` that was not unloaded through the API. One
    /// found here becomes known.
    pub fn resolve(&mut self, name: &str) -> Result<()> {
        if self.unloading.contains(name) {
            return Err(EngineError::UnknownAdapter(name.to_string()));
        }
        if self.known.contains_key(name) {
            return Ok(());
        }
        if self.removed.contains(name) || !is_plain_folder_name(name) {
            return Err(EngineError::UnknownAdapter(name.to_string()));
        }
        let found = self.lora_dirs.iter().find_map(|d| lora_dir_entry(d, name));
        match found {
            Some(path) => {
                tracing::info!(adapter = %name, path = %path.display(), "adapter found in --lora-dir");
                self.known.insert(name.to_string(), path);
                Ok(())
            }
            None => Err(EngineError::UnknownAdapter(name.to_string())),
        }
    }

    /// Reads and validates adapters for this base off the loop (runtime loads).
    pub fn reader(&self) -> &AdapterReader {
        &self.reader
    }

    /// Loads an adapter now and makes it resident (registering it under `name`).
    pub fn load(&mut self, name: &str, path: &Path) -> Result<LoraSlot> {
        let (model, secs) = self.reader.read(name, path)?;
        self.insert(model, secs)
    }

    fn too_large(&self, model: &LoraModel) -> Option<EngineError> {
        (model.bytes > self.limits.max_bytes).then(|| {
            EngineError::adapter(
                &model.name,
                "adapter_model.safetensors",
                format!("the adapter needs {} bytes, above the adapter memory limit of {} bytes", model.bytes, self.limits.max_bytes),
            )
        })
    }

    /// Slots to evict so an adapter of `bytes` fits, least recently used first; `None`
    /// when idle adapters are not enough.
    fn plan_evictions(&self, name: &str, bytes: usize) -> Option<(LoraSlot, Vec<LoraSlot>)> {
        let replacing = self.by_name.get(name).copied();
        let mut used = self.resident_bytes() - replacing.map(|s| self.slots[s].as_ref().expect("resident").model.bytes).unwrap_or(0);
        let mut free_slot = replacing.or_else(|| self.slots.iter().position(Option::is_none));
        let mut idle: Vec<(u64, LoraSlot)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|r| (i, r)))
            .filter(|(i, r)| r.active == 0 && Some(*i) != replacing && !self.pinned.contains(&r.model.name))
            .map(|(i, r)| (r.last_used, i))
            .collect();
        idle.sort_unstable();
        let mut idle = idle.into_iter();
        let mut victims = Vec::new();
        while free_slot.is_none() || used + bytes > self.limits.max_bytes {
            let (_, victim) = idle.next()?;
            used -= self.slots[victim].as_ref().expect("resident").model.bytes;
            victims.push(victim);
            free_slot.get_or_insert(victim);
        }
        Some((free_slot.expect("a slot was found"), victims))
    }

    fn is_in_use(&self, name: &str) -> bool {
        self.by_name.get(name).and_then(|&s| self.slots[s].as_ref()).is_some_and(|r| r.active > 0)
    }

    /// Makes an already read adapter resident, evicting idle ones as the limits need.
    /// On error the resident set is unchanged.
    pub fn insert(&mut self, model: LoraModel, load_seconds: f64) -> Result<LoraSlot> {
        if let Some(e) = self.too_large(&model) {
            return Err(e);
        }
        let name = model.name.clone();
        if self.is_in_use(&name) {
            return Err(EngineError::AdapterCapacity(format!(
                "adapter '{name}' is in use by running requests and cannot be replaced now"
            )));
        }
        let Some((slot, victims)) = self.plan_evictions(&name, model.bytes) else {
            return Err(EngineError::AdapterCapacity(format!(
                "cannot make '{name}' resident: all {} resident adapters are in use",
                self.resident_count()
            )));
        };
        for v in victims {
            let old = self.slots[v].take().expect("victim is resident");
            self.by_name.remove(&old.model.name);
            self.stats.evictions += 1;
            tracing::info!(adapter = %old.model.name, "evicted idle adapter (LRU)");
        }
        self.clock += 1;
        self.known.insert(name.clone(), model.path.clone());
        self.slots[slot] = Some(Resident { model: Arc::new(model), last_used: self.clock, active: 0 });
        self.by_name.insert(name, slot);
        self.stats.loads += 1;
        self.stats.load_seconds += load_seconds;
        Ok(slot)
    }

    fn bump_generation(&mut self, name: &str) -> u64 {
        self.next_generation += 1;
        self.generations.insert(name.to_string(), self.next_generation);
        self.loader.cancel(name);
        self.next_generation
    }

    /// A runtime load (vLLM's `load_lora_adapter`) of an adapter read off the loop: resident
    /// now if a slot can be had, else known and resident on first use. `replace` swaps an
    /// adapter of the same name, unless sequences run on it.
    pub fn add(&mut self, model: LoraModel, load_seconds: f64, replace: bool) -> Result<InsertOutcome> {
        let name = model.name.clone();
        if self.unloading.contains(&name) {
            return Err(EngineError::AdapterCapacity(format!(
                "adapter '{name}' is being unloaded and still serves running requests; retry when they finish"
            )));
        }
        if self.known.contains_key(&name) && !replace {
            return Err(EngineError::AdapterExists(name));
        }
        if let Some(e) = self.too_large(&model) {
            return Err(e);
        }
        if replace && self.is_in_use(&name) {
            return Err(EngineError::AdapterCapacity(format!(
                "adapter '{name}' is in use by running requests and cannot be replaced now"
            )));
        }
        self.bump_generation(&name);
        self.staged.remove(&name);
        self.removed.remove(&name);
        if self.plan_evictions(&name, model.bytes).is_some() {
            self.insert(model, load_seconds)?;
            return Ok(InsertOutcome::Resident);
        }
        // Every slot is pinned: keep it validated and ready.
        self.remove_resident(&name);
        self.known.insert(name.clone(), model.path.clone());
        self.staged.insert(name, (model, load_seconds));
        Ok(InsertOutcome::Registered)
    }

    fn remove_resident(&mut self, name: &str) {
        if let Some(slot) = self.by_name.remove(name) {
            self.slots[slot] = None;
        }
    }

    /// Forgets an adapter for new requests (vLLM's `unload_lora_adapter`): at once when
    /// idle, else when its running sequences end. A `--lora-dir` adapter stays unloaded
    /// until loaded again.
    pub fn unload(&mut self, name: &str) -> Result<UnloadOutcome> {
        if !self.known.contains_key(name) || self.unloading.contains(name) {
            return Err(EngineError::UnknownAdapter(name.to_string()));
        }
        self.bump_generation(name);
        self.staged.remove(name);
        self.removed.insert(name.to_string());
        self.pinned.remove(name);
        self.usage.remove(name);
        if self.is_in_use(name) {
            self.unloading.insert(name.to_string());
            return Ok(UnloadOutcome::WhenIdle);
        }
        self.remove_resident(name);
        self.known.remove(name);
        Ok(UnloadOutcome::Removed)
    }

    /// Whether a request on `name` can start now. A known adapter that is not resident is
    /// made resident from its staged read, or read off the loop; `Err` when it cannot be
    /// served at all. At most `max_loras` reads are held outside the resident set.
    pub fn readiness(&mut self, name: &str) -> Result<Readiness> {
        self.resolve(name)?;
        if self.by_name.contains_key(name) {
            return Ok(Readiness::Resident);
        }
        if let Some((model, secs)) = self.staged.remove(name) {
            if self.plan_evictions(name, model.bytes).is_some() {
                self.insert(model, secs)?;
                return Ok(Readiness::Resident);
            }
            self.staged.insert(name.to_string(), (model, secs));
            return Ok(Readiness::Blocked);
        }
        if self.loader.is_loading(name) {
            return Ok(Readiness::Loading);
        }
        if self.loader.in_flight() + self.staged.len() < self.limits.max_loras {
            let path = self.known[name].clone();
            let generation = self.generations.get(name).copied().unwrap_or(0);
            self.loader.start(name, path, generation, self.reader.clone());
            return Ok(Readiness::Loading);
        }
        Ok(Readiness::Blocked)
    }

    /// Takes the reads that finished off the loop: valid ones are staged for a slot,
    /// failed ones (and adapters too large to ever fit) are reported.
    pub fn poll_loads(&mut self) -> LoadEvents {
        let mut events = LoadEvents::default();
        for done in self.loader.finished() {
            match done.result {
                Ok((model, secs)) => {
                    if let Some(e) = self.too_large(&model) {
                        events.failed.push((done.name, Arc::new(e)));
                    } else if self.known.contains_key(&done.name) && !self.unloading.contains(&done.name) {
                        events.loaded.push((done.name.clone(), secs));
                        self.staged.insert(done.name, (model, secs));
                    }
                }
                Err(e) => events.failed.push((done.name, e)),
            }
        }
        events
    }

    /// Drops staged reads no waiting request wants any more, so they do not hold the
    /// read-ahead bound.
    pub fn retain_staged(&mut self, wanted: impl Fn(&str) -> bool) {
        self.staged.retain(|name, _| wanted(name));
    }

    /// Pins a known adapter for a new sequence, loading it from disk first if it is not
    /// resident. Release it with [`LoraManager::release`].
    pub fn acquire(&mut self, name: &str) -> Result<LoraSlot> {
        let slot = match self.by_name.get(name) {
            Some(&s) => s,
            None => {
                self.resolve(name)?;
                let path = self.known[name].clone();
                self.load(name, &path)?
            }
        };
        self.clock += 1;
        let r = self.slots[slot].as_mut().expect("slot of a resident adapter");
        r.active += 1;
        r.last_used = self.clock;
        let usage = self.usage.entry(name.to_string()).or_default();
        usage.requests += 1;
        usage.last_used = Some(SystemTime::now());
        self.usage_epoch += 1;
        Ok(slot)
    }

    /// Makes a known adapter resident now and keeps it so: never evicted, until unloaded.
    /// Refused when pinned adapters would fill every slot but one, so other adapters
    /// can still be served.
    pub fn pin(&mut self, name: &str) -> Result<()> {
        self.resolve(name)?;
        if !self.pinned.contains(name) && self.pinned.len() + 1 >= self.limits.max_loras {
            return Err(EngineError::AdapterCapacity(format!(
                "cannot pin '{name}': {} adapters are pinned already and --max-loras is {}; one slot must stay free for \
                 the others (raise --max-loras)",
                self.pinned.len(),
                self.limits.max_loras
            )));
        }
        if !self.by_name.contains_key(name) {
            let path = self.known[name].clone();
            self.load(name, &path)?;
        }
        self.pinned.insert(name.to_string());
        Ok(())
    }

    /// Whether an adapter is pinned.
    pub fn is_pinned(&self, name: &str) -> bool {
        self.pinned.contains(name)
    }

    /// The load generation of an adapter's weights: changes when the name is loaded or
    /// unloaded at run time, so state computed with older weights (cached prefixes) is not
    /// reused.
    pub fn generation(&self, name: &str) -> u64 {
        self.generations.get(name).copied().unwrap_or(0)
    }

    /// Changes whenever a request starts or ends on an adapter.
    pub fn usage_epoch(&self) -> u64 {
        self.usage_epoch
    }

    /// Unpins an adapter when a sequence using it ends; an adapter unloaded while in use
    /// goes when its last sequence does.
    pub fn release(&mut self, slot: LoraSlot) {
        let Some(r) = self.slots[slot].as_mut() else { return };
        r.active = r.active.saturating_sub(1);
        if let Some(usage) = self.usage.get_mut(&r.model.name) {
            usage.last_used = Some(SystemTime::now());
        }
        self.usage_epoch += 1;
        if r.active == 0 && self.unloading.contains(&r.model.name) {
            let name = r.model.name.clone();
            self.unloading.remove(&name);
            self.remove_resident(&name);
            self.known.remove(&name);
            tracing::info!(adapter = %name, "adapter removed (unloaded while in use)");
        }
    }

    /// The adapter in a slot.
    pub fn get(&self, slot: LoraSlot) -> Option<&LoraModel> {
        self.slots.get(slot)?.as_ref().map(|r| &*r.model)
    }

    /// A resident adapter by name.
    pub fn get_by_name(&self, name: &str) -> Option<Arc<LoraModel>> {
        let slot = *self.by_name.get(name)?;
        self.slots[slot].as_ref().map(|r| r.model.clone())
    }

    /// Number of resident adapters.
    pub fn resident_count(&self) -> usize {
        self.by_name.len()
    }

    /// Bytes of all resident adapters.
    pub fn resident_bytes(&self) -> usize {
        self.slots.iter().flatten().map(|r| r.model.bytes).sum()
    }

    /// Every adapter requests may name, sorted by name (those being unloaded excluded).
    pub fn adapters(&self) -> Vec<AdapterInfo> {
        let mut list: Vec<AdapterInfo> = self
            .known
            .iter()
            .filter(|(name, _)| !self.unloading.contains(*name))
            .map(|(name, path)| {
                let slot = self.by_name.get(name).copied();
                let r = slot.and_then(|s| self.slots[s].as_ref());
                let usage = self.usage.get(name).copied().unwrap_or_default();
                AdapterInfo {
                    name: name.clone(),
                    path: path.clone(),
                    resident: slot,
                    bytes: r.map(|r| r.model.bytes).unwrap_or(0),
                    active: r.map(|r| r.active).unwrap_or(0),
                    pinned: self.pinned.contains(name),
                    requests: usage.requests,
                    last_used: usage.last_used,
                }
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// Load and eviction counters.
    pub fn stats(&self) -> &LoraManagerStats {
        &self.stats
    }
}
