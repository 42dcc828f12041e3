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

use crate::kernels::{axpy, dot, SendPtr};


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
        // Shrink: t[row][j] = scale · A_j · x_row, segments in parallel; each A row is read
        // once per segment and dotted with all its rows while it sits in L1.
        let shrunk: Vec<Vec<f32>> = self
            .work
            .par_iter()
            .map(|(rows, w)| {
                let (n, r) = (rows.len(), w.rank);
                let mut t = vec![0f32; n * r];
                for j in 0..r {
                    let a_j = &w.a[j * in_dim..(j + 1) * in_dim];
                    for (i, row) in rows.clone().enumerate() {
                        t[i * r + j] = dot(a_j, &x[row * in_dim..(row + 1) * in_dim]) * w.scale;
                    }
                }
                t
            })
            .collect();
        // Expand: y_row += Σ_j t[row][j] · Bᵀ_j, one parallel pass split by output columns;
        // each thread streams its slice of every B row once per segment.
        let chunk = out_dim.div_ceil(rayon::current_num_threads().max(1) * 2).max(256);
        let y_ptr = SendPtr(y.as_mut_ptr());
        (0..out_dim.div_ceil(chunk)).into_par_iter().for_each(|c| {
            let y_ptr = y_ptr;
            let cols = c * chunk..((c + 1) * chunk).min(out_dim);
            for ((rows, w), t) in self.work.iter().zip(&shrunk) {
                let r = w.rank;
                for j in 0..r {
                    let b_j = &w.b_t[j * out_dim + cols.start..j * out_dim + cols.end];
                    for (i, row) in rows.clone().enumerate() {
                        // SAFETY: tasks write disjoint column ranges; rows are in bounds.
                        let y_row = unsafe { std::slice::from_raw_parts_mut(y_ptr.0.add(row * out_dim + cols.start), cols.len()) };
                        axpy(y_row, t[i * r + j], b_j);
                    }
                }
            }
        });
        Ok(())
    }
}
