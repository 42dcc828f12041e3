//! Applying many adapters to one batch (vLLM's Punica wrapper, S-LoRA's idea): the base
//! projection has already run once for every row; here each adapter adds
//! `scale · (x · Aᵀ) · Bᵀ` to its own rows only — shrink to rank r, then expand.
//! Rows are grouped into contiguous segments by adapter (the batch is ordered by slot),
//! so each adapter's weights are read once per segment, as in SGMV.
//!
//! One parallel pass per projection: a task shrinks and expands its own rows (segments
//! never share rows, so tasks need no synchronisation), streaming its adapter's weights once
//! in their stored type (f32, f16 or bf16) and accumulating in f32. The tasks are planned
//! once per forward pass: segments are split by rows when there are fewer of them than
//! threads, and a lone short segment (batch 1) is split by output columns.

use std::ops::Range;

use candle_core::{CpuStorage, InplaceOp2, Layout, Tensor};
use rayon::prelude::*;

use super::{LoraLayerWeights, LoraMatrix, LoraModel, LoraModule};
use crate::error::Result;
use crate::kernels::{axpy_widen, dot4, dot_widen, SendPtr, Widen};

/// Most rows one task takes: enough to reuse each weight it loads many times, few enough
/// to keep its activations in L2.
const MAX_TASK_ROWS: usize = 32;
/// Capacity of a task's shrunk values (`rows × rank`, on the stack).
const SHRUNK_CAP: usize = 4096;
/// Rank components shrunk and expanded together; higher ranks take several passes.
const RANK_BLOCK: usize = 256;
/// Floats of `y` an expand block keeps in L1 across all rank components (32 KiB).
const Y_BLOCK_FLOATS: usize = 8192;
/// Narrowest column block of the expand.
const COL_BLOCK: usize = 256;

/// Rows `rows` of the batch use `adapter`; this task adds their update to output columns
/// `part` of `parts` equal shares.
#[derive(Clone, Debug)]
struct LoraTask<'a> {
    rows: Range<usize>,
    adapter: &'a LoraModel,
    part: usize,
    parts: usize,
}

/// The adapter of every row of one forward pass, planned as parallel tasks.
#[derive(Clone, Debug, Default)]
pub struct LoraBatch<'a> {
    tasks: Vec<LoraTask<'a>>,
}

impl<'a> LoraBatch<'a> {
    /// Builds segments from `(rows, adapter)` runs in row order, merging neighbours
    /// that share an adapter, and splits them into tasks for the thread pool.
    pub fn from_runs(runs: impl IntoIterator<Item = (Range<usize>, Option<&'a LoraModel>)>) -> Self {
        let mut segments: Vec<(Range<usize>, &'a LoraModel)> = Vec::new();
        for (rows, adapter) in runs {
            let Some(adapter) = adapter else { continue };
            if let Some((last_rows, last)) = segments.last_mut() {
                if std::ptr::eq(*last, adapter) && last_rows.end == rows.start {
                    last_rows.end = rows.end;
                    continue;
                }
            }
            if !rows.is_empty() {
                segments.push((rows, adapter));
            }
        }
        let threads = rayon::current_num_threads().max(1);
        let total: usize = segments.iter().map(|(rows, _)| rows.len()).sum();
        let max_rows = total.div_ceil(threads).clamp(1, MAX_TASK_ROWS);
        let mut tasks = Vec::new();
        for (rows, adapter) in segments {
            let chunks = rows.len().div_ceil(max_rows);
            let (base, extra) = (rows.len() / chunks, rows.len() % chunks);
            let mut start = rows.start;
            for c in 0..chunks {
                let end = start + base + usize::from(c < extra);
                tasks.push(LoraTask { rows: start..end, adapter, part: 0, parts: 1 });
                start = end;
            }
        }
        // Fewer tasks than threads (a lone short segment): share out the columns too.
        if !tasks.is_empty() && tasks.len() < threads {
            let parts = threads.div_ceil(tasks.len());
            tasks = tasks
                .into_iter()
                .flat_map(|t| (0..parts).map(move |part| LoraTask { part, parts, ..t.clone() }))
                .collect();
        }
        Self { tasks }
    }

    /// Whether any row uses an adapter.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// `y[rows] += scale · x[rows] · Aᵀ · Bᵀ` for every segment whose adapter targets
    /// `(layer, module)`. `x` is `[rows, in]`, `y` is `[rows, out]`, both contiguous f32.
    pub fn add_lora_linear(&self, layer: usize, module: LoraModule, x: &Tensor, y: &Tensor) -> Result<()> {
        if self.tasks.iter().all(|t| t.adapter.weights(layer, module).is_none()) {
            return Ok(());
        }
        y.inplace_op2(x, &ShrinkExpand { tasks: &self.tasks, layer, module })?;
        Ok(())
    }
}

/// The in-place kernel over one projection's tasks.
struct ShrinkExpand<'b, 'a> {
    tasks: &'b [LoraTask<'a>],
    layer: usize,
    module: LoraModule,
}

impl InplaceOp2 for ShrinkExpand<'_, '_> {
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
        let (y_rows, out_dim) = y_layout.shape().dims2()?;
        let (x_rows, in_dim) = x_layout.shape().dims2()?;
        if let Some(t) = self.tasks.iter().find(|t| t.rows.end > y_rows.min(x_rows)) {
            candle_core::bail!("lora rows {:?} outside the batch of {} rows", t.rows, y_rows.min(x_rows));
        }
        let y_ptr = SendPtr(y.as_mut_ptr());
        self.tasks.par_iter().for_each(|task| {
            let y_ptr = y_ptr;
            let Some(w) = task.adapter.weights(self.layer, self.module) else { return };
            let cols = share(out_dim, task.part, task.parts);
            if cols.is_empty() {
                return;
            }
            let x = &x[task.rows.start * in_dim..task.rows.end * in_dim];
            // SAFETY: tasks cover disjoint (rows, columns) of `y` (rows checked in bounds
            // above); this task's rows are one contiguous range of `y`.
            let y = unsafe {
                std::slice::from_raw_parts_mut(y_ptr.0.add(task.rows.start * out_dim), task.rows.len() * out_dim)
            };
            apply(w, x, in_dim, y, out_dim, cols);
        });
        Ok(())
    }
}

/// Share `part` of `parts` of `0..n`, boundaries rounded to 64 columns.
fn share(n: usize, part: usize, parts: usize) -> Range<usize> {
    let bound = |p: usize| if p == parts { n } else { (n * p / parts).next_multiple_of(64).min(n) };
    bound(part)..bound(part + 1)
}

/// Shrink then expand for a few rows: `y[:, cols] += scale · (x · Aᵀ) · Bᵀ[:, cols]`, in
/// blocks of rows and rank components sized for a stack buffer of shrunk values.
fn apply(w: &LoraLayerWeights, x: &[f32], in_dim: usize, y: &mut [f32], out_dim: usize, cols: Range<usize>) {
    let mut shrunk = [0f32; SHRUNK_CAP];
    let rank_block = w.rank.min(RANK_BLOCK);
    let rows_per_block = SHRUNK_CAP / rank_block;
    for (xb, yb) in x.chunks(rows_per_block * in_dim).zip(y.chunks_mut(rows_per_block * out_dim)) {
        for j0 in (0..w.rank).step_by(RANK_BLOCK) {
            let ranks = j0..(j0 + RANK_BLOCK).min(w.rank);
            let t = &mut shrunk[..xb.len() / in_dim * ranks.len()];
            let mode = std::env::var("MODE").unwrap_or_default();
            if mode != "noshrink" { match &w.a {
                LoraMatrix::F32(a) => shrink(a, in_dim, ranks.clone(), w.scale, xb, t),
                LoraMatrix::F16(a) => shrink(a, in_dim, ranks.clone(), w.scale, xb, t),
                LoraMatrix::BF16(a) => shrink(a, in_dim, ranks.clone(), w.scale, xb, t),
            } }
            if mode != "noexpand" {
            match &w.b_t {
                LoraMatrix::F32(b) => expand_rows(b, out_dim, ranks, t, yb, cols.clone()),
                LoraMatrix::F16(b) => expand_rows(b, out_dim, ranks, t, yb, cols.clone()),
                LoraMatrix::BF16(b) => expand_rows(b, out_dim, ranks, t, yb, cols.clone()),
            } }
        }
    }
}

/// `t[i][j - ranks.start] = scale · A_j · x_i` for rank components `ranks` of `a`
/// (`[r][in_dim]`) and every row `x_i`; four rows of `A` at a time, each loaded once for all
/// rows of `x`.
fn shrink<E: Widen>(a: &[E], in_dim: usize, ranks: Range<usize>, scale: f32, x: &[f32], t: &mut [f32]) {
    let k = ranks.len();
    let row = |j: usize| &a[j * in_dim..(j + 1) * in_dim];
    let mut j = ranks.start;
    while j + 4 <= ranks.end {
        let rows = [row(j), row(j + 1), row(j + 2), row(j + 3)];
        for (xi, ti) in x.chunks_exact(in_dim).zip(t.chunks_exact_mut(k)) {
            let d = dot4(rows, xi);
            for (q, v) in d.into_iter().enumerate() {
                ti[j - ranks.start + q] = v * scale;
            }
        }
        j += 4;
    }
    for j in j..ranks.end {
        for (xi, ti) in x.chunks_exact(in_dim).zip(t.chunks_exact_mut(k)) {
            ti[j - ranks.start] = dot_widen(row(j), xi) * scale;
        }
    }
}

/// `y_i[cols] += Σ_j t[i][j - ranks.start] · Bᵀ_j[cols]` for every row `y_i` (`out_dim`
/// wide) with `b_t` as `[r][out_dim]`. Rank components outermost, so `Bᵀ` is read as one
/// sequential stream (what the hardware prefetchers follow best), in column blocks only as
/// narrow as needed to keep the rows' slices of `y` in L1.
fn expand_rows<E: Widen>(b_t: &[E], out_dim: usize, ranks: Range<usize>, t: &[f32], y: &mut [f32], cols: Range<usize>) {
    let k = ranks.len();
    let rows = y.len() / out_dim;
    let block = (Y_BLOCK_FLOATS / rows.max(1)).max(COL_BLOCK);
    for c0 in cols.clone().step_by(block) {
        let c1 = (c0 + block).min(cols.end);
        for j in ranks.clone() {
            let b_j = &b_t[j * out_dim + c0..j * out_dim + c1];
            for (yi, ti) in y.chunks_exact_mut(out_dim).zip(t.chunks_exact(k)) {
                axpy_widen(&mut yi[c0..c1], ti[j - ranks.start], b_j);
            }
        }
    }
}
