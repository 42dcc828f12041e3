//! The CPU kernel of the batched LoRA step (vLLM's `punica_cpu`): one parallel pass per
//! projection over the tasks [`LoraBatch`] planned. A task shrinks and expands its own rows
//! (segments never share rows, so tasks need no synchronisation), streaming its adapter's
//! weights once in their stored type (f32, f16 or bf16) and accumulating in f32.

use std::cell::RefCell;

use candle_core::{CpuStorage, InplaceOp2, Layout, Tensor};
use rayon::prelude::*;

use super::kernels::{axpy_widen, dot_widen, dots_4x4, expand, expand_4, widen_into, SendPtr, Widen, DOT_BLOCK};
use crate::error::Result;
use crate::lora::punica::LoraTask;
use crate::lora::{LoraBatch, LoraLayerWeights, LoraMatrix, LoraModule};

/// Output columns expanded together for all of a task's rows, so their block of `Bᵀ`
/// (`rank × COL_BLOCK` values) stays in cache while every row uses it.
const COL_BLOCK: usize = 256;

/// `y[rows] += scale · x[rows] · Aᵀ · Bᵀ` for every segment whose adapter targets
/// `(layer, module)`. `x` is `[rows, in]`, `y` is `[rows, out]`, both contiguous f32.
pub(crate) fn add_lora_linear(batch: &LoraBatch<'_>, layer: usize, module: LoraModule, x: &Tensor, y: &Tensor) -> Result<()> {
    if !batch.targets(layer, module) {
        return Ok(());
    }
    y.inplace_op2(x, &ShrinkExpand { tasks: batch.tasks(), layer, module })?;
    Ok(())
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
        let run = |task: &LoraTask<'_>| {
            let Some(w) = task.adapter.weights(self.layer, self.module) else { return };
            let x = &x[task.rows.start * in_dim..task.rows.end * in_dim];
            // SAFETY: the tasks' row ranges are disjoint (runs are checked to be in order)
            // and inside `y` (checked above), so each task has its rows to itself.
            let y = unsafe {
                std::slice::from_raw_parts_mut(y_ptr.get().add(task.rows.start * out_dim), task.rows.len() * out_dim)
            };
            apply(w, x, in_dim, y, out_dim);
        };
        // One task (batch 1, or one short segment) runs here: waking the pool would cost
        // more than its work.
        match self.tasks {
            [task] => run(task),
            tasks => tasks.par_iter().for_each(run),
        }
        Ok(())
    }
}

/// Per-thread buffers of the kernel, grown to the largest size needed and then reused, so
/// no step allocates.
#[derive(Default)]
struct Scratch {
    /// Shrunk values of a task's rows, `[rows][rank]`.
    shrunk: Vec<f32>,
    /// `A`, or a block of columns of `Bᵀ`, widened to f32 once for all of a task's rows.
    widened: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

/// Grows `v` to at least `n` values and returns its first `n`.
fn at_least(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// Shrink then expand for a task's rows: `y += scale · (x · Aᵀ) · Bᵀ`.
fn apply(w: &LoraLayerWeights, x: &[f32], in_dim: usize, y: &mut [f32], out_dim: usize) {
    SCRATCH.with_borrow_mut(|s| {
        let t = at_least(&mut s.shrunk, x.len() / in_dim * w.rank);
        let widened = &mut s.widened;
        match &w.a {
            LoraMatrix::F32(a) => shrink(a, in_dim, w.scale, x, t, widened),
            LoraMatrix::F16(a) => shrink(a, in_dim, w.scale, x, t, widened),
            LoraMatrix::BF16(a) => shrink(a, in_dim, w.scale, x, t, widened),
        }
        match &w.b_t {
            LoraMatrix::F32(b) => expand_rows(b, out_dim, t, y, widened),
            LoraMatrix::F16(b) => expand_rows(b, out_dim, t, y, widened),
            LoraMatrix::BF16(b) => expand_rows(b, out_dim, t, y, widened),
        }
    });
}

/// `t[i][j] = scale · A_j · x_i` for every rank component `j` of `a` (`[r][in_dim]`) and
/// every row `x_i`. One row (decode): `A` is read once in its stored type, as one
/// sequential stream (what the hardware prefetchers follow best). Several rows: `A` is
/// widened once into `widened` (f32 is read in place) and the dots are formed four rank
/// components by four rows at a time, each value loaded used four times. Every dot is
/// formed the same way whatever the blocking, so a row's result does not depend on which
/// rows share its task.
fn shrink<E: Widen>(a: &[E], in_dim: usize, scale: f32, x: &[f32], t: &mut [f32], widened: &mut Vec<f32>) {
    let rank = a.len() / in_dim;
    let rows = x.len() / in_dim;
    if rows == 1 {
        for (a_j, tj) in a.chunks_exact(in_dim).zip(t.iter_mut()) {
            *tj = dot_widen(a_j, x) * scale;
        }
        return;
    }
    let a: &[f32] = match E::as_f32(a) {
        Some(a) => a,
        None => {
            let w = at_least(widened, a.len());
            widen_into(w, a);
            w
        }
    };
    let a_row = |j: usize| &a[j * in_dim..(j + 1) * in_dim];
    let x_row = |i: usize| &x[i * in_dim..(i + 1) * in_dim];
    let (rank_blocked, rows_blocked) = (rank - rank % DOT_BLOCK, rows - rows % DOT_BLOCK);
    for j0 in (0..rank_blocked).step_by(DOT_BLOCK) {
        for i0 in (0..rows_blocked).step_by(DOT_BLOCK) {
            let out = dots_4x4(std::array::from_fn(|j| a_row(j0 + j)), std::array::from_fn(|i| x_row(i0 + i)));
            for (j, out_j) in out.iter().enumerate() {
                for (i, &v) in out_j.iter().enumerate() {
                    t[(i0 + i) * rank + j0 + j] = v * scale;
                }
            }
        }
    }
    // The edges the blocks leave: remaining rows for blocked components, then the
    // remaining components for every row.
    for j in 0..rank_blocked {
        for i in rows_blocked..rows {
            t[i * rank + j] = dot_widen(a_row(j), x_row(i)) * scale;
        }
    }
    for j in rank_blocked..rank {
        for i in 0..rows {
            t[i * rank + j] = dot_widen(a_row(j), x_row(i)) * scale;
        }
    }
}

/// `y_i += Σ_j t[i][j] · Bᵀ_j` for every row `y_i` (`out_dim` wide) with `b_t` as
/// `[r][out_dim]`. One row (decode): rank components outermost, so `Bᵀ` too is read as one
/// sequential stream. Several rows: per block of columns, the block of `Bᵀ` is widened once
/// (f32 is read in place) and the rows accumulate it in registers over all `j`, four rows
/// at a time so each value of `Bᵀ` loaded serves four rows. Both
/// add the terms in the same order.
fn expand_rows<E: Widen>(b_t: &[E], out_dim: usize, t: &[f32], y: &mut [f32], widened: &mut Vec<f32>) {
    let rank = b_t.len() / out_dim;
    if y.len() == out_dim {
        for (b_j, &t_j) in b_t.chunks_exact(out_dim).zip(t) {
            axpy_widen(y, t_j, b_j);
        }
        return;
    }
    for c0 in (0..out_dim).step_by(COL_BLOCK) {
        let c1 = (c0 + COL_BLOCK).min(out_dim);
        let (b, stride): (&[f32], usize) = match E::as_f32(b_t) {
            Some(b) => (&b[c0..], out_dim),
            None => {
                let w = at_least(widened, rank * (c1 - c0));
                for (wj, b_j) in w.chunks_exact_mut(c1 - c0).zip(b_t.chunks_exact(out_dim)) {
                    widen_into(wj, &b_j[c0..c1]);
                }
                (w, c1 - c0)
            }
        };
        let mut y_blocks = y.chunks_exact_mut(DOT_BLOCK * out_dim);
        let mut t_blocks = t.chunks_exact(DOT_BLOCK * rank);
        for (yb, tb) in (&mut y_blocks).zip(&mut t_blocks) {
            let mut rows = yb.chunks_exact_mut(out_dim);
            let ys = std::array::from_fn(|_| &mut rows.next().expect("a full block of rows")[c0..c1]);
            expand_4(ys, std::array::from_fn(|i| &tb[i * rank..(i + 1) * rank]), b, stride);
        }
        for (yi, ti) in y_blocks.into_remainder().chunks_exact_mut(out_dim).zip(t_blocks.remainder().chunks_exact(rank)) {
            expand(&mut yi[c0..c1], ti, b, stride);
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};
    use half::{bf16, f16};

    use std::ops::Range;

    use super::*;
    use crate::lora::LoraModel;

    use crate::backend::cpu::kernels::tests::values;

    fn matrix(v: Vec<f32>, dtype: usize) -> LoraMatrix {
        match dtype {
            0 => LoraMatrix::F32(v),
            1 => LoraMatrix::F16(v.iter().map(|&x| f16::from_f32(x)).collect()),
            _ => LoraMatrix::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
        }
    }

    /// A one-layer adapter on `q_proj` only, its matrices in `dtype` (0: f32, 1: f16, 2: bf16).
    fn adapter(rank: usize, (out_dim, in_dim): (usize, usize), dtype: usize, seed: u32) -> LoraModel {
        let weights = LoraLayerWeights {
            rank,
            scale: 1.5,
            a: matrix(values(rank * in_dim, seed), dtype),
            b_t: matrix(values(rank * out_dim, seed + 1), dtype),
        };
        LoraModel {
            name: format!("a{seed}"),
            path: Default::default(),
            bytes: weights.size_in_bytes(),
            layers: vec![[Some(weights), None, None, None, None, None, None]],
            max_rank: rank,
            config: None,
        }
    }

    fn apply_rows(runs: &[(Range<usize>, Option<&LoraModel>)], x: &[f32], y: &[f32], in_dim: usize, out_dim: usize) -> Vec<f32> {
        let rows = x.len() / in_dim;
        let x = Tensor::from_slice(x, (rows, in_dim), &Device::Cpu).unwrap();
        let y = Tensor::from_slice(y, (rows, out_dim), &Device::Cpu).unwrap();
        add_lora_linear(&LoraBatch::from_runs(runs.iter().cloned()), 0, LoraModule::QProj, &x, &y).unwrap();
        y.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn mixed_batch_matches_the_definition_and_each_row_alone() {
        let (out_dim, in_dim) = (70, 40);
        let models = [adapter(5, (out_dim, in_dim), 0, 10), adapter(4, (out_dim, in_dim), 1, 20), adapter(8, (out_dim, in_dim), 2, 30)];
        let runs: Vec<(Range<usize>, Option<&LoraModel>)> =
            vec![(0..3, Some(&models[0])), (3..4, None), (4..10, Some(&models[1])), (10..12, Some(&models[2]))];
        let rows = 12;
        let (x, y0) = (values(rows * in_dim, 1), values(rows * out_dim, 2));
        let batch = apply_rows(&runs, &x, &y0, in_dim, out_dim);
        for (rows_of, model) in &runs {
            for i in rows_of.clone() {
                let (xi, yi) = (&x[i * in_dim..(i + 1) * in_dim], &y0[i * out_dim..(i + 1) * out_dim]);
                let alone = apply_rows(&[(0..1, *model)], xi, yi, in_dim, out_dim);
                assert_eq!(&batch[i * out_dim..(i + 1) * out_dim], &alone[..], "row {i} alone");
                let Some(m) = model else {
                    assert_eq!(&alone[..], yi, "row {i} has no adapter");
                    continue;
                };
                let w = m.weights(0, LoraModule::QProj).unwrap();
                let (a, b_t) = (w.a.to_f32_vec(), w.b_t.to_f32_vec());
                for o in 0..out_dim {
                    let update: f64 = (0..w.rank)
                        .map(|j| {
                            let shrunk: f64 = (0..in_dim).map(|k| a[j * in_dim + k] as f64 * xi[k] as f64).sum();
                            shrunk * b_t[j * out_dim + o] as f64
                        })
                        .sum();
                    let expected = yi[o] as f64 + w.scale as f64 * update;
                    assert!((alone[o] as f64 - expected).abs() < 1e-5, "row {i} col {o}: {} vs {expected}", alone[o]);
                }
            }
        }
    }
}
