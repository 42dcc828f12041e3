//! Per-sequence KV cache. Each sequence owns its keys and values, one contiguous
//! `[position][kv_heads * head_dim]` buffer per layer, so a decode step appends one row
//! per layer and attention reads positions in order. Capacity grows in blocks so the
//! server can account memory in whole blocks and a decode step rarely allocates.

/// Tokens per allocation block of every layer's buffers.
pub const KV_BLOCK_TOKENS: usize = 64;

/// Keys and values of one layer for one sequence.
#[derive(Debug, Default, Clone)]
pub struct LayerKv {
    pub(crate) keys: Vec<f32>,
    pub(crate) values: Vec<f32>,
}

/// The KV cache of one sequence across all layers.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub(crate) layers: Vec<LayerKv>,
    /// Positions whose keys and values are stored (and committed) in every layer.
    len: usize,
    row_floats: usize,
    capacity_tokens: usize,
}

impl KvCache {
    /// An empty cache for a model with `layers` layers and `row_floats = kv_heads * head_dim`.
    pub fn new(layers: usize, row_floats: usize) -> Self {
        Self {
            layers: vec![LayerKv::default(); layers],
            len: 0,
            row_floats,
            capacity_tokens: 0,
        }
    }

    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens this cache can hold without allocating (a multiple of [`KV_BLOCK_TOKENS`]).
    pub fn capacity_tokens(&self) -> usize {
        self.capacity_tokens
    }

    /// Blocks of [`KV_BLOCK_TOKENS`] needed to hold `tokens` positions.
    pub fn blocks_for(tokens: usize) -> usize {
        tokens.div_ceil(KV_BLOCK_TOKENS)
    }

    /// Makes room for `tokens` positions in total, rounded up to whole blocks.
    pub fn reserve(&mut self, tokens: usize) {
        let want = Self::blocks_for(tokens) * KV_BLOCK_TOKENS;
        if want <= self.capacity_tokens {
            return;
        }
        let floats = want * self.row_floats;
        for layer in &mut self.layers {
            layer.keys.reserve_exact(floats - layer.keys.len());
            layer.values.reserve_exact(floats - layer.values.len());
        }
        self.capacity_tokens = want;
    }

    /// Marks `n` more positions as cached, after every layer appended them.
    pub(crate) fn commit(&mut self, n: usize) {
        self.len += n;
        debug_assert!(self
            .layers
            .iter()
            .all(|l| l.keys.len() == self.len * self.row_floats));
    }

    /// Drops everything after the first `len` positions (used to roll back a failed step).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        for layer in &mut self.layers {
            layer.keys.truncate(self.len * self.row_floats);
            layer.values.truncate(self.len * self.row_floats);
        }
    }

    /// Frees all memory.
    pub fn clear(&mut self) {
        for layer in &mut self.layers {
            *layer = LayerKv::default();
        }
        self.len = 0;
        self.capacity_tokens = 0;
    }

    /// Bytes held, counting reserved capacity.
    pub fn bytes(&self) -> usize {
        self.capacity_tokens * self.row_floats * 2 * self.layers.len() * std::mem::size_of::<f32>()
    }
}
