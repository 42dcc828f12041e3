//! Semantic routing (`model: "auto"`): which adapter a prompt is for, judged by the base
//! model itself. A prompt's embedding is the pooled residual stream of one middle layer of
//! a base-only pass ([`Transformer::hidden_states`], on a [`Transformer::base_view`] that
//! shares the batch loop's weights, so it runs on the caller's thread without touching the
//! loop); each adapter is represented by the embeddings of its routing examples
//! ([`spec`]), each rendered as a one-user-message chat, as a request would be. A prompt
//! scores each adapter by cosine similarity (to the nearest example, or to the examples'
//! centroid), after subtracting the mean of every example embedding (which removes what all
//! rendered prompts share: the chat template, the system prompt); the confidence is the
//! margin between the best and the second-best adapter.

pub mod spec;

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, RwLock};

use candle_core::{DType, Tensor};

pub use spec::{parse_routing, parse_routing_value, read_routing_file, routing_file_for, RoutingError, RoutingSpec};

use crate::chat::ChatMessage;
use crate::error::{EngineError, Result};
use crate::input::{InputProcessor, Prompt};
use crate::models::Transformer;

/// How a layer's `[tokens, hidden]` states become one vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    /// The mean without the first token, whose state (the attention sink's massive
    /// activations) dominates every plain mean alike.
    MeanSkipFirst,
    LastToken,
}

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
    /// Decoder layers run before pooling.
    pub layer: usize,
    pub pooling: Pooling,
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

    /// Defaults for a model of `num_layers` layers: the middle layer, mean pooling without
    /// the first token, nearest example, centered (100 % held-out accuracy on the task
    /// adapters at layer 15 of 30, against 98-99.5 % for the other layers from 12 to 30).
    pub fn for_layers(num_layers: usize) -> Self {
        Self {
            layer: num_layers / 2,
            pooling: Pooling::MeanSkipFirst,
            scoring: Scoring::Nearest,
            center: true,
            min_confidence: Self::DEFAULT_MIN_CONFIDENCE,
            cache_entries: 1024,
        }
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

/// Pools `[tokens, hidden]` into one vector.
pub fn pool(hidden: &Tensor, pooling: Pooling) -> Result<Vec<f32>> {
    let hidden = hidden.to_dtype(DType::F32)?;
    let v = match pooling {
        Pooling::Mean => hidden.mean(0)?,
        Pooling::MeanSkipFirst => match hidden.dim(0)? {
            n if n > 1 => hidden.narrow(0, 1, n - 1)?.mean(0)?,
            _ => hidden.mean(0)?,
        },
        Pooling::LastToken => hidden.get(hidden.dim(0)? - 1)?,
    };
    Ok(v.to_vec1::<f32>()?)
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

/// Routable adapters and the base-only embedding pass. Shared (`Arc`) by every handler;
/// each call runs on the caller's thread, holding a lock only to read or swap the table.
pub struct Router {
    model: Arc<Transformer>,
    input: Arc<InputProcessor>,
    cfg: RouterConfig,
    routes: RwLock<BTreeMap<String, Arc<AdapterRoute>>>,
    cache: Mutex<PromptCache>,
}

impl Router {
    /// A router over a base-only model view (share the batch loop's weights with
    /// [`Transformer::base_view`]).
    pub fn new(model: Arc<Transformer>, input: Arc<InputProcessor>, cfg: RouterConfig) -> Self {
        let cache = PromptCache { capacity: cfg.cache_entries, tick: 0, entries: HashMap::new() };
        Self { model, input, cfg, routes: RwLock::new(BTreeMap::new()), cache: Mutex::new(cache) }
    }

    pub fn config(&self) -> &RouterConfig {
        &self.cfg
    }

    /// The input processor (rendering and tokenizing prompts as generation would).
    pub fn input(&self) -> &Arc<InputProcessor> {
        &self.input
    }

    /// The embedding of a tokenized prompt (cached for exact repeats).
    pub fn embed_ids(&self, ids: &[u32]) -> Result<Arc<Vec<f32>>> {
        if ids.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        ids.hash(&mut h);
        let key = h.finish();
        if let Some(v) = self.cache.lock().ok().and_then(|mut c| c.get(key)) {
            return Ok(v);
        }
        let hidden = self.model.hidden_states(ids, &[self.cfg.layer])?;
        let v = Arc::new(pool(&hidden[0], self.cfg.pooling)?);
        if let Ok(mut c) = self.cache.lock() {
            c.put(key, v.clone());
        }
        Ok(v)
    }

    /// An example as a request would render it: one user message through the chat
    /// template (plain text for a model without one).
    pub fn example_prompt(&self, text: &str) -> Prompt {
        if self.input.chat_template().is_some() {
            Prompt::Chat(vec![ChatMessage::user(text)])
        } else {
            Prompt::Text(text.to_string())
        }
    }

    /// Embeds an adapter's examples (the slow part of making it routable: run it off any
    /// loop, then [`Router::insert`]).
    pub fn prepare(&self, spec: &RoutingSpec) -> Result<AdapterRoute> {
        let mut examples = Vec::with_capacity(spec.examples.len());
        for e in &spec.examples {
            let mut ids = self.input.tokenize(&self.example_prompt(e))?;
            ids.truncate(self.input.max_model_len().saturating_sub(1).max(1));
            examples.push(self.embed_ids(&ids)?.as_ref().clone());
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

    /// Ranks the routable adapters `allowed` admits for a tokenized prompt. No candidate
    /// is an `Ok` with empty `candidates` (the caller says why).
    pub fn route(&self, ids: &[u32], allowed: &dyn Fn(&str) -> bool) -> Result<RouteDecision> {
        let routes: Vec<(String, Arc<AdapterRoute>)> = self
            .routes
            .read()
            .map(|r| r.iter().filter(|(n, _)| allowed(n)).map(|(n, a)| (n.clone(), a.clone())).collect())
            .unwrap_or_default();
        if routes.is_empty() {
            return Ok(RouteDecision { candidates: Vec::new(), confidence: 0.0, fallback: true });
        }
        let q = self.embed_ids(ids)?;
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
