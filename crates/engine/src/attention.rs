//! What an attention kernel needs to know about a batch, whatever the backend: where each
//! sequence's rows sit ([`SeqSpan`]), the head layout, the rotary tables and Qwen3's q/k
//! norms. The kernels themselves live in [`crate::backend`].

/// Where one sequence's rows sit in the batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqSpan {
    /// First row of the sequence in the batch.
    pub start: usize,
    /// Rows (tokens) the sequence contributes this step.
    pub len: usize,
    /// Position of the first row, i.e. tokens already in its cache.
    pub pos: usize,
}

/// Precomputed rotary cos/sin per position (Hugging Face's rotate-half convention).
#[derive(Clone)]
pub struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
    max_positions: usize,
}

impl Rope {
    /// Tables for `max_positions` positions from the inverse frequencies.
    pub fn new(inv_freq: &[f32], max_positions: usize) -> Self {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for &f in inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self {
            cos,
            sin,
            half,
            max_positions,
        }
    }

    /// Positions the tables cover.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    #[inline]
    pub(crate) fn apply(&self, head: &mut [f32], pos: usize) {
        let cos = &self.cos[pos * self.half..(pos + 1) * self.half];
        let sin = &self.sin[pos * self.half..(pos + 1) * self.half];
        let (x1, x2) = head.split_at_mut(self.half);
        for i in 0..self.half {
            let (a, b) = (x1[i], x2[i]);
            x1[i] = a * cos[i] - b * sin[i];
            x2[i] = b * cos[i] + a * sin[i];
        }
    }
}

/// Head layout of one attention layer.
#[derive(Clone, Copy, Debug)]
pub struct HeadShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Optional per-head RMS norms on q and k (Qwen3).
pub struct QkNorm<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub eps: f32,
}
