//! Attention over variable-length sequences in one batch: each sequence contributes a run
//! of rows (a prefill chunk or one decode token) and attends to its own KV cache only.
//! Rotary embedding, Qwen3's q/k norms, the cache append and the attention itself are done
//! in one pass over raw slices, since at this model size many small tensor ops cost more
//! in dispatch than in arithmetic.

use rayon::prelude::*;

use crate::kernels::{axpy, dot, rms_norm_in_place};
use crate::kv::LayerKv;

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
    fn apply(&self, head: &mut [f32], pos: usize) {
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

/// Runs attention for a batch of spans; `q` is `[rows, heads*hd]`, `k`/`v` are
/// `[rows, kv_heads*hd]`. Keys and values are appended to each span's layer cache.
/// Returns `[rows, heads*hd]`.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    mut q: Vec<f32>,
    mut k: Vec<f32>,
    v: &[f32],
    spans: &[SeqSpan],
    caches: &mut [&mut LayerKv],
    rope: &Rope,
    qk_norm: Option<&QkNorm<'_>>,
    shape: HeadShape,
) -> Vec<f32> {
    let HeadShape {
        heads,
        kv_heads,
        head_dim: hd,
    } = shape;
    let q_row = heads * hd;
    let kv_row = kv_heads * hd;
    let rows = q.len() / q_row;

    // Norms and rotary on q and k, then append k and v to each span's cache.
    for (span, cache) in spans.iter().zip(caches.iter_mut()) {
        for i in 0..span.len {
            let r = span.start + i;
            let pos = span.pos + i;
            for head in q[r * q_row..(r + 1) * q_row].chunks_exact_mut(hd) {
                if let Some(n) = qk_norm {
                    rms_norm_in_place(head, n.q, n.eps);
                }
                rope.apply(head, pos);
            }
            for head in k[r * kv_row..(r + 1) * kv_row].chunks_exact_mut(hd) {
                if let Some(n) = qk_norm {
                    rms_norm_in_place(head, n.k, n.eps);
                }
                rope.apply(head, pos);
            }
        }
        let rows = span.start * kv_row..(span.start + span.len) * kv_row;
        cache.keys.extend_from_slice(&k[rows.clone()]);
        cache.values.extend_from_slice(&v[rows]);
    }

    // Which span and position each row belongs to.
    let mut row_span = vec![(0usize, 0usize); rows];
    for (s, span) in spans.iter().enumerate() {
        for i in 0..span.len {
            row_span[span.start + i] = (s, span.pos + i);
        }
    }

    let scale = 1.0 / (hd as f32).sqrt();
    let group = heads / kv_heads;
    let caches: Vec<&LayerKv> = caches.iter().map(|c| &**c).collect();
    let mut out = vec![0f32; rows * q_row];
    // One task per (row, head), not per row: a decode step of one sequence is one row, and
    // its heads are the only work there is to share between the threads.
    out.par_chunks_mut(hd)
        .enumerate()
        .for_each_init(Vec::new, |scores: &mut Vec<f32>, (i, oh)| {
            let (r, h) = (i / heads, i % heads);
            let (s, pos) = row_span[r];
            let cache = caches[s];
            let visible = pos + 1;
            let g = h / group;
            let qh = &q[r * q_row + h * hd..r * q_row + (h + 1) * hd];
            scores.clear();
            let mut max = f32::NEG_INFINITY;
            for t in 0..visible {
                let kt = &cache.keys[t * kv_row + g * hd..t * kv_row + (g + 1) * hd];
                let sc = dot(qh, kt) * scale;
                max = max.max(sc);
                scores.push(sc);
            }
            let mut sum = 0f32;
            for sc in scores.iter_mut() {
                *sc = (*sc - max).exp();
                sum += *sc;
            }
            let inv = 1.0 / sum;
            for (t, &w) in scores.iter().enumerate() {
                let vt = &cache.values[t * kv_row + g * hd..t * kv_row + (g + 1) * hd];
                axpy(oh, w * inv, vt);
            }
        });
    out
}
