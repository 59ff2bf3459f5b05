//! `linear`: dynamic per-row int8 quantization of activations, int8 x int8 ->
//! i32 GEMM against pre-packed weights, fused dequantize + bias (+ GELU).
//!
//! Integer scheme. Activations are quantized symmetrically per row to
//! `xq` in [-127, 127]; weights per output channel to `wq` in [-127, 127].
//! The exact product `acc[r][n] = sum_k xq[r][k] * wq[n][k]` is computed by:
//! - AVX-512 VNNI: `vpdpbusd` needs an unsigned first operand, so rows are
//!   stored as `xq + 128` in [1, 255] and the kernel subtracts
//!   `128 * sum_k wq[n][k]` (precomputed at pack time). `vpdpbusd` sums the
//!   four u8*s8 products into i32 without intermediate saturation.
//! - AVX2: `vpmaddubsw(|xq|, sign(wq, xq))`: both operands' magnitudes are
//!   <= 127, so each i16 pair sum is <= 2*127*127 = 32258 < 32767 and the
//!   saturating instruction never saturates; `vpmaddwd` by 1 widens to i32.
//!   (The +128 offset would not be safe here: 255*127*2 > 32767.)
//! - Scalar: plain i32 arithmetic.
//! - Intel AMX (`amx` module): `tdpbssd` multiplies signed bytes, so rows are stored as `xq`
//!   (as for AVX2): one 16-row x 64-byte tile of rows times one tile of 16 consecutive
//!   k-groups of a panel, which is already the B-tile layout `tdpbssd` reads.
//!
//! Asymmetric rows (for inputs far from symmetric, like GELU outputs) use all 256 levels:
//! `u = round(x / s) + zp` in [0, 255], stored as `u - 128` in the same byte encodings.
//! Every row carries the integer `zero[r]` its bytes are offset by in the path's reading of
//! them (VNNI: 128 symmetric, `zp` asymmetric; AVX2 and scalar: 0, `zp - 128`), and every
//! path computes `acc - zero[r] * sum_k wq[n][k]`. (The AVX2 bytes of an asymmetric row
//! reach -128: `|-128| * 127 * 2` = 32512 still fits `vpmaddubsw`.)
//!
//! - Arm dotprod: `sdot` multiplies signed bytes, so rows are stored as `xq` (as for AVX2)
//!   and one 16-byte load of the panel is 4 channels x 4 k.
//! - Arm i8mm: `smmla` multiplies a 2 x 8 block of rows by an 8 x 2 block of channels. Two
//!   consecutive k-groups of the panel, interleaved by 32-bit lanes (`zip1`/`zip2`), are
//!   exactly its channel operand, so the same packed weights serve every path.
//!
//! All are exact, hence bit-identical. The f32 epilogue is
//! `y = (acc as f32) * (sx[r] * sw[n]) + bias[n]` then optional GELU, with the
//! same IEEE operations in the same order on every path, so `linear` outputs
//! are bit-identical across paths too.

use crate::Path;
use crate::pool::ThreadPool;
use crate::simd::V;
use crate::weight::{KGROUP, PANEL, WeightView, k4_of, quantize_row_i8};
use std::cell::RefCell;

// A child of this module: it drives the tile plumbing below (`Acts`, `Out`, `epilogue`).
#[cfg(target_arch = "x86_64")]
#[path = "amx.rs"]
pub(crate) mod amx;

/// Epilogue activation fused into [`linear_act`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Activation {
    /// Identity.
    #[default]
    None,
    /// GELU, erf form (BERT's `gelu`).
    Gelu,
}

/// Where and how to run: kernel path and thread pool.
#[derive(Clone, Copy, Debug)]
pub struct Exec<'a> {
    /// Kernel implementation to use.
    pub path: Path,
    /// Pool to split the work over (its thread count is the parallelism).
    pub pool: &'a ThreadPool,
}

impl Exec<'static> {
    /// `Path::active()` (honours `QMODEL_KERNEL`) on `ThreadPool::global()`.
    pub fn global() -> Self {
        Exec {
            path: Path::active(),
            pool: ThreadPool::global(),
        }
    }
}

/// Below this many multiply-adds a call runs on the calling thread only:
/// ~2M MACs is ~2-4 us of work at 0.5-1 TOP/s, about what waking a parked
/// worker costs. (At 512K, M=1 calls spent 2x the CPU time for nothing.)
pub const PAR_MIN_MACS: usize = 1 << 21;
/// Rows per task when splitting over rows.
const ROW_BLOCK: usize = 64;

/// `out[rows, n] = x[rows, k] @ W^T + bias` with int8 weights.
///
/// `x` is row-major `[rows, in_features]`, `out` `[rows, out_features]`.
/// Each row's result depends only on that row (per-row quantization, exact
/// integer accumulation), so results are batch- and thread-count-invariant.
pub fn linear<'w>(
    x: &[f32],
    rows: usize,
    w: impl Into<WeightView<'w>>,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    linear_with(&Exec::global(), x, rows, w, bias, Activation::None, out)
}

/// [`linear`] with a fused activation.
pub fn linear_act<'w>(
    x: &[f32],
    rows: usize,
    w: impl Into<WeightView<'w>>,
    bias: Option<&[f32]>,
    act: Activation,
    out: &mut [f32],
) {
    linear_with(&Exec::global(), x, rows, w, bias, act, out)
}

#[derive(Clone, Copy)]
pub(crate) struct SyncPtr<T>(*mut T);
unsafe impl<T> Sync for SyncPtr<T> {}
unsafe impl<T> Send for SyncPtr<T> {}
impl<T> SyncPtr<T> {
    #[inline(always)]
    fn get(self) -> *mut T {
        self.0
    }
}

/// Output description handed to the tile kernels.
#[derive(Clone, Copy)]
pub(crate) enum Out {
    F32 {
        ptr: SyncPtr<f32>,
        /// Per-row activation scales.
        sx: *const f32,
        /// Null if no bias.
        bias: *const f32,
        act: Activation,
    },
    I32 {
        ptr: SyncPtr<i32>,
    },
}
unsafe impl Sync for Out {}
unsafe impl Send for Out {}

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// [`linear`] with explicit path, pool and activation.
pub fn linear_with<'w>(
    exec: &Exec<'_>,
    x: &[f32],
    rows: usize,
    w: impl Into<WeightView<'w>>,
    bias: Option<&[f32]>,
    act: Activation,
    out: &mut [f32],
) {
    linear_quant_with(exec, x, InputQuant::default(), rows, w, bias, act, out)
}

/// How [`linear_quant_with`] quantizes each row of its input.
#[derive(Clone, Copy, Debug, Default)]
pub struct InputQuant<'a> {
    /// Per input channel, multiplied in before quantizing: the activation half of
    /// SmoothQuant, whose weight half (`W * diag(1 / scale)`) was folded into the weights
    /// before they were quantized.
    pub scale: Option<&'a [f32]>,
    /// 256 levels from the row's min to its max (with a zero point) instead of 255 symmetric
    /// ones: twice the resolution for one-sided inputs such as GELU outputs.
    pub asymmetric: bool,
}

/// [`linear_with`], its input quantized as `input` says.
#[allow(clippy::too_many_arguments)]
pub fn linear_quant_with<'w>(
    exec: &Exec<'_>,
    x: &[f32],
    input: InputQuant<'_>,
    rows: usize,
    w: impl Into<WeightView<'w>>,
    bias: Option<&[f32]>,
    act: Activation,
    out: &mut [f32],
) {
    let w = w.into();
    let (n, k) = (w.n, w.k);
    assert_eq!(x.len(), rows * k, "linear: x must be rows * in_features");
    assert_eq!(
        out.len(),
        rows * n,
        "linear: out must be rows * out_features"
    );
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "linear: bias must be out_features");
    }
    if let Some(s) = input.scale {
        assert_eq!(s.len(), k, "linear: input scale must be in_features");
    }
    exec.path.assert_supported();
    if rows == 0 || n == 0 {
        return;
    }
    let k4 = k4_of(k);
    let mut sx = vec![0f32; rows];
    let mut zero = vec![0i32; rows];
    SCRATCH.with(|s| {
        let mut buf = s.take();
        buf.clear();
        buf.resize(rows * k4, 0);
        let a = SyncPtr(buf.as_mut_ptr());
        let sxp = SyncPtr(sx.as_mut_ptr());
        let zp = SyncPtr(zero.as_mut_ptr());
        let quant = |r0: usize, r1: usize| {
            // SAFETY: disjoint row ranges per task.
            let rows = unsafe {
                QuantRows {
                    bytes: std::slice::from_raw_parts_mut(a.get().add(r0 * k4), (r1 - r0) * k4),
                    scale: std::slice::from_raw_parts_mut(sxp.get().add(r0), r1 - r0),
                    zero: std::slice::from_raw_parts_mut(zp.get().add(r0), r1 - r0),
                }
            };
            quantize_rows(exec.path, &x[r0 * k..r1 * k], input, k, rows);
        };
        let outs = Out::F32 {
            ptr: SyncPtr(out.as_mut_ptr()),
            sx: sxp.get(),
            bias: bias.map_or(std::ptr::null(), |b| b.as_ptr()),
            act,
        };
        run_tiled(exec, rows, w, (a.get(), zp.get()), outs, &quant);
        s.replace(buf);
    });
}

/// Raw integer GEMM: `out[r][n] = sum_k xq[r][k] * wq[n][k]` (exact), for
/// already-quantized activations in [-127, 127]. Used to test that every
/// path accumulates identically.
pub fn gemm_i32_with<'w>(
    exec: &Exec<'_>,
    xq: &[i8],
    rows: usize,
    w: impl Into<WeightView<'w>>,
    out: &mut [i32],
) {
    let w = w.into();
    let (n, k) = (w.n, w.k);
    assert_eq!(xq.len(), rows * k);
    assert_eq!(out.len(), rows * n);
    assert!(!xq.contains(&i8::MIN), "activations must be in [-127, 127]");
    exec.path.assert_supported();
    if rows == 0 || n == 0 {
        return;
    }
    let k4 = k4_of(k);
    let mut buf = vec![0u8; rows * k4];
    let offset = exec.path == Path::Avx512Vnni;
    for r in 0..rows {
        for kk in 0..k {
            let v = xq[r * k + kk];
            buf[r * k4 + kk] = if offset { (v as u8) ^ 0x80 } else { v as u8 };
        }
        if offset {
            buf[r * k4 + k..(r + 1) * k4].fill(0x80);
        }
    }
    let zero = vec![if offset { 128 } else { 0 }; rows];
    let outs = Out::I32 {
        ptr: SyncPtr(out.as_mut_ptr()),
    };
    let acts = (buf.as_mut_ptr(), zero.as_ptr() as *mut i32);
    run_tiled(exec, rows, w, acts, outs, &|_, _| {});
}

/// Per-row symmetric quantization, public for tests and for callers that
/// want to quantize once and reuse: returns (`xq` row-major, scales).
pub fn quantize_rows_i8(x: &[f32], rows: usize, k: usize) -> (Vec<i8>, Vec<f32>) {
    assert_eq!(x.len(), rows * k);
    let mut q = vec![0i8; rows * k];
    let mut s = vec![0f32; rows];
    for r in 0..rows {
        s[r] = quantize_row_i8(&x[r * k..(r + 1) * k], &mut q[r * k..(r + 1) * k]);
    }
    (q, s)
}

/// Quantized rows: `k4` bytes each in the path's encoding, and per row its scale and
/// `zero` (see the module docs).
pub(crate) struct QuantRows<'a> {
    bytes: &'a mut [u8],
    scale: &'a mut [f32],
    zero: &'a mut [i32],
}

/// Quantizes rows of `x` into the path's byte encoding (`xq + 128` for
/// VNNI, `xq` otherwise), K padded to `k4` (padding multiplies zero weights).
fn quantize_rows(path: Path, x: &[f32], input: InputQuant<'_>, k: usize, out: QuantRows<'_>) {
    match path {
        #[cfg(target_arch = "x86_64")]
        Path::Amx => unsafe { amx::quantize(x, input, k, out) },
        #[cfg(target_arch = "x86_64")]
        Path::Avx512Vnni => unsafe { x86::quantize_avx512(x, input, k, out, 0x80) },
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => unsafe { x86::quantize_avx2(x, input, k, out) },
        #[cfg(target_arch = "aarch64")]
        Path::NeonI8mm | Path::NeonDot => unsafe {
            quantize_v::<crate::simd::F128>(x, input, k, out, 0)
        },
        _ => unsafe { quantize_v::<f32>(x, input, k, out, 0) },
    }
}

/// Quantizes rows with `T`-wide vectors. Bit-identical to
/// `weight::quantize_row_i8` of `x * scale` (same IEEE operations per element), then stores
/// `q ^ xor` (`xor = 0x80` gives the VNNI `q + 128` encoding). Asymmetric rows store
/// `u - 128` the same way.
#[inline(always)]
unsafe fn quantize_v<T: V>(
    x: &[f32],
    input: InputQuant<'_>,
    k: usize,
    out: QuantRows<'_>,
    xor: u8,
) {
    let k4 = k4_of(k);
    let symmetric_zero = if xor == 0x80 { 128 } else { 0 };
    if k == 0 {
        out.scale.fill(0.0);
        out.zero.fill(symmetric_zero);
        return;
    }
    let sp = input.scale.map(|s| s.as_ptr());
    // SAFETY (both): `i + T::W <= k` resp. `n = k - i` elements from `i` lie in the row and
    // in `scale` (`k` long, asserted by the caller).
    let load = |p: *const f32, i: usize| unsafe {
        let v = T::load(p.add(i));
        sp.map_or(v, |s| v.mul(T::load(s.add(i))))
    };
    let load_part = |p: *const f32, i: usize, n: usize| unsafe {
        let v = T::load_part(p.add(i), n, 0.0);
        sp.map_or(v, |s| v.mul(T::load_part(s.add(i), n, 0.0)))
    };
    let rows = x
        .chunks_exact(k)
        .zip(out.bytes.chunks_exact_mut(k4))
        .zip(out.scale.iter_mut().zip(out.zero.iter_mut()));
    for ((row, q), (s, zero)) in rows {
        let (p, qp) = (row.as_ptr(), q.as_mut_ptr());
        unsafe {
            // The row's max and -min (0 included in the range, so zero stays exact).
            let (mut hi, mut neg_lo) = (T::splat(0.0), T::splat(0.0));
            let zero_v = T::splat(0.0);
            let mut i = 0;
            while i + T::W <= k {
                let v = load(p, i);
                hi = hi.max(v);
                neg_lo = neg_lo.max(zero_v.sub(v));
                i += T::W;
            }
            if i < k {
                let v = load_part(p, i, k - i);
                hi = hi.max(v);
                neg_lo = neg_lo.max(zero_v.sub(v));
            }
            let (hi, neg_lo) = (hi.hmax(), neg_lo.hmax());
            *zero = symmetric_zero;
            let (inv, offset, lo_clamp, hi_clamp) = if input.asymmetric {
                let range = hi + neg_lo;
                if range == 0.0 || !range.is_finite() {
                    q.fill(xor);
                    *s = if range == 0.0 { 0.0 } else { f32::NAN };
                    continue;
                }
                let inv = 255.0 / range;
                let zp = ((neg_lo * inv + crate::simd::ROUND_MAGIC) - crate::simd::ROUND_MAGIC)
                    .clamp(0.0, 255.0);
                *s = range / 255.0;
                *zero = symmetric_zero + zp as i32 - 128;
                // q = clamp(round(x * inv) + zp, 0, 255) - 128
                (inv, zp - 128.0, -128.0 - (zp - 128.0), 127.0 - (zp - 128.0))
            } else {
                let amax = hi.max(neg_lo);
                if amax == 0.0 || !amax.is_finite() {
                    q.fill(xor);
                    *s = if amax == 0.0 { 0.0 } else { f32::NAN };
                    continue;
                }
                *s = amax / 127.0;
                (127.0 / amax, 0.0, -127.0, 127.0)
            };
            let (inv, offset) = (T::splat(inv), T::splat(offset));
            let (lo_c, hi_c) = (T::splat(lo_clamp), T::splat(hi_clamp));
            let quant = |v: T| v.mul(inv).round_even().max(lo_c).min(hi_c).add(offset);
            i = 0;
            while i + T::W <= k {
                quant(load(p, i)).store_i8(qp.add(i), xor);
                i += T::W;
            }
            if i < k {
                let mut tmp = [0u8; 16];
                quant(load_part(p, i, k - i)).store_i8(tmp.as_mut_ptr(), xor);
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), qp.add(i), k - i);
            }
            q[k..].fill(xor);
        }
    }
}

/// Splits the GEMM into tasks and runs them. `quant(r0, r1)` fills the
/// quantized rows `[r0, r1)` of `a` and must run before those rows are used.
fn run_tiled(
    exec: &Exec<'_>,
    rows: usize,
    w: WeightView<'_>,
    (a, zero): (*mut u8, *mut i32),
    out: Out,
    quant: &(dyn Fn(usize, usize) + Sync),
) {
    let np = w.n_panels();
    let macs = rows * w.n * w.k.max(1);
    let threads = if macs < PAR_MIN_MACS {
        1
    } else {
        exec.pool.threads()
    };
    let (a, zero) = (SyncPtr(a), SyncPtr(zero));
    let tile = |r0: usize, r1: usize, p0: usize, p1: usize| unsafe {
        let acts = Acts {
            bytes: a.get(),
            zero: zero.get(),
        };
        tile_dispatch(exec.path, acts, w, r0, r1, p0, p1, out)
    };
    if threads == 1 {
        // Row blocks keep the quantized block (<= 64 x K bytes) in L2 while
        // every weight panel streams past it.
        for r0 in (0..rows).step_by(ROW_BLOCK) {
            let r1 = (r0 + ROW_BLOCK).min(rows);
            quant(r0, r1);
            tile(r0, r1, 0, np);
        }
        return;
    }
    let n_rb = rows.div_ceil(ROW_BLOCK);
    if n_rb >= 2 * threads {
        // Enough rows: each task quantizes and multiplies its own row block.
        exec.pool.run(n_rb, &|t| {
            let (r0, r1) = (t * ROW_BLOCK, ((t + 1) * ROW_BLOCK).min(rows));
            quant(r0, r1);
            tile(r0, r1, 0, np);
        });
    } else {
        // Few rows: quantize first, then split output channels as well.
        if rows * w.k >= 1 << 15 {
            let rb = rows.div_ceil(threads);
            exec.pool.run(threads, &|t| {
                let (r0, r1) = ((t * rb).min(rows), ((t + 1) * rb).min(rows));
                if r0 < r1 {
                    quant(r0, r1);
                }
            });
        } else {
            quant(0, rows);
        }
        let rb = rows.div_ceil(n_rb);
        let want = (4 * threads).div_ceil(n_rb);
        let pc = np.div_ceil(want).next_multiple_of(2).max(2);
        let n_pc = np.div_ceil(pc);
        exec.pool.run(n_rb * n_pc, &|t| {
            let (i, j) = (t / n_pc, t % n_pc);
            let (r0, r1) = (i * rb, ((i + 1) * rb).min(rows));
            let (p0, p1) = (j * pc, ((j + 1) * pc).min(np));
            if r0 < r1 && p0 < p1 {
                tile(r0, r1, p0, p1);
            }
        });
    }
}

/// Quantized activations as the tile kernels read them: `rows * k4` bytes in the path's
/// encoding and each row's `zero`.
#[derive(Clone, Copy)]
pub(crate) struct Acts {
    bytes: *const u8,
    zero: *const i32,
}

/// # Safety
/// `a` holds `rows` quantized rows in the path's encoding; `out` is
/// valid for the whole `[rows, n]` output; the path is supported.
#[allow(clippy::too_many_arguments)]
unsafe fn tile_dispatch(
    path: Path,
    a: Acts,
    w: WeightView<'_>,
    r0: usize,
    r1: usize,
    p0: usize,
    p1: usize,
    out: Out,
) {
    unsafe {
        match path {
            #[cfg(target_arch = "x86_64")]
            Path::Amx => amx::tile(a, w, r0, r1, p0, p1, out),
            #[cfg(target_arch = "x86_64")]
            Path::Avx512Vnni => x86::tile_avx512(a, w, r0, r1, p0, p1, out),
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => x86::tile_avx2(a, w, r0, r1, p0, p1, out),
            #[cfg(target_arch = "aarch64")]
            Path::NeonI8mm => arm::tile_i8mm(a, w, r0, r1, p0, p1, out),
            #[cfg(target_arch = "aarch64")]
            Path::NeonDot => arm::tile_dot(a, w, r0, r1, p0, p1, out),
            _ => tile_scalar(a, w, r0, r1, p0, p1, out),
        }
    }
}

/// Shared epilogue for 16 (or `T::W`-sized pieces of 16) channels of one
/// row: `acc` already corrected to the exact integer dot product.
#[inline(always)]
unsafe fn epilogue<T: V>(
    acc_f: T,
    row: usize,
    n0: usize,
    n_valid: usize,
    w: &WeightView<'_>,
    out: Out,
) {
    if let Out::F32 { ptr, sx, bias, act } = out {
        unsafe {
            let s = T::splat(*sx.add(row)).mul(T::load(w.scales.as_ptr().add(n0)));
            let mut y = acc_f.mul(s);
            if !bias.is_null() {
                y = y.add(if n_valid >= T::W {
                    T::load(bias.add(n0))
                } else {
                    T::load_part(bias.add(n0), n_valid, 0.0)
                });
            }
            if act == Activation::Gelu {
                y = crate::ops::gelu_v(y);
            }
            let dst = ptr.get().add(row * w.n + n0);
            if n_valid >= T::W {
                y.store(dst)
            } else {
                y.store_part(dst, n_valid)
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
unsafe fn tile_scalar(
    a: Acts,
    w: WeightView<'_>,
    r0: usize,
    r1: usize,
    p0: usize,
    p1: usize,
    out: Out,
) {
    let k4 = w.k4();
    let kg = k4 / KGROUP;
    for p in p0..p1 {
        let b = &w.packed[p * k4 * PANEL..(p + 1) * k4 * PANEL];
        for r in r0..r1 {
            let x = unsafe { std::slice::from_raw_parts(a.bytes.add(r * k4) as *const i8, k4) };
            let zero = unsafe { *a.zero.add(r) };
            let mut acc = [0i32; PANEL];
            for g in 0..kg {
                let xg = &x[g * KGROUP..(g + 1) * KGROUP];
                let bg = &b[g * PANEL * KGROUP..(g + 1) * PANEL * KGROUP];
                for (c, acc) in acc.iter_mut().enumerate() {
                    for t in 0..KGROUP {
                        *acc += xg[t] as i32 * (bg[c * KGROUP + t] as i8) as i32;
                    }
                }
            }
            let n0 = p * PANEL;
            let nv = (w.n - n0).min(PANEL);
            for (c, &v) in acc.iter().enumerate().take(nv) {
                let v = v - zero * w.row_sums[n0 + c];
                match out {
                    Out::I32 { ptr } => unsafe { *ptr.get().add(r * w.n + n0 + c) = v },
                    Out::F32 { .. } => unsafe { epilogue::<f32>(v as f32, r, n0 + c, 1, &w, out) },
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use crate::simd::{F256, F512};
    use std::arch::x86_64::*;

    /// `xor`: 0x80 for the VNNI encoding, 0 for AMX's signed one.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn quantize_avx512(
        x: &[f32],
        input: InputQuant<'_>,
        k: usize,
        out: QuantRows<'_>,
        xor: u8,
    ) {
        unsafe { quantize_v::<F512>(x, input, k, out, xor) }
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn quantize_avx2(
        x: &[f32],
        input: InputQuant<'_>,
        k: usize,
        out: QuantRows<'_>,
    ) {
        unsafe { quantize_v::<F256>(x, input, k, out, 0) }
    }

    // ---------------- AVX-512 VNNI ----------------
    const MR512: usize = 8;
    const NR512: usize = 2;

    #[inline(always)]
    unsafe fn micro512<const MR: usize, const NR: usize>(
        a: *const u8,
        lda: usize,
        b: *const u8,
        ldb: usize,
        kg: usize,
    ) -> [[__m512i; NR]; MR] {
        unsafe {
            let mut acc = [[_mm512_setzero_si512(); NR]; MR];
            for g in 0..kg {
                let mut bv = [_mm512_setzero_si512(); NR];
                for (j, bv) in bv.iter_mut().enumerate() {
                    *bv = _mm512_loadu_si512(b.add(j * ldb + g * 64) as *const __m512i);
                }
                for (i, acc) in acc.iter_mut().enumerate() {
                    let av =
                        _mm512_set1_epi32((a.add(i * lda + g * 4) as *const i32).read_unaligned());
                    for j in 0..NR {
                        acc[j] = _mm512_dpbusd_epi32(acc[j], av, bv[j]);
                    }
                }
            }
            acc
        }
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block512<const MR: usize, const NR: usize>(
        a: Acts,
        w: &WeightView<'_>,
        r: usize,
        p: usize,
        out: Out,
    ) {
        unsafe {
            let k4 = w.k4();
            let ldb = k4 * PANEL;
            let acc = micro512::<MR, NR>(
                a.bytes.add(r * k4),
                k4,
                w.packed.as_ptr().add(p * ldb),
                ldb,
                k4 / 4,
            );
            for j in 0..NR {
                let n0 = (p + j) * PANEL;
                let nv = (w.n - n0).min(PANEL);
                let sums = _mm512_loadu_si512(w.row_sums.as_ptr().add(n0) as *const __m512i);
                for (i, acc) in acc.iter().enumerate() {
                    let corr = _mm512_mullo_epi32(sums, _mm512_set1_epi32(*a.zero.add(r + i)));
                    let v = _mm512_sub_epi32(acc[j], corr);
                    match out {
                        Out::I32 { ptr } => {
                            let m: __mmask16 = ((1u32 << nv) - 1) as u16;
                            _mm512_mask_storeu_epi32(ptr.get().add((r + i) * w.n + n0), m, v);
                        }
                        Out::F32 { .. } => {
                            epilogue::<F512>(F512(_mm512_cvtepi32_ps(v)), r + i, n0, nv, w, out)
                        }
                    }
                }
            }
        }
    }

    macro_rules! mr_dispatch {
        ($f:ident, $mr:expr, $nr:literal, $($args:expr),*) => {
            match $mr {
                8 => $f::<8, $nr>($($args),*),
                7 => $f::<7, $nr>($($args),*),
                6 => $f::<6, $nr>($($args),*),
                5 => $f::<5, $nr>($($args),*),
                4 => $f::<4, $nr>($($args),*),
                3 => $f::<3, $nr>($($args),*),
                2 => $f::<2, $nr>($($args),*),
                1 => $f::<1, $nr>($($args),*),
                _ => unreachable!(),
            }
        };
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile_avx512(
        a: Acts,
        w: WeightView<'_>,
        r0: usize,
        r1: usize,
        p0: usize,
        p1: usize,
        out: Out,
    ) {
        let mut p = p0;
        while p < p1 {
            let nr = (p1 - p).min(NR512);
            let mut r = r0;
            while r < r1 {
                let mr = (r1 - r).min(MR512);
                unsafe {
                    if nr == 2 {
                        mr_dispatch!(block512, mr, 2, a, &w, r, p, out)
                    } else {
                        mr_dispatch!(block512, mr, 1, a, &w, r, p, out)
                    }
                }
                r += mr;
            }
            p += nr;
        }
    }

    // ---------------- AVX2 ----------------
    /// Rows x panels of the micro-tile: 2 rows x 32 channels = 8 accumulators; each row's
    /// `vpabsb` serves four weight vectors.
    const MR256: usize = 2;
    const NR256: usize = 2;

    /// `NR` panels (16 channels = 2 ymm each) x `MR` rows.
    #[inline(always)]
    unsafe fn block256<const MR: usize, const NR: usize>(
        a: Acts,
        w: &WeightView<'_>,
        r: usize,
        p: usize,
        out: Out,
    ) {
        unsafe {
            let k4 = w.k4();
            let kg = k4 / 4;
            let ldb = k4 * PANEL;
            let b = w.packed.as_ptr().add(p * ldb);
            let zero = a.zero.add(r);
            let a = a.bytes.add(r * k4);
            let ones = _mm256_set1_epi16(1);
            let mut acc = [[[_mm256_setzero_si256(); 2]; NR]; MR];
            for g in 0..kg {
                let mut bv = [[_mm256_setzero_si256(); 2]; NR];
                for (j, bv) in bv.iter_mut().enumerate() {
                    bv[0] = _mm256_loadu_si256(b.add(j * ldb + g * 64) as *const __m256i);
                    bv[1] = _mm256_loadu_si256(b.add(j * ldb + g * 64 + 32) as *const __m256i);
                }
                for (i, acc) in acc.iter_mut().enumerate() {
                    let av =
                        _mm256_set1_epi32((a.add(i * k4 + g * 4) as *const i32).read_unaligned());
                    let aabs = _mm256_abs_epi8(av);
                    for (acc, bv) in acc.iter_mut().zip(&bv) {
                        for (acc, &bv) in acc.iter_mut().zip(bv) {
                            let p = _mm256_maddubs_epi16(aabs, _mm256_sign_epi8(bv, av));
                            *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(p, ones));
                        }
                    }
                }
            }
            for j in 0..NR {
                for h in 0..2 {
                    let n0 = (p + j) * PANEL + h * 8;
                    if n0 >= w.n {
                        break;
                    }
                    let nv = (w.n - n0).min(8);
                    let sums = _mm256_loadu_si256(w.row_sums.as_ptr().add(n0) as *const __m256i);
                    for (i, acc) in acc.iter().enumerate() {
                        let corr = _mm256_mullo_epi32(sums, _mm256_set1_epi32(*zero.add(i)));
                        let v = _mm256_sub_epi32(acc[j][h], corr);
                        match out {
                            Out::I32 { ptr } => {
                                let dst = ptr.get().add((r + i) * w.n + n0);
                                if nv == 8 {
                                    _mm256_storeu_si256(dst as *mut __m256i, v);
                                } else {
                                    let mut tmp = [0i32; 8];
                                    _mm256_storeu_si256(tmp.as_mut_ptr() as *mut __m256i, v);
                                    std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, nv);
                                }
                            }
                            Out::F32 { .. } => {
                                epilogue::<F256>(F256(_mm256_cvtepi32_ps(v)), r + i, n0, nv, w, out)
                            }
                        }
                    }
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_avx2(
        a: Acts,
        w: WeightView<'_>,
        r0: usize,
        r1: usize,
        p0: usize,
        p1: usize,
        out: Out,
    ) {
        let mut p = p0;
        while p < p1 {
            let nr = (p1 - p).min(NR256);
            let mut r = r0;
            while r < r1 {
                let mr = (r1 - r).min(MR256);
                unsafe {
                    match (mr, nr) {
                        (2, 2) => block256::<2, 2>(a, &w, r, p, out),
                        (2, _) => block256::<2, 1>(a, &w, r, p, out),
                        (_, 2) => block256::<1, 2>(a, &w, r, p, out),
                        _ => block256::<1, 1>(a, &w, r, p, out),
                    }
                }
                r += mr;
            }
            p += nr;
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use super::*;
    use crate::simd::F128;
    use std::arch::aarch64::*;
    use std::arch::asm;

    // `sdot`/`smmla` by inline assembly: their intrinsics are not stable Rust yet.

    /// `acc[c] += sum_t b[4c + t] * a[t]` (the first 4 bytes of `a`, broadcast).
    #[inline(always)]
    unsafe fn sdot_lane0(mut acc: int32x4_t, b: int8x16_t, a: int8x16_t) -> int32x4_t {
        unsafe {
            asm!("sdot {acc:v}.4s, {b:v}.16b, {a:v}.4b[0]",
                acc = inout(vreg) acc, b = in(vreg) b, a = in(vreg) a,
                options(pure, nomem, nostack));
        }
        acc
    }

    /// `acc[2i + j] += sum_t a[8i + t] * b[8j + t]`: rows `i` of `a` times channels `j` of `b`.
    #[inline(always)]
    unsafe fn smmla(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        unsafe {
            asm!("smmla {acc:v}.4s, {a:v}.16b, {b:v}.16b",
                acc = inout(vreg) acc, a = in(vreg) a, b = in(vreg) b,
                options(pure, nomem, nostack));
        }
        acc
    }

    /// Row `row`'s exact products for 4 channels from `n0` (`acc` before the zero-point
    /// correction), stored or through the shared epilogue.
    #[inline(always)]
    unsafe fn finish4(
        acc: int32x4_t,
        a: Acts,
        w: &WeightView<'_>,
        row: usize,
        n0: usize,
        out: Out,
    ) {
        if n0 >= w.n {
            return;
        }
        let nv = (w.n - n0).min(4);
        unsafe {
            let sums = vld1q_s32(w.row_sums.as_ptr().add(n0));
            let v = vsubq_s32(acc, vmulq_s32(sums, vdupq_n_s32(*a.zero.add(row))));
            match out {
                Out::I32 { ptr } => {
                    let mut tmp = [0i32; 4];
                    vst1q_s32(tmp.as_mut_ptr(), v);
                    std::ptr::copy_nonoverlapping(tmp.as_ptr(), ptr.get().add(row * w.n + n0), nv);
                }
                Out::F32 { .. } => epilogue::<F128>(F128(vcvtq_f32_s32(v)), row, n0, nv, w, out),
            }
        }
    }

    #[inline(always)]
    unsafe fn load_i32(p: *const u8) -> int8x16_t {
        unsafe { vreinterpretq_s8_s32(vdupq_n_s32((p as *const i32).read_unaligned())) }
    }

    // ---------------- dotprod ----------------
    const MR_DOT: usize = 4;

    /// One panel (16 channels = 4 vectors) x MR rows.
    #[inline(always)]
    unsafe fn block_dot<const MR: usize>(
        a: Acts,
        w: &WeightView<'_>,
        r: usize,
        p: usize,
        out: Out,
    ) {
        unsafe {
            let k4 = w.k4();
            let b = w.packed.as_ptr().add(p * k4 * PANEL) as *const i8;
            let rows = a.bytes.add(r * k4);
            let mut acc = [[vdupq_n_s32(0); 4]; MR];
            for g in 0..k4 / KGROUP {
                let bg = b.add(g * PANEL * KGROUP);
                let bv = [
                    vld1q_s8(bg),
                    vld1q_s8(bg.add(16)),
                    vld1q_s8(bg.add(32)),
                    vld1q_s8(bg.add(48)),
                ];
                for (i, acc) in acc.iter_mut().enumerate() {
                    let av = load_i32(rows.add(i * k4 + g * KGROUP));
                    for (acc, &bv) in acc.iter_mut().zip(&bv) {
                        *acc = sdot_lane0(*acc, bv, av);
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                for (j, &acc) in acc.iter().enumerate() {
                    finish4(acc, a, w, r + i, p * PANEL + 4 * j, out);
                }
            }
        }
    }

    #[target_feature(enable = "dotprod")]
    pub(super) unsafe fn tile_dot(
        a: Acts,
        w: WeightView<'_>,
        r0: usize,
        r1: usize,
        p0: usize,
        p1: usize,
        out: Out,
    ) {
        for p in p0..p1 {
            let mut r = r0;
            while r < r1 {
                let mr = (r1 - r).min(MR_DOT);
                unsafe {
                    match mr {
                        4 => block_dot::<4>(a, &w, r, p, out),
                        3 => block_dot::<3>(a, &w, r, p, out),
                        2 => block_dot::<2>(a, &w, r, p, out),
                        _ => block_dot::<1>(a, &w, r, p, out),
                    }
                }
                r += mr;
            }
        }
    }

    // ---------------- i8mm ----------------
    /// Row pairs per block: 2 pairs x 8 channel pairs = 16 accumulators.
    const PAIRS: usize = 2;

    /// `2 * RP` rows x one panel. Accumulator `[i][m]` holds rows `2i, 2i + 1` by channels
    /// `2m, 2m + 1`.
    #[inline(always)]
    unsafe fn block_mmla<const RP: usize>(
        a: Acts,
        w: &WeightView<'_>,
        r: usize,
        p: usize,
        out: Out,
    ) {
        unsafe {
            let k4 = w.k4();
            let kg = k4 / KGROUP;
            let b = w.packed.as_ptr().add(p * k4 * PANEL) as *const i8;
            let rows = a.bytes.add(r * k4) as *const i8;
            let mut acc = [[vdupq_n_s32(0); PANEL / 2]; RP];
            // Channel operands of k-groups `g` and `g1` (`g1` = None: zeros, the odd last group).
            let channel_pairs = |g: usize, g1: Option<usize>| {
                let mut bp = [vdupq_n_s8(0); PANEL / 2];
                for q in 0..4 {
                    let lo = vreinterpretq_s32_s8(vld1q_s8(b.add(g * PANEL * KGROUP + 16 * q)));
                    let hi = g1.map_or(vdupq_n_s32(0), |g1| {
                        vreinterpretq_s32_s8(vld1q_s8(b.add(g1 * PANEL * KGROUP + 16 * q)))
                    });
                    bp[2 * q] = vreinterpretq_s8_s32(vzip1q_s32(lo, hi));
                    bp[2 * q + 1] = vreinterpretq_s8_s32(vzip2q_s32(lo, hi));
                }
                bp
            };
            let mut g = 0;
            while g + 2 <= kg {
                let bp = channel_pairs(g, Some(g + 1));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let top = vld1_s8(rows.add(2 * i * k4 + g * KGROUP));
                    let bottom = vld1_s8(rows.add((2 * i + 1) * k4 + g * KGROUP));
                    let av = vcombine_s8(top, bottom);
                    for (acc, &bp) in acc.iter_mut().zip(&bp) {
                        *acc = smmla(*acc, av, bp);
                    }
                }
                g += 2;
            }
            if g < kg {
                let bp = channel_pairs(g, None);
                for (i, acc) in acc.iter_mut().enumerate() {
                    let word = |row: usize| {
                        (rows.add(row * k4 + g * KGROUP) as *const u32).read_unaligned() as u64
                    };
                    let av = vreinterpretq_s8_u64(vcombine_u64(
                        vcreate_u64(word(2 * i)),
                        vcreate_u64(word(2 * i + 1)),
                    ));
                    for (acc, &bp) in acc.iter_mut().zip(&bp) {
                        *acc = smmla(*acc, av, bp);
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                for q in 0..4 {
                    // Channels 4q..4q+4 of the top row are the low halves of pairs 2q, 2q+1.
                    let (m0, m1) = (
                        vreinterpretq_s64_s32(acc[2 * q]),
                        vreinterpretq_s64_s32(acc[2 * q + 1]),
                    );
                    let n0 = p * PANEL + 4 * q;
                    finish4(
                        vreinterpretq_s32_s64(vzip1q_s64(m0, m1)),
                        a,
                        w,
                        r + 2 * i,
                        n0,
                        out,
                    );
                    finish4(
                        vreinterpretq_s32_s64(vzip2q_s64(m0, m1)),
                        a,
                        w,
                        r + 2 * i + 1,
                        n0,
                        out,
                    );
                }
            }
        }
    }

    #[target_feature(enable = "i8mm,dotprod")]
    pub(super) unsafe fn tile_i8mm(
        a: Acts,
        w: WeightView<'_>,
        r0: usize,
        r1: usize,
        p0: usize,
        p1: usize,
        out: Out,
    ) {
        for p in p0..p1 {
            let mut r = r0;
            while r + 2 <= r1 {
                let rp = ((r1 - r) / 2).min(PAIRS);
                unsafe {
                    match rp {
                        2 => block_mmla::<2>(a, &w, r, p, out),
                        _ => block_mmla::<1>(a, &w, r, p, out),
                    }
                }
                r += 2 * rp;
            }
            if r < r1 {
                // An odd last row: the dot-product kernel.
                unsafe { block_dot::<1>(a, &w, r, p, out) };
            }
        }
    }
}
