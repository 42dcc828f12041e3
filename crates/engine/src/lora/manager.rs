//! The adapter set beside one base model (vLLM's `LoRAModelManager`): adapters known by
//! name (loaded lazily from disk), a bounded resident set occupying numbered slots, and
//! least-recently-used eviction of idle adapters when the count or byte limit is reached.
//! Loading never touches the base model.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::{LoraModel, ModuleShapes};
use crate::error::{EngineError, Result};

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
            max_loras: 16,
            max_bytes: 2 << 30,
            max_rank: 64,
        }
    }
}

struct Resident {
    model: Arc<LoraModel>,
    last_used: u64,
    /// Sequences currently using the adapter; pinned adapters are never evicted.
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
}

/// Owns the known adapters and the resident set.
pub struct LoraManager {
    shapes: ModuleShapes,
    limits: LoraLimits,
    known: HashMap<String, PathBuf>,
    slots: Vec<Option<Resident>>,
    by_name: HashMap<String, LoraSlot>,
    clock: u64,
    stats: LoraManagerStats,
}

impl LoraManager {
    /// An empty manager for a base model with these projection shapes.
    pub fn new(shapes: ModuleShapes, limits: LoraLimits) -> Self {
        let slots = (0..limits.max_loras).map(|_| None).collect();
        Self {
            shapes,
            limits,
            known: HashMap::new(),
            slots,
            by_name: HashMap::new(),
            clock: 0,
            stats: LoraManagerStats::default(),
        }
    }

    /// Limits in force.
    pub fn limits(&self) -> &LoraLimits {
        &self.limits
    }

    /// Shapes adapters are checked against.
    pub fn shapes(&self) -> &ModuleShapes {
        &self.shapes
    }

    /// Makes an adapter known without loading it (loaded on first use).
    pub fn register(&mut self, name: &str, path: &Path) {
        self.known.insert(name.to_string(), path.to_path_buf());
    }

    /// Whether an adapter of this name is known.
    pub fn is_known(&self, name: &str) -> bool {
        self.known.contains_key(name)
    }

    /// Reads and validates an adapter from disk without touching the resident set, so
    /// it can run off the batch loop; pass the result to [`LoraManager::insert`].
    pub fn read(&self, name: &str, path: &Path) -> Result<(LoraModel, f64)> {
        let t = Instant::now();
        let model = LoraModel::load(name, path, &self.shapes, self.limits.max_rank)?;
        Ok((model, t.elapsed().as_secs_f64()))
    }

    /// Loads an adapter now and makes it resident (registering it under `name`).
    pub fn load(&mut self, name: &str, path: &Path) -> Result<LoraSlot> {
        let (model, secs) = self.read(name, path)?;
        self.insert(model, secs)
    }

    /// Makes an already read adapter resident, evicting idle ones as the limits need.
    /// On error the resident set is unchanged.
    pub fn insert(&mut self, model: LoraModel, load_seconds: f64) -> Result<LoraSlot> {
        if model.bytes > self.limits.max_bytes {
            return Err(EngineError::AdapterCapacity(format!(
                "adapter '{}' needs {} bytes, above the adapter memory limit {}",
                model.name, model.bytes, self.limits.max_bytes
            )));
        }
        let name = model.name.clone();
        // Replacing an adapter of the same name: only when idle.
        if let Some(&slot) = self.by_name.get(&name) {
            if self.slots[slot].as_ref().is_some_and(|r| r.active > 0) {
                return Err(EngineError::AdapterCapacity(format!(
                    "adapter '{name}' is in use by running requests and cannot be replaced now"
                )));
            }
        }
        let replacing = self.by_name.get(&name).copied();
        let need_bytes = model.bytes;
        // Plan evictions first so a failure leaves everything as it was.
        let mut victims = Vec::new();
        let mut used: usize = self.resident_bytes()
            - replacing.map(|s| self.slots[s].as_ref().unwrap().model.bytes).unwrap_or(0);
        let mut free_slot = replacing.or_else(|| self.slots.iter().position(Option::is_none));
        let mut idle: Vec<(u64, LoraSlot)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|r| (i, r)))
            .filter(|(i, r)| r.active == 0 && Some(*i) != replacing)
            .map(|(i, r)| (r.last_used, i))
            .collect();
        idle.sort_unstable();
        let mut idle = idle.into_iter();
        while free_slot.is_none() || used + need_bytes > self.limits.max_bytes {
            let Some((_, victim)) = idle.next() else {
                return Err(EngineError::AdapterCapacity(format!(
                    "cannot make '{name}' resident: all {} resident adapters are in use",
                    self.resident_count()
                )));
            };
            used -= self.slots[victim].as_ref().unwrap().model.bytes;
            victims.push(victim);
            if free_slot.is_none() {
                free_slot = Some(victim);
            }
        }
        for v in victims {
            let old = self.slots[v].take().unwrap();
            self.by_name.remove(&old.model.name);
            self.stats.evictions += 1;
            tracing::info!(adapter = %old.model.name, "evicted idle adapter (LRU)");
        }
        let slot = free_slot.unwrap();
        self.clock += 1;
        self.known.insert(name.clone(), model.path.clone());
        self.slots[slot] = Some(Resident {
            model: Arc::new(model),
            last_used: self.clock,
            active: 0,
        });
        self.by_name.insert(name, slot);
        self.stats.loads += 1;
        self.stats.load_seconds += load_seconds;
        Ok(slot)
    }

    /// Pins an adapter for a new sequence, loading it from disk first if it is known but
    /// not resident. Release it with [`LoraManager::release`].
    pub fn acquire(&mut self, name: &str) -> Result<LoraSlot> {
        let slot = match self.by_name.get(name) {
            Some(&s) => s,
            None => {
                let path = self
                    .known
                    .get(name)
                    .cloned()
                    .ok_or_else(|| EngineError::UnknownAdapter(name.to_string()))?;
                self.load(name, &path)?
            }
        };
        self.clock += 1;
        let r = self.slots[slot].as_mut().expect("slot of a resident adapter");
        r.active += 1;
        r.last_used = self.clock;
        Ok(slot)
    }

    /// Unpins an adapter when a sequence using it ends.
    pub fn release(&mut self, slot: LoraSlot) {
        if let Some(r) = self.slots[slot].as_mut() {
            r.active = r.active.saturating_sub(1);
        }
    }

    /// Forgets an adapter; refused while sequences use it.
    pub fn remove(&mut self, name: &str) -> Result<()> {
        if let Some(&slot) = self.by_name.get(name) {
            if self.slots[slot].as_ref().is_some_and(|r| r.active > 0) {
                return Err(EngineError::AdapterCapacity(format!(
                    "adapter '{name}' is in use by running requests"
                )));
            }
            self.slots[slot] = None;
            self.by_name.remove(name);
        } else if !self.known.contains_key(name) {
            return Err(EngineError::UnknownAdapter(name.to_string()));
        }
        self.known.remove(name);
        Ok(())
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

    /// Every known adapter, sorted by name.
    pub fn adapters(&self) -> Vec<AdapterInfo> {
        let mut list: Vec<AdapterInfo> = self
            .known
            .iter()
            .map(|(name, path)| {
                let slot = self.by_name.get(name).copied();
                let r = slot.and_then(|s| self.slots[s].as_ref());
                AdapterInfo {
                    name: name.clone(),
                    path: path.clone(),
                    resident: slot,
                    bytes: r.map(|r| r.model.bytes).unwrap_or(0),
                    active: r.map(|r| r.active).unwrap_or(0),
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
