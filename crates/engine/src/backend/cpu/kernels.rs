//! Small numeric loops written so LLVM vectorises them (fixed-width accumulators), used by
//! the attention and LoRA kernels that work on raw slices instead of many small tensor ops.

const LANES: usize = 16;

/// An output pointer shared by parallel tasks that each write a disjoint part of it.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: callers only write disjoint elements through it, while the buffer outlives the
// parallel loop.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `SendPtr`, not its field).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Dot product of two equally long slices.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    dot_widen(a, b)
}

/// `y += alpha * x`.
#[inline]
pub(crate) fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    debug_assert_eq!(y.len(), x.len());
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

/// An element type weights are stored in, read by the LoRA kernels straight from memory
/// and widened to f32 in registers (exactly: every f16 and bf16 value is an f32 value).
/// The conversions are plain integer and float operations, so LLVM vectorises them with
/// whatever the build targets (AVX-512 with `target-cpu=native`, SSE2 otherwise).
pub(crate) trait Widen: Copy + Send + Sync {
    /// The value as f32.
    fn widen(self) -> f32;

    /// The values themselves when they already are f32 (nothing to widen).
    #[inline(always)]
    fn as_f32(values: &[Self]) -> Option<&[f32]> {
        let _ = values;
        None
    }
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }

    #[inline(always)]
    fn as_f32(values: &[Self]) -> Option<&[f32]> {
        Some(values)
    }
}

impl Widen for half::bf16 {
    /// bf16 is the top half of an f32.
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

impl Widen for half::f16 {
    /// Exponent and mantissa moved into f32's fields and rebiased by one multiply by 2^112
    /// (exact, subnormals included); infinities and NaNs get f32's all-ones exponent.
    #[inline(always)]
    fn widen(self) -> f32 {
        const REBIAS: f32 = f32::from_bits((127 + 112) << 23); // 2^(127 - 15)
        let h = self.to_bits() as u32;
        let magnitude = f32::from_bits((h & 0x7fff) << 13) * REBIAS;
        let special = if h & 0x7c00 == 0x7c00 { 0x7f80_0000 } else { 0 };
        f32::from_bits(((h & 0x8000) << 16) | magnitude.to_bits() | special)
    }
}

/// Dot product of a weight row (any [`Widen`] type) with an activation row of its length,
/// in [`LANES`] partial sums. Widening is exact, so a row gives the same result whether it is
/// read in its stored type or widened first.
#[inline]
pub(crate) fn dot_widen<E: Widen>(a: &[E], x: &[f32]) -> f32 {
    let n = a.len();
    let x = &x[..n];
    let mut acc = [0f32; LANES];
    let full = n - n % LANES;
    for k in (0..full).step_by(LANES) {
        let xs: &[f32; LANES] = x[k..k + LANES].try_into().unwrap();
        let ws: &[E; LANES] = a[k..k + LANES].try_into().unwrap();
        for i in 0..LANES {
            acc[i] += ws[i].widen() * xs[i];
        }
    }
    finish_dot(&acc, &a[full..], &x[full..])
}

/// The end of every dot product here: the [`LANES`] partial sums added in lane order, then
/// the tail values one by one. One definition, so blocked and single dots agree bit for bit.
#[inline]
fn finish_dot<E: Widen>(lanes: &[f32; LANES], a_tail: &[E], x_tail: &[f32]) -> f32 {
    let mut sum: f32 = lanes.iter().sum();
    for (w, xv) in a_tail.iter().zip(x_tail) {
        sum += w.widen() * xv;
    }
    sum
}

/// Rows of `A` and of `x` one [`dots_4x4`] call takes.
pub(crate) const DOT_BLOCK: usize = 4;

/// The 16 dot products of [`DOT_BLOCK`] weight rows `a` with [`DOT_BLOCK`] activation rows
/// `x` (`out[j][i] = a_j · x_i`), each formed exactly as [`dot_widen`] forms it (the same
/// lanes, added in the same order), so blocking never changes a result. With AVX-512 every
/// value loaded is used four times: a small GEMM limited by arithmetic, not by loads.
#[inline]
pub(crate) fn dots_4x4(a: [&[f32]; DOT_BLOCK], x: [&[f32]; DOT_BLOCK]) -> [[f32; DOT_BLOCK]; DOT_BLOCK] {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        let n = a[0].len();
        assert!(a.iter().chain(&x).all(|r| r.len() == n));
        let full = n - n % LANES;
        // SAFETY: AVX-512F was detected and every row holds `n >= full` values.
        let lanes = unsafe { avx512::dots_4x4_lanes(a, x, full) };
        return std::array::from_fn(|j| std::array::from_fn(|i| finish_dot(&lanes[j][i], &a[j][full..], &x[i][full..])));
    }
    std::array::from_fn(|j| std::array::from_fn(|i| dot_widen(a[j], x[i])))
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{DOT_BLOCK, LANES};

    /// The per-lane partial sums of [`super::dots_4x4`] over the first `full` values (a
    /// multiple of [`LANES`]): 16 accumulators held in registers, products rounded before
    /// they are added, as in [`super::dot_widen`].
    ///
    /// # Safety
    /// The CPU must support AVX-512F (`is_x86_feature_detected!("avx512f")`), and `full`
    /// must be a multiple of [`LANES`] no larger than the length of any row of `a` or `x`:
    /// every row is read over `[0, full)` without bounds checks.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dots_4x4_lanes(
        a: [&[f32]; DOT_BLOCK],
        x: [&[f32]; DOT_BLOCK],
        full: usize,
    ) -> [[[f32; LANES]; DOT_BLOCK]; DOT_BLOCK] {
        let mut acc = [[_mm512_setzero_ps(); DOT_BLOCK]; DOT_BLOCK];
        let mut k = 0;
        while k < full {
            let w = a.map(|row| _mm512_loadu_ps(row.as_ptr().add(k)));
            let xv = x.map(|row| _mm512_loadu_ps(row.as_ptr().add(k)));
            for j in 0..DOT_BLOCK {
                for i in 0..DOT_BLOCK {
                    acc[j][i] = _mm512_add_ps(acc[j][i], _mm512_mul_ps(w[j], xv[i]));
                }
            }
            k += LANES;
        }
        let mut lanes = [[[0f32; LANES]; DOT_BLOCK]; DOT_BLOCK];
        for j in 0..DOT_BLOCK {
            for i in 0..DOT_BLOCK {
                _mm512_storeu_ps(lanes[j][i].as_mut_ptr(), acc[j][i]);
            }
        }
        lanes
    }
}

/// `dst = widen(src)`, element by element.
#[inline]
pub(crate) fn widen_into<E: Widen>(dst: &mut [f32], src: &[E]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.widen();
    }
}

/// `y += alpha · b`, widening `b` as it is read.
#[inline]
pub(crate) fn axpy_widen<E: Widen>(y: &mut [f32], alpha: f32, b: &[E]) {
    let b = &b[..y.len()];
    for (yi, bi) in y.iter_mut().zip(b) {
        *yi += alpha * bi.widen();
    }
}

/// Output columns [`expand`] keeps in registers while it runs over all rank components.
const EXPAND_BLOCK: usize = 4 * LANES;

/// `y[c] += Σ_j t[j] · b[j·stride + c]` for every column `c` of `y` (`b`: the rows of `Bᵀ`,
/// row `j` starting at `j·stride`). Each block of columns is accumulated in registers over
/// all `j` and stored once; the sums are formed in the same order as `j` successive
/// [`axpy_widen`] calls, so both give the same result.
#[inline]
pub(crate) fn expand(y: &mut [f32], t: &[f32], b: &[f32], stride: usize) {
    let n = y.len();
    if let Some(last) = t.len().checked_sub(1) {
        assert!(b.len() >= last * stride + n);
    }
    for (blk, yb) in y.chunks_mut(EXPAND_BLOCK).enumerate() {
        let c = blk * EXPAND_BLOCK;
        if let Ok(yb) = <&mut [f32; EXPAND_BLOCK]>::try_from(&mut *yb) {
            let mut acc = *yb;
            for (j, &tj) in t.iter().enumerate() {
                let bj: &[f32; EXPAND_BLOCK] = b[j * stride + c..j * stride + c + EXPAND_BLOCK].try_into().unwrap();
                for i in 0..EXPAND_BLOCK {
                    acc[i] += tj * bj[i];
                }
            }
            *yb = acc;
        } else {
            for (j, &tj) in t.iter().enumerate() {
                axpy(yb, tj, &b[j * stride + c..j * stride + c + yb.len()]);
            }
        }
    }
}

/// [`expand`] for [`DOT_BLOCK`] rows at once, row `y[i]` with its own `t[i]`: each block of
/// `b` loaded is used by every row. Each row's sums are formed exactly as [`expand`] forms
/// them, so the result does not depend on which rows share a call.
#[inline]
pub(crate) fn expand_4(mut y: [&mut [f32]; DOT_BLOCK], t: [&[f32]; DOT_BLOCK], b: &[f32], stride: usize) {
    let (n, rank) = (y[0].len(), t[0].len());
    if let Some(last) = rank.checked_sub(1) {
        assert!(b.len() >= last * stride + n);
    }
    let full = n - n % EXPAND_BLOCK;
    for c in (0..full).step_by(EXPAND_BLOCK) {
        let mut acc: [[f32; EXPAND_BLOCK]; DOT_BLOCK] =
            std::array::from_fn(|i| y[i][c..c + EXPAND_BLOCK].try_into().unwrap());
        for j in 0..rank {
            let bj: &[f32; EXPAND_BLOCK] = b[j * stride + c..j * stride + c + EXPAND_BLOCK].try_into().unwrap();
            for (acc_i, t_i) in acc.iter_mut().zip(&t) {
                let tij = t_i[j];
                for l in 0..EXPAND_BLOCK {
                    acc_i[l] += tij * bj[l];
                }
            }
        }
        for (y_i, acc_i) in y.iter_mut().zip(&acc) {
            y_i[c..c + EXPAND_BLOCK].copy_from_slice(acc_i);
        }
    }
    if full < n {
        for (y_i, t_i) in y.iter_mut().zip(&t) {
            expand(&mut y_i[full..], t_i, &b[full..], stride);
        }
    }
}

/// In-place RMS norm of one vector with a weight.
#[inline]
pub(crate) fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    let mean_sq = dot(x, x) / x.len() as f32;
    let inv = 1.0 / (mean_sq + eps).sqrt();
    for (xi, wi) in x.iter_mut().zip(weight) {
        *xi = *xi * inv * wi;
    }
}

/// Index of the largest value (first one on ties), as greedy decoding needs.
pub(crate) fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
pub(crate) mod tests {
    use half::{bf16, f16};

    use super::*;

    #[test]
    fn widening_is_exact_for_every_16_bit_value() {
        let same = |ours: f32, reference: f32| {
            if reference.is_nan() {
                ours.is_nan()
            } else {
                ours.to_bits() == reference.to_bits()
            }
        };
        for bits in 0..=u16::MAX {
            let (h, b) = (f16::from_bits(bits), bf16::from_bits(bits));
            assert!(same(h.widen(), h.to_f32()), "f16 {bits:#06x}");
            assert!(same(b.widen(), b.to_f32()), "bf16 {bits:#06x}");
        }
    }

    /// Deterministic test values in [-0.5, 0.5) (an LCG), shared by the kernel tests.
    pub(crate) fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn blocked_dots_equal_single_dots_bit_for_bit() {
        for n in [1, 15, 16, 17, 100, 576] {
            let a: Vec<Vec<f32>> = (0..DOT_BLOCK as u32).map(|j| values(n, 10 + j)).collect();
            let x: Vec<Vec<f32>> = (0..DOT_BLOCK as u32).map(|i| values(n, 20 + i)).collect();
            let out = dots_4x4(std::array::from_fn(|j| &a[j][..]), std::array::from_fn(|i| &x[i][..]));
            for j in 0..DOT_BLOCK {
                for i in 0..DOT_BLOCK {
                    assert_eq!(out[j][i].to_bits(), dot_widen(&a[j], &x[i]).to_bits(), "n {n}, a{j}·x{i}");
                }
            }
        }
    }

    #[test]
    fn blocked_expand_equals_single_row_expand_bit_for_bit() {
        let rank = 5;
        for n in [1, 63, 64, 65, 200] {
            let stride = n + 3;
            let b = values(rank * stride, 7);
            let t: Vec<Vec<f32>> = (0..DOT_BLOCK as u32).map(|i| values(rank, 30 + i)).collect();
            let y0: Vec<Vec<f32>> = (0..DOT_BLOCK as u32).map(|i| values(n, 40 + i)).collect();
            let mut blocked = y0.clone();
            let mut rows = blocked.iter_mut();
            expand_4(std::array::from_fn(|_| &mut rows.next().unwrap()[..]), std::array::from_fn(|i| &t[i][..]), &b, stride);
            for i in 0..DOT_BLOCK {
                let mut single = y0[i].clone();
                expand(&mut single, &t[i], &b, stride);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&blocked[i]), bits(&single), "n {n}, row {i}");
            }
        }
    }

    #[test]
    fn stored_and_widened_rows_give_the_same_dot() {
        for n in [1, 15, 16, 17, 100, 576] {
            let (a, x) = (values(n, 1), values(n, 2));
            let a16: Vec<bf16> = a.iter().map(|&v| bf16::from_f32(v)).collect();
            let mut wide = vec![0f32; n];
            widen_into(&mut wide, &a16);
            assert_eq!(dot_widen(&a16, &x).to_bits(), dot(&wide, &x).to_bits(), "n={n}");
            let exact: f64 = wide.iter().zip(&x).map(|(&p, &q)| p as f64 * q as f64).sum();
            assert!((dot(&wide, &x) as f64 - exact).abs() < 1e-4, "n={n}");
        }
    }

    #[test]
    fn blocked_expand_adds_in_the_order_of_row_by_row_axpys() {
        for (cols, rank) in [(64, 1), (200, 3), (576, 16)] {
            let stride = cols + 7;
            let (b, t, y0) = (values(rank * stride, 3), values(rank, 4), values(cols, 5));
            let mut blocked = y0.clone();
            expand(&mut blocked, &t, &b, stride);
            let mut rows = y0;
            for (j, &tj) in t.iter().enumerate() {
                axpy_widen(&mut rows, tj, &b[j * stride..]);
            }
            assert_eq!(blocked, rows, "cols={cols} rank={rank}");
        }
    }
}
