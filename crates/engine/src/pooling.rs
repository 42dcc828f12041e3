//! Pooling: how a sequence's per-token hidden states become one vector. Shared by the
//! semantic router (a base-only pass, [`crate::routing`]) and embedding requests, which run
//! through the batch loop like any request, with their adapter ([`PoolState`], summed chunk
//! by chunk as their prompt is prefilled).

use candle_core::{DType, Tensor};

use crate::error::Result;

/// How a layer's `[tokens, hidden]` states become one vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    /// The mean without the first token, whose state (the attention sink's massive
    /// activations) dominates every plain mean alike.
    MeanSkipFirst,
    LastToken,
}

impl Pooling {
    /// Whether the state at `pos` of a `len`-token prompt is part of the vector.
    pub fn includes(self, pos: usize, len: usize) -> bool {
        match self {
            Pooling::Mean => pos < len,
            Pooling::MeanSkipFirst => pos < len && (pos >= 1 || len == 1),
            Pooling::LastToken => pos + 1 == len,
        }
    }
}

/// Pools `[tokens, hidden]` into one vector (the same sum a [`PoolState`] keeps, at once).
pub fn pool(hidden: &Tensor, pooling: Pooling) -> Result<Vec<f32>> {
    let rows = hidden.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let mut state = PoolState::new(pooling, rows.len(), rows.first().map_or(0, Vec::len));
    for (pos, row) in rows.iter().enumerate() {
        if state.wants(pos) {
            state.add(pos, row);
        }
    }
    Ok(state.into_vector())
}

/// The vector a prefill-only sequence (an embedding request) is building: the running sum
/// of the last decoder layer's states (before the final norm) at the positions its pooling
/// includes. Positions are added in order, each once: a span recomputed after preemption or
/// a failed pass finds its positions already counted.
#[derive(Clone, Debug)]
pub struct PoolState {
    pooling: Pooling,
    prompt_len: usize,
    sum: Vec<f32>,
    rows: usize,
    /// Positions below this are counted.
    next: usize,
}

impl PoolState {
    /// An empty sum for a `prompt_len`-token prompt of a model with `hidden` features.
    pub fn new(pooling: Pooling, prompt_len: usize, hidden: usize) -> Self {
        Self { pooling, prompt_len, sum: vec![0.0; hidden], rows: 0, next: 0 }
    }

    /// Whether the state at `pos` is still to be added.
    pub fn wants(&self, pos: usize) -> bool {
        pos >= self.next && self.pooling.includes(pos, self.prompt_len)
    }

    /// Adds the state at `pos` (one that [`PoolState::wants`]).
    pub fn add(&mut self, pos: usize, state: &[f32]) {
        debug_assert!(self.wants(pos) && state.len() == self.sum.len());
        self.sum.iter_mut().zip(state).for_each(|(s, x)| *s += x);
        self.rows += 1;
        self.next = pos + 1;
    }

    /// The pooled vector (not normalised).
    pub fn into_vector(self) -> Vec<f32> {
        let n = self.rows.max(1) as f32;
        self.sum.into_iter().map(|s| s / n).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_and_whole_pooling_equal_the_mean_and_count_each_position_once() {
        let (len, hidden) = (7usize, 5usize);
        let data: Vec<f32> = (0..len * hidden).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3).collect();
        let t = Tensor::from_vec(data.clone(), (len, hidden), &candle_core::Device::Cpu).unwrap();
        for pooling in [Pooling::Mean, Pooling::MeanSkipFirst, Pooling::LastToken] {
            let mut state = PoolState::new(pooling, len, hidden);
            // Chunks 0..3, 3..5, then 2..7 again (a recompute), then nothing new.
            for (from, to) in [(0, 3), (3, 5), (2, len), (0, len)] {
                for pos in from..to {
                    if state.wants(pos) {
                        state.add(pos, &data[pos * hidden..(pos + 1) * hidden]);
                    }
                }
            }
            let got = state.into_vector();
            let rows: Vec<u32> = match pooling {
                Pooling::Mean => (0..len as u32).collect(),
                Pooling::MeanSkipFirst => (1..len as u32).collect(),
                Pooling::LastToken => vec![len as u32 - 1],
            };
            let want = t.index_select(&Tensor::new(rows.as_slice(), t.device()).unwrap(), 0).unwrap().mean(0).unwrap().to_vec1::<f32>().unwrap();
            let whole = pool(&t, pooling).unwrap();
            assert_eq!(whole.len(), hidden);
            for ((g, w), p) in got.iter().zip(&want).zip(whole) {
                assert!((g - w).abs() < 1e-5 && (p - w).abs() < 1e-5, "{pooling:?}: {got:?} vs {want:?}");
            }
        }
        // A one-token prompt pools its only state, skip-first or not.
        assert!(Pooling::MeanSkipFirst.includes(0, 1));
        assert!(!Pooling::MeanSkipFirst.includes(0, 2));
    }
}
