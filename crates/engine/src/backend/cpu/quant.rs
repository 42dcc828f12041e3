//! Our quantized matmul for the hot path. candle's CPU path has no SIMD kernel for Q4_1
//! (the default model's type) or Q5_0 (most of Qwen2.5's Q4_K_M projections) and runs
//! batched rows as repeated dot products; here Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 weights are
//! repacked at load, losslessly, into tiles of 16 output columns so that one
//! AVX-512 VNNI `vpdpbusd` multiplies 4 k-values of 16 columns at once, and each weight
//! tile loaded into registers is reused for up to 4 activation rows (a small GEMM).
//! Activations are quantized per 32-value block to int8 (as llama.cpp's Q8_1), so
//! `Σ w·x = d_w·d_x·Σ u·q + m_w·d_x·Σ q` with `u` the unsigned weight codes.
//! A portable scalar path computes the same on CPUs without AVX-512 VNNI.

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;
use rayon::prelude::*;

use super::kernels::SendPtr;

/// Output columns per tile.
const TILE: usize = 16;
/// Values per quantization block.
const BLOCK: usize = 32;
/// Activation rows sharing one load of a weight tile.
const ROWS: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Codes {
    /// 4-bit codes, two per byte (low nibble k, high nibble k+16 within a block).
    Nibbles,
    /// 5-bit codes: [`Codes::Nibbles`] plus a plane of fifth bits, one 64-bit mask per
    /// 64-byte group and nibble half, added as 16 under the mask in registers.
    Nibbles5,
    /// 8-bit unsigned codes.
    Bytes,
}

impl Codes {
    /// Code bytes per (tile, block).
    fn group_bytes(self) -> usize {
        match self {
            Codes::Nibbles | Codes::Nibbles5 => 4 * 64,
            Codes::Bytes => 8 * 64,
        }
    }
}

/// A weight matrix `[n, k]` repacked into column tiles.
pub struct PackedMatrix {
    codes: Codes,
    n: usize,
    k: usize,
    /// Per (tile, block): Nibbles and Nibbles5: 4×64 bytes, Bytes: 8×64 bytes; byte `c*4+t`
    /// of 64-byte group `j` is column `c`'s code(s) for k-values `4j+t` (and `4j+t+16` for
    /// nibbles).
    qs: Vec<u8>,
    /// Nibbles5 only, per (tile, block): for each group `j`, the mask of k-values `4j+t`
    /// then that of `4j+t+16`; bit `c*4+t` is that code's fifth bit.
    fifth_bits: Vec<u64>,
    /// Per (tile, block): 16 scales `d` then 16 offsets `m`, as f16 bits.
    scales: Vec<u16>,
}

impl PackedMatrix {
    /// Repacks a Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0 tensor; `None` for other types or shapes
    /// that do not tile (the caller keeps candle's kernel then). One match arm per block
    /// format, each a few lines of bit layout: long, but each arm reads on its own.
    pub fn from_qtensor(q: &QTensor) -> Option<Self> {
        let (n, k) = q.shape().dims2().ok()?;
        if n % TILE != 0 || k % BLOCK != 0 {
            return None;
        }
        let (codes, block_bytes) = match q.dtype() {
            GgmlDType::Q4_0 => (Codes::Nibbles, 18),
            GgmlDType::Q4_1 => (Codes::Nibbles, 20),
            GgmlDType::Q5_0 => (Codes::Nibbles5, 22),
            GgmlDType::Q5_1 => (Codes::Nibbles5, 24),
            GgmlDType::Q8_0 => (Codes::Bytes, 34),
            _ => return None,
        };
        let data = q.data().ok()?;
        let kb = k / BLOCK;
        if data.len() != n * kb * block_bytes {
            return None;
        }
        let group_bytes = codes.group_bytes();
        let tiles = n / TILE;
        let mut qs = vec![0u8; tiles * kb * group_bytes];
        let mut fifth_bits = vec![0u64; if codes == Codes::Nibbles5 { tiles * kb * 8 } else { 0 }];
        let mut scales = vec![0u16; tiles * kb * 2 * TILE];
        let half_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]);
        for col in 0..n {
            let (tile, c) = (col / TILE, col % TILE);
            for b in 0..kb {
                let blk = &data[(col * kb + b) * block_bytes..(col * kb + b + 1) * block_bytes];
                let d = half_at(blk, 0);
                // Unsigned codes `u` with `value = d·u + m`, one per k-value of the block.
                let mut u = [0u8; BLOCK];
                let m = match q.dtype() {
                    GgmlDType::Q4_0 | GgmlDType::Q4_1 => {
                        let (m, nibbles) = match q.dtype() {
                            GgmlDType::Q4_1 => (half_at(blk, 2), &blk[4..20]),
                            _ => (f16::from_f32(-8.0 * d.to_f32()), &blk[2..18]),
                        };
                        for (i, &byte) in nibbles.iter().enumerate() {
                            u[i] = byte & 0x0F;
                            u[i + 16] = byte >> 4;
                        }
                        m
                    }
                    GgmlDType::Q5_0 | GgmlDType::Q5_1 => {
                        // ggml: 16 bytes of low nibbles, the fifth bits in one little-endian u32.
                        let (m, rest) = match q.dtype() {
                            GgmlDType::Q5_1 => (half_at(blk, 2), &blk[4..]),
                            _ => (f16::from_f32(-16.0 * d.to_f32()), &blk[2..]),
                        };
                        let high = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                        for (i, &byte) in rest[4..20].iter().enumerate() {
                            u[i] = (byte & 0x0F) | ((((high >> i) & 1) as u8) << 4);
                            u[i + 16] = (byte >> 4) | ((((high >> (i + 16)) & 1) as u8) << 4);
                        }
                        m
                    }
                    _ => {
                        for (i, &byte) in blk[2..34].iter().enumerate() {
                            u[i] = (byte as i8 as i16 + 128) as u8;
                        }
                        f16::from_f32(-128.0 * d.to_f32())
                    }
                };
                let sc = &mut scales[(tile * kb + b) * 2 * TILE..(tile * kb + b + 1) * 2 * TILE];
                sc[c] = d.to_bits();
                sc[TILE + c] = m.to_bits();
                let dst = &mut qs[(tile * kb + b) * group_bytes..(tile * kb + b + 1) * group_bytes];
                match codes {
                    Codes::Nibbles | Codes::Nibbles5 => {
                        for j in 0..4 {
                            for t in 0..4 {
                                let (lo, hi) = (u[4 * j + t], u[4 * j + t + 16]);
                                dst[j * 64 + c * 4 + t] = (lo & 0x0F) | ((hi & 0x0F) << 4);
                                if codes == Codes::Nibbles5 {
                                    let bit = 1u64 << (c * 4 + t);
                                    let at = (tile * kb + b) * 8 + 2 * j;
                                    fifth_bits[at] |= if lo & 0x10 != 0 { bit } else { 0 };
                                    fifth_bits[at + 1] |= if hi & 0x10 != 0 { bit } else { 0 };
                                }
                            }
                        }
                    }
                    Codes::Bytes => {
                        for j in 0..8 {
                            for t in 0..4 {
                                dst[j * 64 + c * 4 + t] = u[4 * j + t];
                            }
                        }
                    }
                }
            }
        }
        Some(Self { codes, n, k, qs, fifth_bits, scales })
    }

    /// Output features.
    pub fn out_dim(&self) -> usize {
        self.n
    }

    /// Bytes held.
    pub fn size_in_bytes(&self) -> usize {
        self.qs.len() + self.fifth_bits.len() * 8 + self.scales.len() * 2
    }

    /// `y[m, n] = x[m, k] · Wᵀ`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let acts = QuantizedActs::new(x, m, self.k);
        let mut out = vec![0f32; m * self.n];
        let out_ptr = SendPtr(out.as_mut_ptr());
        let tiles = self.n / TILE;
        let vnni = has_vnni();
        let run = |tile: usize| {
            let out = out_ptr;
            let mut row = 0;
            while row < m {
                let r = (m - row).min(ROWS);
                // SAFETY: `vnni` says the CPU has what `avx512::tile` needs; `tile < n / TILE`,
                // `acts` holds the `m` rows of `x` quantized for `k`, `row + r <= m`, and `out`
                // holds `m × n` values; each (row, tile) output block is written by exactly
                // one task, and `out` outlives the parallel loop.
                unsafe {
                    if vnni {
                        match r {
                            4 => avx512::tile::<4>(self, tile, &acts, row, out.0),
                            3 => avx512::tile::<3>(self, tile, &acts, row, out.0),
                            2 => avx512::tile::<2>(self, tile, &acts, row, out.0),
                            _ => avx512::tile::<1>(self, tile, &acts, row, out.0),
                        }
                    } else {
                        scalar_tile(self, tile, &acts, row, r, out.0);
                    }
                }
                row += r;
            }
        };
        // Enough tiles per task that scheduling stays cheap next to the arithmetic.
        let min_len = (tiles / (2 * rayon::current_num_threads())).max(1);
        (0..tiles).into_par_iter().with_min_len(min_len).for_each(run);
        out
    }
}


fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Activations quantized per block: codes, scale `d`, and `d·Σq` per block.
struct QuantizedActs {
    q: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
    k: usize,
}

impl QuantizedActs {
    fn new(x: &[f32], m: usize, k: usize) -> Self {
        let kb = k / BLOCK;
        let mut q = vec![0i8; m * k];
        let mut d = vec![0f32; m * kb];
        let mut s = vec![0f32; m * kb];
        for (bi, (xb, qb)) in x.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)).enumerate() {
            // The largest magnitude in 16 lanes, then across them: the same value as one
            // running max, but a chain LLVM can vectorise.
            let mut lanes = [0f32; 16];
            for pair in xb.chunks_exact(16) {
                for (l, v) in lanes.iter_mut().zip(pair) {
                    *l = l.max(v.abs());
                }
            }
            let amax = lanes.iter().fold(0f32, |a, &v| a.max(v));
            let scale = amax / 127.0;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let mut sum = 0i32;
            for (qi, &xi) in qb.iter_mut().zip(xb) {
                let v = (xi * inv).round() as i32;
                *qi = v as i8;
                sum += v;
            }
            d[bi] = scale;
            s[bi] = scale * sum as f32;
        }
        Self { q, d, s, k }
    }
}

/// The same arithmetic as the SIMD path, for CPUs without AVX-512 VNNI: rows
/// `row0..row0 + rows` of column tile `tile` of the row-major `[m, pm.n]` output at `out`.
///
/// # Safety
/// `out` must be valid for writes of the [`TILE`] values at `out[r·pm.n + tile·TILE ..]` for
/// every `r` in `row0..row0 + rows` (so `tile < pm.n / TILE`, and the output has at least
/// `row0 + rows` rows), and nothing else may read or write those values during the call.
/// The reads of `pm` and `acts` are bounds-checked: a wrong shape there panics.
unsafe fn scalar_tile(pm: &PackedMatrix, tile: usize, acts: &QuantizedActs, row0: usize, rows: usize, out: *mut f32) {
    let kb = pm.k / BLOCK;
    let group = pm.codes.group_bytes();
    for r in row0..row0 + rows {
        let mut acc = [0f32; TILE];
        for b in 0..kb {
            let sc = &pm.scales[(tile * kb + b) * 2 * TILE..(tile * kb + b + 1) * 2 * TILE];
            let qs = &pm.qs[(tile * kb + b) * group..(tile * kb + b + 1) * group];
            let xq = &acts.q[r * acts.k + b * BLOCK..r * acts.k + (b + 1) * BLOCK];
            for (c, a) in acc.iter_mut().enumerate() {
                let mut dot = 0i32;
                match pm.codes {
                    Codes::Nibbles | Codes::Nibbles5 => {
                        for j in 0..4 {
                            for t in 0..4 {
                                let byte = qs[j * 64 + c * 4 + t];
                                let (mut lo, mut hi) = ((byte & 0x0F) as i32, (byte >> 4) as i32);
                                if pm.codes == Codes::Nibbles5 {
                                    let masks = &pm.fifth_bits[(tile * kb + b) * 8 + 2 * j..];
                                    lo |= (((masks[0] >> (c * 4 + t)) & 1) as i32) << 4;
                                    hi |= (((masks[1] >> (c * 4 + t)) & 1) as i32) << 4;
                                }
                                dot += lo * xq[4 * j + t] as i32;
                                dot += hi * xq[16 + 4 * j + t] as i32;
                            }
                        }
                    }
                    Codes::Bytes => {
                        for j in 0..8 {
                            for t in 0..4 {
                                dot += qs[j * 64 + c * 4 + t] as i32 * xq[4 * j + t] as i32;
                            }
                        }
                    }
                }
                let dw = f16::from_bits(sc[c]).to_f32();
                let mw = f16::from_bits(sc[TILE + c]).to_f32();
                *a += dot as f32 * dw * acts.d[r * kb + b] + mw * acts.s[r * kb + b];
            }
        }
        let dst = std::slice::from_raw_parts_mut(out.add(r * pm.n + tile * TILE), TILE);
        dst.copy_from_slice(&acc);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    /// `R` rows of one 16-column tile: [`scalar_tile`] for rows `row0..row0 + R`.
    ///
    /// # Safety
    /// - The CPU must support AVX-512F, AVX-512BW and AVX-512 VNNI ([`has_vnni`]).
    /// - `tile < pm.n / TILE`, and `acts` must have been quantized for `pm.k` values per row
    ///   and hold at least `row0 + R` rows: codes, scales and activations are read without
    ///   bounds checks.
    /// - `out` must be valid for writes of the [`TILE`] values at `out[r·pm.n + tile·TILE ..]`
    ///   for every `r` in `row0..row0 + R`, and nothing else may read or write those values
    ///   during the call.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile<const R: usize>(pm: &PackedMatrix, tile: usize, acts: &QuantizedActs, row0: usize, out: *mut f32) {
        let kb = pm.k / BLOCK;
        let low = _mm512_set1_epi8(0x0F);
        let mut accf = [_mm512_setzero_ps(); R];
        let group = pm.codes.group_bytes();
        let sixteen = _mm512_set1_epi8(16);
        let qs_base = pm.qs.as_ptr().add(tile * kb * group);
        let sc_base = pm.scales.as_ptr().add(tile * kb * 2 * TILE);
        let x_base = acts.q.as_ptr();
        for b in 0..kb {
            let sc = sc_base.add(b * 2 * TILE);
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(sc as *const __m256i));
            let mw = _mm512_cvtph_ps(_mm256_loadu_si256(sc.add(TILE) as *const __m256i));
            let qs = qs_base.add(b * group);
            let mut acci = [_mm512_setzero_si512(); R];
            let xb = |r: usize, off: usize| -> __m512i {
                let p = x_base.add((row0 + r) * acts.k + b * BLOCK + off) as *const i32;
                _mm512_set1_epi32(p.read_unaligned())
            };
            match pm.codes {
                Codes::Nibbles | Codes::Nibbles5 => {
                    for j in 0..4 {
                        let w = _mm512_loadu_si512(qs.add(j * 64) as *const __m512i);
                        let mut lo = _mm512_and_si512(w, low);
                        let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(w), low);
                        if pm.codes == Codes::Nibbles5 {
                            // Only Nibbles5 matrices hold masks: index them only then.
                            let masks = &pm.fifth_bits[(tile * kb + b) * 8 + 2 * j..][..2];
                            lo = _mm512_mask_add_epi8(lo, masks[0], lo, sixteen);
                            hi = _mm512_mask_add_epi8(hi, masks[1], hi, sixteen);
                        }
                        for (r, acc) in acci.iter_mut().enumerate() {
                            *acc = _mm512_dpbusd_epi32(*acc, lo, xb(r, 4 * j));
                            *acc = _mm512_dpbusd_epi32(*acc, hi, xb(r, 16 + 4 * j));
                        }
                    }
                }
                Codes::Bytes => {
                    for j in 0..8 {
                        let w = _mm512_loadu_si512(qs.add(j * 64) as *const __m512i);
                        for (r, acc) in acci.iter_mut().enumerate() {
                            *acc = _mm512_dpbusd_epi32(*acc, w, xb(r, 4 * j));
                        }
                    }
                }
            }
            for r in 0..R {
                let dx = *acts.d.get_unchecked((row0 + r) * kb + b);
                let sx = *acts.s.get_unchecked((row0 + r) * kb + b);
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(dx));
                accf[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acci[r]), scale, accf[r]);
                accf[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(sx), accf[r]);
            }
        }
        for (r, acc) in accf.iter().enumerate() {
            _mm512_storeu_ps(out.add((row0 + r) * pm.n + tile * TILE), *acc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Packed matmul equals the dequantized weights times the int8-rounded activations.
    fn check(dtype: GgmlDType) {
        let (n, k, m) = (48, 96, 7);
        let dev = Device::Cpu;
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 0.3).collect();
        let x: Vec<f32> = (0..m * k).map(|i| (i * 53 % 89) as f32 / 44.0 - 1.0).collect();
        let q = QTensor::quantize(&Tensor::from_vec(w, (n, k), &dev).unwrap(), dtype).unwrap();
        let wd = q.dequantize(&dev).unwrap().to_vec2::<f32>().unwrap();
        let pm = PackedMatrix::from_qtensor(&q).unwrap();
        let y = pm.matmul(&x, m);
        for r in 0..m {
            for c in 0..n {
                let exact: f32 = (0..k).map(|i| wd[c][i] * x[r * k + i]).sum();
                let err = (y[r * n + c] - exact).abs();
                // int8 activations: relative error ~1/254 of the row's magnitude.
                assert!(err < 0.02, "{dtype:?} row {r} col {c}: {} vs {exact}", y[r * n + c]);
            }
        }
        // The scalar path computes the same values as the SIMD path.
        let acts = QuantizedActs::new(&x, m, k);
        let mut scalar = vec![0f32; m * n];
        for t in 0..n / TILE {
            // SAFETY: `scalar` holds the m × n output, `t < n / TILE`, and nothing else uses it.
            unsafe { scalar_tile(&pm, t, &acts, 0, m, scalar.as_mut_ptr()) };
        }
        for (a, b) in scalar.iter().zip(&y) {
            assert!((a - b).abs() < 1e-4, "scalar {a} vs simd {b}");
        }
    }

    #[test]
    fn q4_1_matches_dequantized() {
        check(GgmlDType::Q4_1);
    }

    #[test]
    fn q4_0_matches_dequantized() {
        check(GgmlDType::Q4_0);
    }

    #[test]
    fn q8_0_matches_dequantized() {
        check(GgmlDType::Q8_0);
    }

    #[test]
    fn q5_0_matches_dequantized() {
        check(GgmlDType::Q5_0);
    }

    #[test]
    fn q5_1_matches_dequantized() {
        check(GgmlDType::Q5_1);
    }
}
