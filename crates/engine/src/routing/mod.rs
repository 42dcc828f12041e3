//! Semantic routing (`model: "auto"`): which adapter a prompt is for. An [`Embedder`] maps
//! a prompt to a vector: by default the base model itself ([`BaseEmbedder`]: a middle
//! layer's pooled hidden states of a base-only pass, no second model), or a dedicated
//! sentence-embedding model ([`SentenceEmbedder`], `--router-model`). Each adapter is
//! represented by the embeddings of its routing examples ([`spec`]), each presented as a
//! request would carry it, computed once and kept in memory and on disk ([`store`]). A
//! prompt scores each adapter by cosine similarity (to the nearest example, or to the
//! examples' centroid), after subtracting the mean of every example embedding (which
//! removes what all prompts share: the chat template, the system prompt); the confidence
//! is the margin between the best and the second-best adapter.

pub mod embedder;
pub mod sentence;
pub mod spec;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, RwLock};

pub use embedder::{pool, BaseEmbedder, Embedder, Pooling};
pub use sentence::SentenceEmbedder;
pub use spec::{parse_routing, parse_routing_value, read_routing_file, routing_file_for, RoutingError, RoutingSpec};
pub use store::EmbeddingStore;

use crate::error::{EngineError, Result};
use crate::input::Prompt;

/// How a prompt scores against an adapter's examples.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scoring {
    /// Cosine similarity to the nearest example.
    Nearest,
    /// Cosine similarity to the mean of the examples.
    Centroid,
}

/// The router's choices (the defaults are what measured best; see the README).
#[derive(Clone, Debug)]
pub struct RouterConfig {
    pub scoring: Scoring,
    /// Subtract the mean example embedding before comparing.
    pub center: bool,
    /// Below this margin between the best and second adapter, the request falls back.
    pub min_confidence: f32,
    /// Prompt embeddings kept for exact repeats.
    pub cache_entries: usize,
}

impl RouterConfig {
    /// Measured on SmolLM2-135M and the task adapters (`tests/routing_measure.rs`, table in
    /// `crates/engine/README.md`): correct picks had a margin of 0.235 or more in 90 % of
    /// held-out prompts (median 0.52); 0.1 keeps nearly all of them.
    pub const DEFAULT_MIN_CONFIDENCE: f32 = 0.1;
}

impl Default for RouterConfig {
    /// Nearest example, centered (what measured best with both embedders).
    fn default() -> Self {
        Self { scoring: Scoring::Nearest, center: true, min_confidence: Self::DEFAULT_MIN_CONFIDENCE, cache_entries: 1024 }
    }
}

/// One routable adapter: its examples' embeddings.
#[derive(Clone, Debug)]
pub struct AdapterRoute {
    pub description: Option<String>,
    pub examples: Vec<Vec<f32>>,
}

/// The router's answer for one prompt.
#[derive(Clone, Debug)]
pub struct RouteDecision {
    /// Allowed routable adapters with their scores, best first.
    pub candidates: Vec<(String, f32)>,
    /// Best score minus the second (the best score itself with one candidate).
    pub confidence: f32,
    /// Whether the confidence is under the threshold.
    pub fallback: bool,
}

impl RouteDecision {
    /// The best adapter, if any.
    pub fn best(&self) -> Option<&(String, f32)> {
        self.candidates.first()
    }
}

/// Cosine similarity of `a - c` and `b - c` (no centering when `c` is empty).
pub fn cosine(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for i in 0..a.len() {
        let ci = c.get(i).copied().unwrap_or(0.0) as f64;
        let (x, y) = (a[i] as f64 - ci, b[i] as f64 - ci);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        return 0.0;
    }
    (ab / (aa.sqrt() * bb.sqrt())) as f32
}

fn mean(vs: &[&Vec<f32>]) -> Vec<f32> {
    let mut m = vec![0f32; vs.first().map_or(0, |v| v.len())];
    for v in vs {
        for (a, b) in m.iter_mut().zip(v.iter()) {
            *a += *b / vs.len() as f32;
        }
    }
    m
}

/// Scores of `query` against each adapter (same order as `routes`), centered on the mean
/// of every example of `routes` when `center`.
pub fn score_all(query: &[f32], routes: &[&AdapterRoute], scoring: Scoring, center: bool) -> Vec<f32> {
    let all: Vec<&Vec<f32>> = routes.iter().flat_map(|r| r.examples.iter()).collect();
    let c = if center { mean(&all) } else { Vec::new() };
    routes
        .iter()
        .map(|r| match scoring {
            Scoring::Nearest => r.examples.iter().map(|e| cosine(query, e, &c)).fold(f32::NEG_INFINITY, f32::max),
            Scoring::Centroid => cosine(query, &mean(&r.examples.iter().collect::<Vec<_>>()), &c),
        })
        .collect()
}

/// A small LRU of prompt embeddings keyed by a hash of the token ids.
struct PromptCache {
    capacity: usize,
    tick: u64,
    entries: HashMap<u64, (Arc<Vec<f32>>, u64)>,
}

impl PromptCache {
    fn get(&mut self, key: u64) -> Option<Arc<Vec<f32>>> {
        self.tick += 1;
        let tick = self.tick;
        self.entries.get_mut(&key).map(|(v, t)| {
            *t = tick;
            v.clone()
        })
    }

    fn put(&mut self, key: u64, v: Arc<Vec<f32>>) {
        if self.capacity == 0 {
            return;
        }
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&key) {
            if let Some(&oldest) = self.entries.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| k) {
                self.entries.remove(&oldest);
            }
        }
        self.tick += 1;
        self.entries.insert(key, (v, self.tick));
    }
}

/// Routable adapters and the embedder. Shared (`Arc`) by every handler; each call runs on
/// the caller's thread, holding a lock only to read or swap the table or the cache.
pub struct Router {
    embedder: Arc<dyn Embedder>,
    store: Option<EmbeddingStore>,
    cfg: RouterConfig,
    routes: RwLock<BTreeMap<String, Arc<AdapterRoute>>>,
    cache: Mutex<PromptCache>,
}

impl Router {
    /// A router over `embedder`; with `store_root`, example embeddings are also kept on disk
    /// there (keyed by the embedder's fingerprint and the token ids).
    pub fn new(embedder: Arc<dyn Embedder>, cfg: RouterConfig, store_root: Option<&std::path::Path>) -> Self {
        let cache = PromptCache { capacity: cfg.cache_entries, tick: 0, entries: HashMap::new() };
        let store = store_root.map(|r| EmbeddingStore::new(r, embedder.fingerprint()));
        Self { embedder, store, cfg, routes: RwLock::new(BTreeMap::new()), cache: Mutex::new(cache) }
    }

    pub fn config(&self) -> &RouterConfig {
        &self.cfg
    }

    /// The model that embeds prompts.
    pub fn embedder(&self) -> &Arc<dyn Embedder> {
        &self.embedder
    }

    /// The embedding of a prompt (cached in memory for exact repeats).
    pub fn embed(&self, prompt: &Prompt) -> Result<Arc<Vec<f32>>> {
        let ids = self.embedder.tokenize(prompt)?;
        self.embed_ids(&ids)
    }

    fn embed_ids(&self, ids: &[u32]) -> Result<Arc<Vec<f32>>> {
        if ids.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        ids.hash(&mut h);
        let key = h.finish();
        if let Some(v) = self.cache.lock().ok().and_then(|mut c| c.get(key)) {
            return Ok(v);
        }
        let v = Arc::new(self.embedder.embed(ids)?);
        if let Ok(mut c) = self.cache.lock() {
            c.put(key, v.clone());
        }
        Ok(v)
    }

    /// Embeds an adapter's examples, from the disk store where they are there (the slow
    /// part of making it routable: run it off any loop, then [`Router::insert`]).
    pub fn prepare(&self, spec: &RoutingSpec) -> Result<AdapterRoute> {
        let mut examples = Vec::with_capacity(spec.examples.len());
        for e in &spec.examples {
            let ids = self.embedder.tokenize(&self.embedder.example_prompt(e))?;
            if let Some(v) = self.store.as_ref().and_then(|s| s.get(&ids)) {
                examples.push(v);
                continue;
            }
            let v = self.embed_ids(&ids)?.as_ref().clone();
            if let Some(s) = &self.store {
                s.put(&ids, &v);
            }
            examples.push(v);
        }
        Ok(AdapterRoute { description: spec.description.clone(), examples })
    }

    /// Makes `name` routable (replacing any previous data).
    pub fn insert(&self, name: &str, route: AdapterRoute) {
        if let Ok(mut r) = self.routes.write() {
            r.insert(name.to_string(), Arc::new(route));
        }
    }

    /// Makes `name` unroutable; whether it was routable.
    pub fn remove(&self, name: &str) -> bool {
        self.routes.write().map(|mut r| r.remove(name).is_some()).unwrap_or(false)
    }

    /// Routable adapters, sorted.
    pub fn routable(&self) -> Vec<String> {
        self.routes.read().map(|r| r.keys().cloned().collect()).unwrap_or_default()
    }

    pub fn is_routable(&self, name: &str) -> bool {
        self.routes.read().map(|r| r.contains_key(name)).unwrap_or(false)
    }

    /// Ranks the routable adapters `allowed` admits for a prompt. No candidate is an `Ok`
    /// with empty `candidates` (the caller says why).
    pub fn route(&self, prompt: &Prompt, allowed: &dyn Fn(&str) -> bool) -> Result<RouteDecision> {
        let routes: Vec<(String, Arc<AdapterRoute>)> = self
            .routes
            .read()
            .map(|r| r.iter().filter(|(n, _)| allowed(n)).map(|(n, a)| (n.clone(), a.clone())).collect())
            .unwrap_or_default();
        if routes.is_empty() {
            return Ok(RouteDecision { candidates: Vec::new(), confidence: 0.0, fallback: true });
        }
        let q = self.embed(prompt)?;
        let refs: Vec<&AdapterRoute> = routes.iter().map(|(_, a)| a.as_ref()).collect();
        let scores = score_all(&q, &refs, self.cfg.scoring, self.cfg.center);
        let mut candidates: Vec<(String, f32)> = routes.into_iter().map(|(n, _)| n).zip(scores).collect();
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let confidence = match candidates.as_slice() {
            [only] => only.1,
            [a, b, ..] => a.1 - b.1,
            [] => 0.0,
        };
        Ok(RouteDecision { candidates, confidence, fallback: confidence < self.cfg.min_confidence })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Embeds text as its byte histogram over 4 buckets, counting the passes it runs.
    struct CountingEmbedder {
        passes: AtomicUsize,
    }

    impl Embedder for CountingEmbedder {
        fn fingerprint(&self) -> &str {
            "counting"
        }
        fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>> {
            match prompt {
                Prompt::Text(t) => Ok(t.bytes().map(u32::from).collect()),
                _ => Err(EngineError::InvalidRequest("text only".into())),
            }
        }
        fn example_prompt(&self, text: &str) -> Prompt {
            Prompt::Text(text.into())
        }
        fn embed(&self, ids: &[u32]) -> Result<Vec<f32>> {
            self.passes.fetch_add(1, Ordering::Relaxed);
            let mut v = vec![0f32; 4];
            for id in ids {
                v[(*id % 4) as usize] += 1.0;
            }
            Ok(v)
        }
    }

    fn spec(examples: &[&str]) -> RoutingSpec {
        RoutingSpec { description: None, examples: examples.iter().map(|e| e.to_string()).collect() }
    }

    #[test]
    fn examples_come_from_disk_after_a_restart_and_repeats_from_memory() {
        let root = std::env::temp_dir().join(format!("loramux-router-{}", std::process::id()));
        let embedder = Arc::new(CountingEmbedder { passes: AtomicUsize::new(0) });
        let router = Router::new(embedder.clone(), RouterConfig::default(), Some(&root));
        router.insert("a", router.prepare(&spec(&["aaaa", "abab"])).unwrap());
        router.insert("b", router.prepare(&spec(&["dddd"])).unwrap());
        assert_eq!(embedder.passes.load(Ordering::Relaxed), 3);
        // A new router (a restart) over the same store runs no pass for the same examples.
        let again = Arc::new(CountingEmbedder { passes: AtomicUsize::new(0) });
        let restarted = Router::new(again.clone(), RouterConfig::default(), Some(&root));
        let a = restarted.prepare(&spec(&["aaaa", "abab"])).unwrap();
        assert_eq!(again.passes.load(Ordering::Relaxed), 0);
        assert_eq!(a.examples, router.prepare(&spec(&["aaaa", "abab"])).unwrap().examples);
        restarted.insert("a", a);
        restarted.insert("b", restarted.prepare(&spec(&["dddd"])).unwrap());
        // Routing: the prompt's own domain wins; a repeat runs no second pass.
        let d = restarted.route(&Prompt::Text("aaab".into()), &|_| true).unwrap();
        assert_eq!(d.best().unwrap().0, "a");
        restarted.route(&Prompt::Text("aaab".into()), &|_| true).unwrap();
        assert_eq!(again.passes.load(Ordering::Relaxed), 1);
        // Candidates are only what the caller may use.
        let d = restarted.route(&Prompt::Text("aaab".into()), &|n| n == "b").unwrap();
        assert_eq!(d.candidates.len(), 1);
        assert_eq!(d.best().unwrap().0, "b");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
