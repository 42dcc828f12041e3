//! Applying many adapters to one batch (vLLM's Punica wrapper, S-LoRA's idea): the base
//! projection has already run once for every row; here each adapter adds
//! `scale · (x · Aᵀ) · Bᵀ` to its own rows only — shrink to rank r, then expand.
//! Rows are grouped into contiguous segments by adapter (the batch is ordered by slot),
//! so each adapter's weights are read once per segment, as in SGMV.

use std::ops::Range;

use candle_core::{CpuStorage, InplaceOp2, Layout, Tensor};

use super::{LoraLayerWeights, LoraModel, LoraModule};
use crate::error::Result;
use rayon::prelude::*;

use crate::kernels::dot;

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used for disjoint writes inside one kernel call.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Rows `rows` of the batch use `adapter`.
#[derive(Clone, Debug)]
pub struct LoraSegment<'a> {
    pub rows: Range<usize>,
    pub adapter: &'a LoraModel,
}

/// The adapter of every row of one forward pass.
#[derive(Clone, Debug, Default)]
pub struct LoraBatch<'a> {
    segments: Vec<LoraSegment<'a>>,
}

impl<'a> LoraBatch<'a> {
    /// A batch where no row uses an adapter.
    pub fn none() -> Self {
        Self::default()
    }

    /// Builds segments from `(rows, adapter)` runs in row order, merging neighbours
    /// that share an adapter.
    pub fn from_runs(runs: impl IntoIterator<Item = (Range<usize>, Option<&'a LoraModel>)>) -> Self {
        let mut segments: Vec<LoraSegment<'a>> = Vec::new();
        for (rows, adapter) in runs {
            let Some(adapter) = adapter else { continue };
            if let Some(last) = segments.last_mut() {
                if std::ptr::eq(last.adapter, adapter) && last.rows.end == rows.start {
                    last.rows.end = rows.end;
                    continue;
                }
            }
            segments.push(LoraSegment { rows, adapter });
        }
        Self { segments }
    }

    /// Whether any row uses an adapter.
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// Distinct adapters in the batch.
    pub fn num_segments(&self) -> usize {
        self.segments.len()
    }

    /// `y[rows] += scale · x[rows] · Aᵀ · Bᵀ` for every segment whose adapter targets
    /// `(layer, module)`. `x` is `[rows, in]`, `y` is `[rows, out]`, both contiguous f32.
    pub fn add_lora_linear(&self, layer: usize, module: LoraModule, x: &Tensor, y: &Tensor) -> Result<()> {
        let work: Vec<(Range<usize>, &LoraLayerWeights)> = self
            .segments
            .iter()
            .filter_map(|s| s.adapter.weights(layer, module).map(|w| (s.rows.clone(), w)))
            .collect();
        if work.is_empty() {
            return Ok(());
        }
        y.inplace_op2(x, &ShrinkExpand { work })?;
        Ok(())
    }
}

/// The in-place kernel: per segment, `t = scale · x · Aᵀ` (shrink), then `y += t · Bᵀ` (expand).
struct ShrinkExpand<'a> {
    work: Vec<(Range<usize>, &'a LoraLayerWeights)>,
}

impl InplaceOp2 for ShrinkExpand<'_> {
    fn name(&self) -> &'static str {
        "lora-shrink-expand"
    }

    fn cpu_fwd(
        &self,
        y: &mut CpuStorage,
        y_layout: &Layout,
        x: &CpuStorage,
        x_layout: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(y), CpuStorage::F32(x)) = (y, x) else {
            candle_core::bail!("lora apply needs f32 activations");
        };
        let (Some((y0, y1)), Some((x0, x1))) =
            (y_layout.contiguous_offsets(), x_layout.contiguous_offsets())
        else {
            candle_core::bail!("lora apply needs contiguous activations");
        };
        let (y, x) = (&mut y[y0..y1], &x[x0..x1]);
        let (_, out_dim) = y_layout.shape().dims2()?;
        let (_, in_dim) = x_layout.shape().dims2()?;
        for (rows, w) in &self.work {
            let n = rows.len();
            let r = w.rank;
            // Shrink: t[row][j] = scale · A_j · x_row. Each A row is read once per segment
            // and dotted with every row of the segment while it sits in L1.
            let x_seg = &x[rows.start * in_dim..rows.end * in_dim];
            let mut t_by_j = vec![0f32; r * n];
            t_by_j.par_chunks_mut(n).enumerate().for_each(|(j, tj)| {
                let a_j = &w.a[j * in_dim..(j + 1) * in_dim];
                for (i, v) in tj.iter_mut().enumerate() {
                    *v = dot(a_j, &x_seg[i * in_dim..(i + 1) * in_dim]) * w.scale;
                }
            });
            let mut t = vec![0f32; n * r];
            for j in 0..r {
                for i in 0..n {
                    t[i * r + j] = t_by_j[j * n + i];
                }
            }
            // Expand: y[i][o] += B_o · t_i, split by output columns across threads so each
            // B row is read once for the whole segment.
            let y_seg = &mut y[rows.start * out_dim..rows.end * out_dim];
            let chunk = out_dim.div_ceil(rayon::current_num_threads().max(1) * 2).max(64);
            let y_ptr = SendPtr(y_seg.as_mut_ptr());
            (0..out_dim.div_ceil(chunk)).into_par_iter().for_each(|c| {
                let y_ptr = y_ptr;
                for o in c * chunk..((c + 1) * chunk).min(out_dim) {
                    let b_o = &w.b[o * r..(o + 1) * r];
                    for i in 0..n {
                        // SAFETY: tasks write disjoint output columns.
                        unsafe { *y_ptr.0.add(i * out_dim + o) += dot(b_o, &t[i * r..(i + 1) * r]) };
                    }
                }
            });
        }
        Ok(())
    }
}
