//! Which adapter every row of one batch uses (vLLM's `punica_wrapper/punica_base.py`, S-LoRA's
//! idea): the base projection runs once for every row; then each adapter adds
//! `scale · (x · Aᵀ) · Bᵀ` to its own rows only, shrink to rank r, then expand. Rows are
//! grouped into contiguous segments by adapter (the batch is ordered by slot), so each
//! adapter's weights are read once per segment, as in SGMV.
//!
//! This file plans the work, whatever the device: segments longer than their share of the
//! threads are split by rows into tasks, once per forward pass. The kernel that runs the
//! tasks is the backend's ([`crate::backend::Backend::add_lora_linear`]; the CPU one is
//! `backend/cpu/punica.rs`). A row's result does not depend on which rows share its task.

use std::ops::Range;

use super::{LoraModel, LoraModule};

/// Most rows one task takes: enough to reuse each weight it loads many times, few enough
/// to keep its activations in L2.
const MAX_TASK_ROWS: usize = 32;

/// Rows `rows` of the batch use `adapter`.
#[derive(Clone, Debug)]
pub(crate) struct LoraTask<'a> {
    pub(crate) rows: Range<usize>,
    pub(crate) adapter: &'a LoraModel,
}

/// The adapter of every row of one forward pass, planned as parallel tasks.
#[derive(Clone, Debug, Default)]
pub struct LoraBatch<'a> {
    tasks: Vec<LoraTask<'a>>,
}

impl<'a> LoraBatch<'a> {
    /// Builds segments from `(rows, adapter)` runs in row order, merging neighbours
    /// that share an adapter, and splits them into tasks for the thread pool.
    ///
    /// # Panics
    /// If the runs overlap or are out of order.
    pub fn from_runs(runs: impl IntoIterator<Item = (Range<usize>, Option<&'a LoraModel>)>) -> Self {
        let mut segments: Vec<(Range<usize>, &'a LoraModel)> = Vec::new();
        let mut end = 0;
        for (rows, adapter) in runs {
            assert!(rows.start >= end, "LoRA runs must be disjoint and in row order");
            end = end.max(rows.end);
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
                tasks.push(LoraTask { rows: start..end, adapter });
                start = end;
            }
        }
        Self { tasks }
    }

    /// Whether any row uses an adapter.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Whether some row's adapter targets `(layer, module)`.
    pub(crate) fn targets(&self, layer: usize, module: LoraModule) -> bool {
        self.tasks.iter().any(|t| t.adapter.weights(layer, module).is_some())
    }

    /// The planned tasks, for a backend's kernel.
    pub(crate) fn tasks(&self) -> &[LoraTask<'a>] {
        &self.tasks
    }
}
