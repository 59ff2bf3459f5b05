//! Vectorized f32 helpers for the encoder: GELU (erf), row softmax, LayerNorm.
//!
//! Each algorithm is written once over [`V`](crate::simd::V) and instantiated
//! for AVX-512 (`Path::Avx512Vnni` and `Path::Amx`), AVX2 (`Path::Avx2`), NEON (both Arm paths) and
//! scalar (`Path::Scalar`). Elementwise functions (`gelu`, `exp`) give bit-identical
//! results on every path; softmax and LayerNorm sum in a different order per
//! vector width, so they agree to a few ulps.

use crate::Path;
use crate::simd::V;

// Cephes expf: Cody-Waite reduction by ln2 (hi + lo), degree-5 polynomial.
const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4; // 0.693359375, exact in a few bits
const LN2_LO: f32 = -2.121_944_4e-4;
const EXP_LO: f32 = -87.336_55; // below: result flushed to 0
const EXP_HI: f32 = 88.376_26;
const EXP_C: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5, // Cephes 5.0000001201e-1 rounds to exactly 0.5 in f32
];

/// `e^x`, about 1 ulp on [-87.3, 88.3]; 0 below, saturates above.
#[inline(always)]
pub(crate) fn exp_v<T: V>(x: T) -> T {
    let xc = x.max(T::splat(EXP_LO)).min(T::splat(EXP_HI));
    let n = xc.mul(T::splat(LOG2E)).round_even();
    let r = xc.sub(n.mul(T::splat(LN2_HI))).sub(n.mul(T::splat(LN2_LO)));
    let r2 = r.mul(r);
    let mut p = T::splat(EXP_C[0]);
    for &c in &EXP_C[1..] {
        p = p.mul(r).add(T::splat(c));
    }
    let y = p.mul(r2).add(r).add(T::splat(1.0));
    let y = y.mul(n.pow2i());
    x.select_lt(T::splat(EXP_LO), T::splat(0.0), y)
}

// erf(z) = z * P(z^2) / Q(z^2) on z clamped to [-4, 4] (erf(4) = 1 - 1.5e-8,
// i.e. 1.0 in f32): the rational minimax form used by Eigen / XLA for f32.
// One division, no exp: about half the work of A&S 7.1.26 + expf.
const ERF_P: [f32; 7] = [
    -2.726_142_3e-10,
    2.770_681_4e-8,
    -2.101_024e-6,
    -5.692_506_4e-5,
    -7.349_906_3e-4,
    -2.954_6e-3,
    -1.609_603_3e-2,
];
const ERF_Q: [f32; 5] = [
    -1.456_607_2e-5,
    -2.133_740_5e-4,
    -1.682_827e-3,
    -7.373_329_3e-3,
    -1.426_473_9e-2,
];

/// GELU(x) = x/2 * (1 + erf(x/sqrt 2)), erf by the rational approximation
/// above. Absolute error <= ~3e-7 * max(1, |x|) (measured in tests); exactly
/// 0 for x below -4 sqrt 2 (true value < 2e-8 * |x|).
#[inline(always)]
pub(crate) fn gelu_v<T: V>(x: T) -> T {
    let zu = x.mul(T::splat(std::f32::consts::FRAC_1_SQRT_2));
    let z = zu.max(T::splat(-4.0)).min(T::splat(4.0));
    let z2 = z.mul(z);
    let mut p = T::splat(ERF_P[0]);
    for &c in &ERF_P[1..] {
        p = p.mul(z2).add(T::splat(c));
    }
    let mut q = T::splat(ERF_Q[0]);
    for &c in &ERF_Q[1..] {
        q = q.mul(z2).add(T::splat(c));
    }
    let erf = z.mul(p).div(q);
    let h = zu.select_lt(T::splat(-4.0), T::splat(0.0), T::splat(1.0).add(erf));
    T::splat(0.5).mul(x).mul(h)
}

/// Scalar GELU (erf), bit-identical to the vectorized versions.
pub fn gelu_scalar(x: f32) -> f32 {
    gelu_v::<f32>(x)
}

/// Scalar `e^x` used by softmax, bit-identical to the vectorized versions.
pub fn exp_scalar(x: f32) -> f32 {
    exp_v::<f32>(x)
}

// No closures here: a closure or fn item passed through `impl Fn` may be
// left as an out-of-line `Fn::call` shim compiled *without* the caller's
// target features, turning every intrinsic into a function call (10x slower).

#[inline(always)]
unsafe fn gelu_slice<T: V>(x: &mut [f32]) {
    let n = x.len();
    let p = x.as_mut_ptr();
    let mut i = 0;
    unsafe {
        while i + T::W <= n {
            gelu_v(T::load(p.add(i))).store(p.add(i));
            i += T::W;
        }
        if i < n {
            gelu_v(T::load_part(p.add(i), n - i, 0.0)).store_part(p.add(i), n - i);
        }
    }
}

#[inline(always)]
unsafe fn scale_slice<T: V>(x: &mut [f32], s: f32) {
    let (n, p, sv) = (x.len(), x.as_mut_ptr(), T::splat(s));
    let mut i = 0;
    unsafe {
        while i + T::W <= n {
            T::load(p.add(i)).mul(sv).store(p.add(i));
            i += T::W;
        }
        if i < n {
            T::load_part(p.add(i), n - i, 0.0)
                .mul(sv)
                .store_part(p.add(i), n - i);
        }
    }
}

#[inline(always)]
unsafe fn softmax_slice<T: V>(x: &mut [f32], row_len: usize) {
    for row in x.chunks_exact_mut(row_len) {
        unsafe {
            let inv_sum = exp_row::<T>(row);
            scale_slice::<T>(row, inv_sum);
        }
    }
}

/// Replaces `row` by `exp(row - max(row))` and returns `1 / sum` of those: the softmax but
/// for its last scaling, which the caller fuses into its next pass. A row that is entirely
/// `-inf` becomes zeros, with 0 returned.
#[inline(always)]
pub(crate) unsafe fn exp_row<T: V>(row: &mut [f32]) -> f32 {
    let n = row.len();
    let p = row.as_mut_ptr();
    unsafe {
        let mut m = T::splat(f32::NEG_INFINITY);
        let mut i = 0;
        while i + T::W <= n {
            m = m.max(T::load(p.add(i)));
            i += T::W;
        }
        if i < n {
            m = m.max(T::load_part(p.add(i), n - i, f32::NEG_INFINITY));
        }
        let mx = m.hmax();
        if mx == f32::NEG_INFINITY {
            row.fill(0.0);
            return 0.0;
        }
        let mv = T::splat(mx);
        let mut s = T::splat(0.0);
        i = 0;
        while i + T::W <= n {
            let e = exp_v(T::load(p.add(i)).sub(mv));
            e.store(p.add(i));
            s = s.add(e);
            i += T::W;
        }
        if i < n {
            let e = exp_v(T::load_part(p.add(i), n - i, f32::NEG_INFINITY).sub(mv));
            e.store_part(p.add(i), n - i);
            s = s.add(e);
        }
        1.0 / s.hsum()
    }
}

#[inline(always)]
unsafe fn layer_norm_slice<T: V>(x: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let h = gamma.len();
    let (g, b) = (gamma.as_ptr(), beta.as_ptr());
    for row in x.chunks_exact_mut(h) {
        let p = row.as_mut_ptr();
        unsafe {
            let mut s = T::splat(0.0);
            let mut i = 0;
            while i + T::W <= h {
                s = s.add(T::load(p.add(i)));
                i += T::W;
            }
            if i < h {
                s = s.add(T::load_part(p.add(i), h - i, 0.0));
            }
            let mean = s.hsum() / h as f32;
            let mv = T::splat(mean);
            let mut s2 = T::splat(0.0);
            i = 0;
            while i + T::W <= h {
                let d = T::load(p.add(i)).sub(mv);
                s2 = s2.add(d.mul(d));
                i += T::W;
            }
            if i < h {
                let d = T::load_part(p.add(i), h - i, mean).sub(mv);
                s2 = s2.add(d.mul(d));
            }
            let rstd = T::splat(1.0 / (s2.hsum() / h as f32 + eps).sqrt());
            i = 0;
            while i + T::W <= h {
                let y = T::load(p.add(i)).sub(mv).mul(rstd);
                y.mul(T::load(g.add(i)))
                    .add(T::load(b.add(i)))
                    .store(p.add(i));
                i += T::W;
            }
            if i < h {
                let r = h - i;
                let y = T::load_part(p.add(i), r, 0.0).sub(mv).mul(rstd);
                y.mul(T::load_part(g.add(i), r, 0.0))
                    .add(T::load_part(b.add(i), r, 0.0))
                    .store_part(p.add(i), r);
            }
        }
    }
}

/// `out[r][i] = x[r] . w[i]` (F32, `w` row-major `[n, k]`), every product in one fixed order on
/// every path: 16 lane sums (element `j` into lane `j % 16`, multiply then add), those summed
/// in lane order, then the tail of `k % 16` in order. So a row's result depends neither on the
/// other rows nor on the path. (The int8 outlier rows it serves feed residual channels whose
/// rounding swings MPNet's int8 embedding of a 4-token input by 0.02 of cosine: one order
/// everywhere keeps them reproducible.) Tiles of 4 rows share each load of `w`.
#[inline(always)]
unsafe fn matmul_nt_slice<T: V>(x: &[f32], k: usize, w: &[f32], out: &mut [f32]) {
    const TILE: usize = 4;
    let rows = x.len() / k;
    let n = w.len() / k;
    for (i, w) in w.chunks_exact(k).enumerate() {
        let mut r = 0;
        while r < rows {
            let t = (rows - r).min(TILE);
            let (x, out) = (&x[r * k..], &mut out[r * n + i..]);
            unsafe {
                match t {
                    4 => dot_tile::<T, 4>(x, k, w, out, n),
                    3 => dot_tile::<T, 3>(x, k, w, out, n),
                    2 => dot_tile::<T, 2>(x, k, w, out, n),
                    _ => dot_tile::<T, 1>(x, k, w, out, n),
                }
            }
            r += t;
        }
    }
}

/// Lane sums of [`matmul_nt_slice`]'s products.
const DOT_LANES: usize = 16;

/// `out[t * n] = x[t] . w` for `R` rows of `x` (`k` apart).
#[inline(always)]
unsafe fn dot_tile<T: V, const R: usize>(
    x: &[f32],
    k: usize,
    w: &[f32],
    out: &mut [f32],
    n: usize,
) {
    let vectors = DOT_LANES / T::W;
    let body = k / DOT_LANES * DOT_LANES;
    let (px, pw) = (x.as_ptr(), w.as_ptr());
    let mut acc = [[T::splat(0.0); DOT_LANES]; R];
    unsafe {
        for i in (0..body).step_by(DOT_LANES) {
            for c in 0..vectors {
                let wv = T::load(pw.add(i + c * T::W));
                for (t, acc) in acc.iter_mut().enumerate() {
                    acc[c] = acc[c].add(T::load(px.add(t * k + i + c * T::W)).mul(wv));
                }
            }
        }
    }
    for (t, acc) in acc.iter().enumerate() {
        let mut lanes = [0f32; DOT_LANES];
        for (c, v) in acc.iter().take(vectors).enumerate() {
            unsafe { v.store(lanes.as_mut_ptr().add(c * T::W)) };
        }
        let row = &x[t * k..(t + 1) * k];
        let tail: f32 = row[body..].iter().zip(&w[body..]).map(|(a, b)| a * b).sum();
        out[t * n] = lanes.iter().sum::<f32>() + tail;
    }
}

macro_rules! dispatch_f32 {
    ($path:expr, $generic:ident, $avx512:ident, $avx2:ident, ($($arg:expr),*)) => {{
        let path: Path = $path;
        path.assert_supported();
        match path {
            #[cfg(target_arch = "x86_64")]
            Path::Avx512Vnni | Path::Amx => unsafe { $avx512($($arg),*) },
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => unsafe { $avx2($($arg),*) },
            #[cfg(target_arch = "aarch64")]
            Path::NeonI8mm | Path::NeonDot => unsafe {
                $generic::<crate::simd::F128>($($arg),*)
            },
            _ => unsafe { $generic::<f32>($($arg),*) },
        }
    }};
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use crate::simd::{F256, F512};

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gelu_512(x: &mut [f32]) {
        unsafe { gelu_slice::<F512>(x) }
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gelu_256(x: &mut [f32]) {
        unsafe { gelu_slice::<F256>(x) }
    }
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn softmax_512(x: &mut [f32], n: usize) {
        unsafe { softmax_slice::<F512>(x, n) }
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn softmax_256(x: &mut [f32], n: usize) {
        unsafe { softmax_slice::<F256>(x, n) }
    }
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn matmul_nt_512(x: &[f32], k: usize, w: &[f32], out: &mut [f32]) {
        unsafe { matmul_nt_slice::<F512>(x, k, w, out) }
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn matmul_nt_256(x: &[f32], k: usize, w: &[f32], out: &mut [f32]) {
        unsafe { matmul_nt_slice::<F256>(x, k, w, out) }
    }
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn ln_512(x: &mut [f32], g: &[f32], b: &[f32], eps: f32) {
        unsafe { layer_norm_slice::<F512>(x, g, b, eps) }
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn ln_256(x: &mut [f32], g: &[f32], b: &[f32], eps: f32) {
        unsafe { layer_norm_slice::<F256>(x, g, b, eps) }
    }
}
#[cfg(target_arch = "x86_64")]
use x86::*;

/// In-place GELU (erf form, as BERT uses) on the active path.
pub fn gelu_inplace(x: &mut [f32]) {
    gelu_inplace_with(Path::active(), x)
}

/// In-place GELU on a given path (panics if the CPU lacks it).
pub fn gelu_inplace_with(path: Path, x: &mut [f32]) {
    dispatch_f32!(path, gelu_slice, gelu_512, gelu_256, (x))
}

/// Softmax over each row of `row_len` contiguous values, in place.
/// A row that is entirely `-inf` becomes all zeros.
pub fn softmax_rows_inplace(x: &mut [f32], row_len: usize) {
    softmax_rows_inplace_with(Path::active(), x, row_len)
}

/// [`softmax_rows_inplace`] on a given path.
pub fn softmax_rows_inplace_with(path: Path, x: &mut [f32], row_len: usize) {
    assert!(
        row_len > 0 && x.len().is_multiple_of(row_len),
        "softmax: len not a multiple of row_len"
    );
    dispatch_f32!(path, softmax_slice, softmax_512, softmax_256, (x, row_len))
}

/// `out[r][i] = x[r] . w[i]` in F32 on a given path (panics if the CPU lacks it): `x` is
/// `[rows, k]`, `w` `[n, k]`, `out` `[rows, n]`, all row-major. One summation order on every
/// path (see `matmul_nt_slice`): the same bits whatever the path and whatever rows come with
/// a row (batch-invariant).
pub fn matmul_nt_with(path: Path, x: &[f32], k: usize, w: &[f32], out: &mut [f32]) {
    assert!(
        k > 0 && x.len().is_multiple_of(k) && w.len().is_multiple_of(k),
        "matmul_nt: x and w must be whole rows of k"
    );
    assert_eq!(
        out.len(),
        x.len() / k * (w.len() / k),
        "matmul_nt: out must be rows x n"
    );
    dispatch_f32!(
        path,
        matmul_nt_slice,
        matmul_nt_512,
        matmul_nt_256,
        (x, k, w, out)
    )
}

/// LayerNorm over each row of `gamma.len()` values, in place:
/// `y = (x - mean) / sqrt(var + eps) * gamma + beta` (biased variance, two-pass).
pub fn layer_norm_rows(x: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    layer_norm_rows_with(Path::active(), x, gamma, beta, eps)
}

/// [`layer_norm_rows`] on a given path.
pub fn layer_norm_rows_with(path: Path, x: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let h = gamma.len();
    assert!(
        h > 0 && beta.len() == h,
        "layer_norm: gamma/beta length mismatch"
    );
    assert!(
        x.len().is_multiple_of(h),
        "layer_norm: len not a multiple of hidden size"
    );
    dispatch_f32!(
        path,
        layer_norm_slice,
        ln_512,
        ln_256,
        (x, gamma, beta, eps)
    )
}
