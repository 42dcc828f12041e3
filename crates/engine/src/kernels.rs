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

/// Dot product of two equally long slices.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    sum
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
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
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
        const REBIAS: f32 = 5.192_297e33; // 2^(127 - 15)
        let h = self.to_bits() as u32;
        let magnitude = f32::from_bits((h & 0x7fff) << 13) * REBIAS;
        let special = if h & 0x7c00 == 0x7c00 { 0x7f80_0000 } else { 0 };
        f32::from_bits(((h & 0x8000) << 16) | magnitude.to_bits() | special)
    }
}

/// Dot products of four equally long weight rows with one activation row:
/// `[a[0]·x, a[1]·x, a[2]·x, a[3]·x]`, each summed in the same order as [`dot`]. Four rows
/// at once give four independent accumulator chains and load `x` once for all of them.
#[inline]
pub(crate) fn dot4<E: Widen>(a: [&[E]; 4], x: &[f32]) -> [f32; 4] {
    let n = x.len();
    let [a0, a1, a2, a3] = a.map(|r| &r[..n]);
    let (mut s0, mut s1, mut s2, mut s3) = ([0f32; LANES], [0f32; LANES], [0f32; LANES], [0f32; LANES]);
    let full = n - n % LANES;
    for k in (0..full).step_by(LANES) {
        let xs: &[f32; LANES] = x[k..k + LANES].try_into().unwrap();
        let w0: &[E; LANES] = a0[k..k + LANES].try_into().unwrap();
        let w1: &[E; LANES] = a1[k..k + LANES].try_into().unwrap();
        let w2: &[E; LANES] = a2[k..k + LANES].try_into().unwrap();
        let w3: &[E; LANES] = a3[k..k + LANES].try_into().unwrap();
        for i in 0..LANES {
            s0[i] += w0[i].widen() * xs[i];
            s1[i] += w1[i].widen() * xs[i];
            s2[i] += w2[i].widen() * xs[i];
            s3[i] += w3[i].widen() * xs[i];
        }
    }
    let finish = |s: [f32; LANES], row: &[E]| {
        let mut sum: f32 = s.iter().sum();
        for (w, xv) in row[full..].iter().zip(&x[full..]) {
            sum += w.widen() * xv;
        }
        sum
    };
    [finish(s0, a0), finish(s1, a1), finish(s2, a2), finish(s3, a3)]
}

/// [`dot`] of one weight row (any [`Widen`] type) with an activation row.
#[inline]
pub(crate) fn dot_widen<E: Widen>(a: &[E], x: &[f32]) -> f32 {
    assert_eq!(a.len(), x.len());
    let mut acc = [0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let cx = x.chunks_exact(LANES);
    let (ra, rx) = (ca.remainder(), cx.remainder());
    for (w, xs) in ca.zip(cx) {
        for i in 0..LANES {
            acc[i] += w[i].widen() * xs[i];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (w, xv) in ra.iter().zip(rx) {
        sum += w.widen() * xv;
    }
    sum
}

/// `y += alpha · b`, widening `b` as it is read.
#[inline]
pub(crate) fn axpy_widen<E: Widen>(y: &mut [f32], alpha: f32, b: &[E]) {
    let b = &b[..y.len()];
    for (yi, bi) in y.iter_mut().zip(b) {
        *yi += alpha * bi.widen();
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
