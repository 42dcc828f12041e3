//! Automatic prefix caching (vLLM's), keyed by adapter. After a prompt is prefilled, the
//! keys and values of its whole [`KV_BLOCK_TOKENS`]-token blocks are kept here; a later
//! prompt that starts with the same blocks on the same weights copies them into its cache
//! instead of recomputing them, so a shared system prompt is prefilled once per adapter.
//!
//! A block is found by a hash chained over every block before it and rooted in the weights
//! that computed it ([`PrefixCache::root`]: the base, or an adapter by name and load
//! generation). Keys and values depend on the adapter (its q/k/v deltas change them from
//! the first layer on), so a prefix is never reused across adapters: llama.cpp's cache
//! does, and changes the output. Blocks are evicted least recently used first when the
//! byte budget is full; this memory is apart from the running sequences' KV budget.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use crate::kv::{KvCache, KV_BLOCK_TOKENS};

/// Default memory of the prefix cache in a server (`--prefix-cache-gib`).
pub const DEFAULT_PREFIX_CACHE_BYTES: usize = 512 << 20;

/// Counters for metrics (vLLM's `prefix_cache_queries` / `prefix_cache_hits`, in tokens).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Prompt tokens looked up.
    pub queried_tokens: u64,
    /// Prompt tokens found (their prefill skipped).
    pub hit_tokens: u64,
    /// Blocks held now.
    pub blocks: usize,
    /// Bytes held now.
    pub bytes: usize,
    /// Blocks evicted to make room.
    pub evicted_blocks: u64,
}

struct CachedBlock {
    /// Hash of the block before it (or the root).
    parent: u64,
    tokens: Box<[u32]>,
    /// Per layer, the block's keys then its values: `KV_BLOCK_TOKENS` rows each.
    kv: Box<[f32]>,
    last_used: u64,
}

/// The cached prompt blocks of one engine.
pub struct PrefixCache {
    capacity_bytes: usize,
    layers: usize,
    row_floats: usize,
    blocks: HashMap<u64, CachedBlock>,
    clock: u64,
    stats: PrefixCacheStats,
}

fn block_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl PrefixCache {
    /// A cache of at most `capacity_bytes` for a model with `layers` layers of
    /// `row_floats` key (and value) floats per token; 0 disables it.
    pub fn new(capacity_bytes: usize, layers: usize, row_floats: usize) -> Self {
        Self { capacity_bytes, layers, row_floats, blocks: HashMap::new(), clock: 0, stats: PrefixCacheStats::default() }
    }

    fn block_floats(&self) -> usize {
        self.layers * 2 * KV_BLOCK_TOKENS * self.row_floats
    }

    fn block_bytes(&self) -> usize {
        self.block_floats() * std::mem::size_of::<f32>()
    }

    /// Whether one block fits the budget at all.
    pub fn is_enabled(&self) -> bool {
        self.capacity_bytes >= self.block_bytes()
    }

    /// The root of the hash chains of prompts run on `adapter` (name and load generation;
    /// `None`: the base weights).
    pub fn root(adapter: Option<(&str, u64)>) -> u64 {
        let mut h = DefaultHasher::new();
        adapter.hash(&mut h);
        h.finish()
    }

    /// Hashes of the cached blocks `prompt` starts with, in order.
    fn find(&self, root: u64, prompt: &[u32], max_blocks: usize) -> Vec<u64> {
        let mut chain = Vec::new();
        let mut parent = root;
        for tokens in prompt.chunks_exact(KV_BLOCK_TOKENS).take(max_blocks) {
            let h = block_hash(parent, tokens);
            match self.blocks.get(&h) {
                Some(b) if b.parent == parent && *b.tokens == *tokens => chain.push(h),
                _ => break,
            }
            parent = h;
        }
        chain
    }

    /// Copies the cached blocks `prompt` starts with into the empty `cache`, leaving at
    /// least the prompt's last token to compute (its logits give the first output).
    /// Returns the tokens reused.
    pub fn fill(&mut self, root: u64, prompt: &[u32], cache: &mut KvCache) -> usize {
        if !self.is_enabled() || !cache.is_empty() {
            return 0;
        }
        self.stats.queried_tokens += prompt.len() as u64;
        let chain = self.find(root, prompt, prompt.len().saturating_sub(1) / KV_BLOCK_TOKENS);
        if chain.is_empty() {
            return 0;
        }
        let reused = chain.len() * KV_BLOCK_TOKENS;
        cache.reserve(reused);
        let rows = KV_BLOCK_TOKENS * self.row_floats;
        for h in chain {
            self.clock += 1;
            let block = self.blocks.get_mut(&h).expect("found just now");
            block.last_used = self.clock;
            for (layer, kv) in cache.layers.iter_mut().zip(block.kv.chunks_exact(2 * rows)) {
                layer.keys.extend_from_slice(&kv[..rows]);
                layer.values.extend_from_slice(&kv[rows..]);
            }
            cache.commit(KV_BLOCK_TOKENS);
        }
        self.stats.hit_tokens += reused as u64;
        reused
    }

    /// Keeps the whole blocks of `prompt` that `cache` holds (blocks already cached are
    /// only marked used), evicting least recently used blocks of any chain to make room.
    pub fn insert(&mut self, root: u64, prompt: &[u32], cache: &KvCache) {
        if !self.is_enabled() {
            return;
        }
        let whole = prompt.len().min(cache.len()) / KV_BLOCK_TOKENS;
        let rows = KV_BLOCK_TOKENS * self.row_floats;
        let mut parent = root;
        for (i, tokens) in prompt.chunks_exact(KV_BLOCK_TOKENS).take(whole).enumerate() {
            let h = block_hash(parent, tokens);
            self.clock += 1;
            match self.blocks.get_mut(&h) {
                Some(b) if b.parent == parent && *b.tokens == *tokens => b.last_used = self.clock,
                Some(_) => return, // a hash collision: keep the cached block, stop the chain
                None => {
                    if !self.make_room() {
                        return;
                    }
                    let mut kv = Vec::with_capacity(self.block_floats());
                    let span = i * rows..(i + 1) * rows;
                    for layer in &cache.layers {
                        kv.extend_from_slice(&layer.keys[span.clone()]);
                        kv.extend_from_slice(&layer.values[span.clone()]);
                    }
                    let block = CachedBlock { parent, tokens: tokens.into(), kv: kv.into_boxed_slice(), last_used: self.clock };
                    self.blocks.insert(h, block);
                    self.stats.blocks += 1;
                    self.stats.bytes += self.block_bytes();
                }
            }
            parent = h;
        }
    }

    /// Evicts least recently used blocks until one more fits; false if none can.
    fn make_room(&mut self) -> bool {
        while self.stats.bytes + self.block_bytes() > self.capacity_bytes {
            let Some((&victim, _)) = self.blocks.iter().min_by_key(|(_, b)| b.last_used) else { return false };
            self.blocks.remove(&victim);
            self.stats.blocks -= 1;
            self.stats.bytes -= self.block_bytes();
            self.stats.evicted_blocks += 1;
        }
        true
    }

    /// Hit and size counters.
    pub fn stats(&self) -> PrefixCacheStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache_with(prompt_len: usize, layers: usize, row: usize, seed: f32) -> KvCache {
        let mut c = KvCache::new(layers, row);
        c.reserve(prompt_len);
        for (l, layer) in c.layers.iter_mut().enumerate() {
            for p in 0..prompt_len * row {
                layer.keys.push(seed + (l * 100_000 + p) as f32);
                layer.values.push(-seed - (l * 100_000 + p) as f32);
            }
        }
        c.commit(prompt_len);
        c
    }

    #[test]
    fn reuses_whole_blocks_of_the_same_root_only_and_leaves_the_last_token() {
        let (layers, row) = (2, 3);
        let mut pc = PrefixCache::new(1 << 20, layers, row);
        let prompt: Vec<u32> = (0..150).collect();
        let source = cache_with(150, layers, row, 0.5);
        let base = PrefixCache::root(None);
        pc.insert(base, &prompt, &source);
        assert_eq!(pc.stats().blocks, 2, "two whole blocks of 64 in 150 tokens");

        let mut hit = KvCache::new(layers, row);
        assert_eq!(pc.fill(base, &prompt, &mut hit), 128);
        for l in 0..layers {
            assert_eq!(hit.layers[l].keys[..], source.layers[l].keys[..128 * row]);
            assert_eq!(hit.layers[l].values[..], source.layers[l].values[..128 * row]);
        }
        // Another adapter, or the same name loaded again, never hits.
        for root in [PrefixCache::root(Some(("a", 0))), PrefixCache::root(Some(("a", 1)))] {
            let mut other = KvCache::new(layers, row);
            assert_eq!(pc.fill(root, &prompt, &mut other), 0);
            assert!(other.is_empty());
        }
        // A prompt of exactly 128 tokens reuses one block: its last token must be computed.
        let mut exact = KvCache::new(layers, row);
        assert_eq!(pc.fill(base, &prompt[..128], &mut exact), 64);
        // A prompt differing in the second block reuses the first only.
        let mut changed = prompt.clone();
        changed[100] = 9999;
        let mut partial = KvCache::new(layers, row);
        assert_eq!(pc.fill(base, &changed, &mut partial), 64);
        let s = pc.stats();
        assert_eq!((s.queried_tokens, s.hit_tokens), (150 * 3 + 128 + 150, 128 + 64 + 64));
    }

    #[test]
    fn evicts_least_recently_used_blocks_within_the_budget() {
        let (layers, row) = (1, 2);
        let block_bytes = layers * 2 * KV_BLOCK_TOKENS * row * 4;
        let mut pc = PrefixCache::new(3 * block_bytes, layers, row);
        let base = PrefixCache::root(None);
        let a: Vec<u32> = (0..129).collect();
        let b: Vec<u32> = (1000..1129).collect();
        pc.insert(base, &a, &cache_with(129, layers, row, 1.0));
        pc.insert(base, &b, &cache_with(129, layers, row, 2.0));
        let s = pc.stats();
        assert_eq!((s.blocks, s.bytes, s.evicted_blocks), (3, 3 * block_bytes, 1));
        // a's first block was the least recently used: a now misses, b hits whole.
        assert_eq!(pc.fill(base, &a, &mut KvCache::new(layers, row)), 0);
        assert_eq!(pc.fill(base, &b, &mut KvCache::new(layers, row)), 128);
        assert!(!PrefixCache::new(block_bytes - 1, layers, row).is_enabled());
    }
}
