//! The CPU attention kernel over variable-length sequences in one batch: each sequence
//! contributes a run of rows (a prefill chunk or one decode token) and attends to its own
//! KV cache only. Rotary embedding, Qwen3's q/k norms, the cache append and the attention
//! itself are done in one pass over raw slices, since at this model size many small tensor
//! ops cost more in dispatch than in arithmetic.

use rayon::prelude::*;

use super::kernels::{axpy, dot, rms_norm_in_place};
use crate::attention::{HeadShape, QkNorm, Rope, SeqSpan};
use crate::kv::LayerKv;

/// Runs attention for a batch of spans; `q` is `[rows, heads*hd]`, `k`/`v` are
/// `[rows, kv_heads*hd]`. Keys and values are appended to each span's layer cache.
/// Returns `[rows, heads*hd]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend(
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
            let head = CachedHead { keys: &cache.keys, values: &cache.values, stride: kv_row, offset: g * hd, visible };
            attend_head(qh, &head, scale, scores, oh);
        });
    out
}

/// One kv head of one sequence's cache: position `t`'s key is
/// `keys[t·stride + offset ..][..head_dim]`, its value likewise.
struct CachedHead<'a> {
    keys: &'a [f32],
    values: &'a [f32],
    stride: usize,
    offset: usize,
    visible: usize,
}

/// `out = softmax(scale · q·Kᵀ) · V` for one query head over the visible positions;
/// `scores` is scratch space.
fn attend_head(q: &[f32], head: &CachedHead<'_>, scale: f32, scores: &mut Vec<f32>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F was detected; the shapes are what the kernels expect.
        match q.len() {
            64 => return unsafe { avx512::attend_head::<4>(q, head, scale, scores, out) },
            128 => return unsafe { avx512::attend_head::<8>(q, head, scale, scores, out) },
            _ => {}
        }
    }
    let hd = q.len();
    let at = |t: usize| head.offset + t * head.stride..head.offset + t * head.stride + hd;
    scores.clear();
    let mut max = f32::NEG_INFINITY;
    for t in 0..head.visible {
        let sc = dot(q, &head.keys[at(t)]) * scale;
        max = max.max(sc);
        scores.push(sc);
    }
    let inv = 1.0 / softmax_numerators(scores, max);
    for (t, &w) in scores.iter().enumerate() {
        axpy(out, w * inv, &head.values[at(t)]);
    }
}

/// Replaces each score by `exp(score − max)` and returns their sum.
fn softmax_numerators(scores: &mut [f32], max: f32) -> f32 {
    let mut sum = 0f32;
    for sc in scores.iter_mut() {
        *sc = (*sc - max).exp();
        sum += *sc;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{softmax_numerators, CachedHead};

    /// [`super::attend_head`] for a head of `C` × 16 values: the query and the output stay in
    /// registers while every cached key and value streams past once.
    ///
    /// # Safety
    /// The CPU must support AVX-512F (`is_x86_feature_detected!("avx512f")`). Nothing else
    /// is asked of the caller: the lengths the unchecked loads and stores rely on (`q` and
    /// `out` of `C` × 16 values, keys and values reaching the last visible position) are
    /// asserted first, so a wrong shape panics.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn attend_head<const C: usize>(
        q: &[f32],
        head: &CachedHead<'_>,
        scale: f32,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        assert!(q.len() == C * 16 && out.len() == C * 16);
        if let Some(last) = head.visible.checked_sub(1) {
            let end = head.offset + last * head.stride + C * 16;
            assert!(head.keys.len() >= end && head.values.len() >= end);
        }
        let qv: [__m512; C] = std::array::from_fn(|c| _mm512_loadu_ps(q.as_ptr().add(16 * c)));
        scores.clear();
        scores.reserve(head.visible);
        let mut max = f32::NEG_INFINITY;
        for t in 0..head.visible {
            let k = head.keys.as_ptr().add(head.offset + t * head.stride);
            let mut acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(k));
            for (c, qc) in qv.iter().enumerate().skip(1) {
                acc = _mm512_fmadd_ps(*qc, _mm512_loadu_ps(k.add(16 * c)), acc);
            }
            let sc = _mm512_reduce_add_ps(acc) * scale;
            max = max.max(sc);
            scores.push(sc);
        }
        let inv = 1.0 / softmax_numerators(scores, max);
        let mut acc: [__m512; C] = std::array::from_fn(|c| _mm512_loadu_ps(out.as_ptr().add(16 * c)));
        for (t, &w) in scores.iter().enumerate() {
            let v = head.values.as_ptr().add(head.offset + t * head.stride);
            let w = _mm512_set1_ps(w * inv);
            for (c, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(w, _mm512_loadu_ps(v.add(16 * c)), *a);
            }
        }
        for (c, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.as_mut_ptr().add(16 * c), *a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::kernels::tests::values;

    /// The vector kernel gives the portable result (up to rounding) for both head sizes.
    #[test]
    fn head_kernel_matches_the_definition() {
        for hd in [64usize, 128] {
            let (stride, offset, visible) = (3 * hd, hd, 37);
            let keys = values(visible * stride, 1);
            let vals = values(visible * stride, 2);
            let q = values(hd, 3);
            let head = CachedHead { keys: &keys, values: &vals, stride, offset, visible };
            let mut out = vec![0f32; hd];
            attend_head(&q, &head, 0.125, &mut Vec::new(), &mut out);
            let scores: Vec<f64> = (0..visible)
                .map(|t| (0..hd).map(|i| q[i] as f64 * keys[offset + t * stride + i] as f64).sum::<f64>() * 0.125)
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = weights.iter().sum();
            for i in 0..hd {
                let expected: f64 = (0..visible).map(|t| weights[t] / sum * vals[offset + t * stride + i] as f64).sum();
                assert!((out[i] as f64 - expected).abs() < 1e-5, "hd {hd}, value {i}: {} vs {expected}", out[i]);
            }
        }
    }
}
