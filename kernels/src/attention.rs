//! Fused scaled-dot-product attention of one head of one sequence, in F32.
//!
//! For a block of [`QUERY_BLOCK`] query rows at a time: their scores against every key
//! (`QUERY_BLOCK x len`, 16 KB at 512 tokens: L1-resident), an optional bias per row, the
//! softmax over each whole row (exact, not online: a row of up to a few thousand keys fits),
//! then the probability-weighted sum of the values, scaled by the softmax's `1 / sum` on the
//! way out. The `len x len` score matrix is never materialized, K is transposed and V packed once per call
//! into `[head_dim, len]` so the score tiles are broadcast-FMA products, and the scratch is
//! per thread and reused, so a call allocates nothing once warm.
//!
//! The products use FMA where the ISA has it ([`V::mul_add`]); summation order differs by
//! vector width, so paths agree to a few ulps, like softmax. A row's result depends only on its
//! own sequence: batch-invariant.

use std::cell::RefCell;

use crate::Path;
use crate::ops::exp_row;
use crate::simd::V;

/// Query rows whose scores are held at once.
pub const QUERY_BLOCK: usize = 8;
/// Rows of a score or value tile: 4 rows x 2 vectors = 8 independent FMA chains, enough to
/// cover FMA latency on two ports, in 16 AVX2 registers with room for the operands.
const TILE_ROWS: usize = 4;

/// One head of one sequence, in row-major buffers with a row stride (Q, K and V of a fused
/// QKV projection share one).
#[derive(Clone, Copy, Debug)]
pub struct HeadIo {
    /// Query row `i` at `q + i * in_stride`, `head_dim` values, already scaled by
    /// `1 / sqrt(head_dim)`.
    pub q: *const f32,
    /// Key row `j` at `k + j * in_stride`.
    pub k: *const f32,
    /// Value row `j` at `v + j * in_stride`.
    pub v: *const f32,
    /// Floats between consecutive rows of `q`, `k` and `v`.
    pub in_stride: usize,
    /// Output row `i` at `out + i * out_stride`, `head_dim` values (overwritten).
    pub out: *mut f32,
    /// Floats between consecutive output rows.
    pub out_stride: usize,
    /// Tokens of the sequence.
    pub len: usize,
    /// Values per head.
    pub head_dim: usize,
}

/// Adds a bias to query row `i`'s scores (`scores[j]` for key `j`): MPNet's relative
/// positions.
pub type RowBias<'a> = &'a (dyn Fn(usize, &mut [f32]) + Sync);

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

/// `out[i] = softmax(q[i] . k[j] (+ bias(i, j)) over j) . v` for every row `i`, on the active
/// path.
///
/// # Safety
/// `q`, `k` and `v` must be readable for `len` rows of `head_dim` values at their stride, and
/// `out` writable for `len` rows of `head_dim` values at its stride, not overlapping the
/// inputs nor written by anyone else during the call.
pub unsafe fn attend_head(io: HeadIo, bias: Option<RowBias<'_>>) {
    unsafe { attend_head_with(Path::active(), io, bias) }
}

/// [`attend_head`] on a given path (panics if the CPU lacks it).
///
/// # Safety
/// As for [`attend_head`].
pub unsafe fn attend_head_with(path: Path, io: HeadIo, bias: Option<RowBias<'_>>) {
    path.assert_supported();
    if io.len == 0 || io.head_dim == 0 {
        return;
    }
    SCRATCH.with(|scratch| {
        let scratch = &mut *scratch.borrow_mut();
        unsafe {
            match path {
                #[cfg(target_arch = "x86_64")]
                Path::Avx512Vnni | Path::Amx => x86::attend_512(io, bias, scratch),
                #[cfg(target_arch = "x86_64")]
                Path::Avx2 => x86::attend_256(io, bias, scratch),
                #[cfg(target_arch = "aarch64")]
                Path::NeonI8mm | Path::NeonDot => attend::<crate::simd::F128>(io, bias, scratch),
                _ => attend::<f32>(io, bias, scratch),
            }
        }
    })
}

/// Per-thread buffers of [`attend`], grown to the longest sequence seen.
#[derive(Default)]
struct Scratch {
    /// K transposed, `[head_dim, lenp]`.
    kt: Vec<f32>,
    /// V packed, `[len, head_dim]`.
    v: Vec<f32>,
    /// Scores of one query block, `[QUERY_BLOCK, lenp]`.
    scores: Vec<f32>,
}

#[inline(always)]
unsafe fn attend<T: V>(io: HeadIo, bias: Option<RowBias<'_>>, scratch: &mut Scratch) {
    let Scratch {
        kt,
        v: packed_v,
        scores,
    } = scratch;
    let HeadIo {
        q,
        k,
        v,
        in_stride,
        out,
        out_stride,
        len,
        head_dim: hd,
    } = io;
    // Keys padded to whole vectors: the padding's scores are computed (against zero keys)
    // but never read.
    let lenp = len.next_multiple_of(T::W);
    // K transposed and V packed: the fused QKV rows are `in_stride` apart (a page or more at
    // real widths), so reading them in place, row after row, for every query block missed the
    // TLB on each row. Each is read once here, K in blocks of 8 rows so the stores go 8
    // contiguous floats at a time.
    kt.clear();
    kt.resize(hd * lenp, 0.0);
    for j0 in (0..len).step_by(8) {
        let rows = 8.min(len - j0);
        for d in 0..hd {
            for j in j0..j0 + rows {
                kt[d * lenp + j] = unsafe { *k.add(j * in_stride + d) };
            }
        }
    }
    packed_v.clear();
    for j in 0..len {
        packed_v.extend_from_slice(unsafe { std::slice::from_raw_parts(v.add(j * in_stride), hd) });
    }
    let v = packed_v.as_ptr();
    scores.clear();
    scores.resize(QUERY_BLOCK * lenp, 0.0);
    let mut inv_sum = [0f32; QUERY_BLOCK];
    for i0 in (0..len).step_by(QUERY_BLOCK) {
        let rows = QUERY_BLOCK.min(len - i0);
        let q = unsafe { q.add(i0 * in_stride) };
        let mut r = 0;
        while r < rows {
            let n = (rows - r).min(TILE_ROWS);
            let (q, s) = (
                unsafe { q.add(r * in_stride) },
                scores[r * lenp..].as_mut_ptr(),
            );
            unsafe {
                match n {
                    4 => score_rows::<T, 4>(q, in_stride, kt, lenp, hd, s),
                    3 => score_rows::<T, 3>(q, in_stride, kt, lenp, hd, s),
                    2 => score_rows::<T, 2>(q, in_stride, kt, lenp, hd, s),
                    _ => score_rows::<T, 1>(q, in_stride, kt, lenp, hd, s),
                }
            }
            r += n;
        }
        for (r, inv) in inv_sum.iter_mut().enumerate().take(rows) {
            let row = &mut scores[r * lenp..r * lenp + len];
            if let Some(bias) = bias {
                bias(i0 + r, row);
            }
            *inv = unsafe { exp_row::<T>(row) };
        }
        let mut r = 0;
        while r < rows {
            let n = (rows - r).min(TILE_ROWS);
            let p = &scores[r * lenp..];
            let inv = &inv_sum[r..r + n];
            let o = unsafe { out.add((i0 + r) * out_stride) };
            let rows_io = ValueRows {
                p: p.as_ptr(),
                lenp,
                v,
                len,
                out: o,
                out_stride,
            };
            unsafe {
                match n {
                    4 => value_rows::<T, 4>(rows_io, hd, inv),
                    3 => value_rows::<T, 3>(rows_io, hd, inv),
                    2 => value_rows::<T, 2>(rows_io, hd, inv),
                    _ => value_rows::<T, 1>(rows_io, hd, inv),
                }
            }
            r += n;
        }
    }
}

/// Scores of `R` query rows against all `lenp` (padded) keys: `s[i * lenp + j] = q[i] . k[j]`.
#[inline(always)]
unsafe fn score_rows<T: V, const R: usize>(
    q: *const f32,
    in_stride: usize,
    kt: &[f32],
    lenp: usize,
    hd: usize,
    s: *mut f32,
) {
    let mut j = 0;
    while j + 2 * T::W <= lenp {
        unsafe { score_tile::<T, R, 2>(q, in_stride, kt, lenp, hd, s, j) };
        j += 2 * T::W;
    }
    if j < lenp {
        unsafe { score_tile::<T, R, 1>(q, in_stride, kt, lenp, hd, s, j) };
    }
}

/// `R` rows x `N` vectors of keys from `j`.
#[inline(always)]
unsafe fn score_tile<T: V, const R: usize, const N: usize>(
    q: *const f32,
    in_stride: usize,
    kt: &[f32],
    lenp: usize,
    hd: usize,
    s: *mut f32,
    j: usize,
) {
    let mut acc = [[T::splat(0.0); N]; R];
    let kt = kt.as_ptr();
    unsafe {
        for d in 0..hd {
            let mut keys = [T::splat(0.0); N];
            for (c, key) in keys.iter_mut().enumerate() {
                *key = T::load(kt.add(d * lenp + j + c * T::W));
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                let qv = T::splat(*q.add(i * in_stride + d));
                for (acc, &key) in acc.iter_mut().zip(&keys) {
                    *acc = qv.mul_add(key, *acc);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for (c, acc) in acc.iter().enumerate() {
                acc.store(s.add(i * lenp + j + c * T::W));
            }
        }
    }
}

/// Unnormalized probabilities of some query rows and where their outputs go.
#[derive(Clone, Copy)]
struct ValueRows {
    /// Row `i`'s `len` probabilities at `p + i * lenp`.
    p: *const f32,
    lenp: usize,
    /// The packed values: row `j` at `v + j * head_dim`.
    v: *const f32,
    len: usize,
    out: *mut f32,
    out_stride: usize,
}

/// `out[i] = inv[i] * sum_j p[i][j] v[j]` for `R` rows, whole vectors of columns in tiles of
/// two, a last part-vector lane by lane.
#[inline(always)]
unsafe fn value_rows<T: V, const R: usize>(io: ValueRows, hd: usize, inv: &[f32]) {
    let mut c = 0;
    while c + 2 * T::W <= hd {
        unsafe { value_tile::<T, R, 2>(io, hd, inv, c) };
        c += 2 * T::W;
    }
    if c + T::W <= hd {
        unsafe { value_tile::<T, R, 1>(io, hd, inv, c) };
        c += T::W;
    }
    for col in c..hd {
        for (i, &inv) in inv.iter().enumerate().take(R) {
            let mut sum = 0f32;
            for j in 0..io.len {
                unsafe { sum += *io.p.add(i * io.lenp + j) * *io.v.add(j * hd + col) };
            }
            unsafe { *io.out.add(i * io.out_stride + col) = sum * inv };
        }
    }
}

/// `R` rows x `N` vectors of value columns from `c`.
#[inline(always)]
unsafe fn value_tile<T: V, const R: usize, const N: usize>(
    io: ValueRows,
    hd: usize,
    inv: &[f32],
    c: usize,
) {
    let mut acc = [[T::splat(0.0); N]; R];
    unsafe {
        for j in 0..io.len {
            let mut values = [T::splat(0.0); N];
            for (n, value) in values.iter_mut().enumerate() {
                *value = T::load(io.v.add(j * hd + c + n * T::W));
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                let p = T::splat(*io.p.add(i * io.lenp + j));
                for (acc, &value) in acc.iter_mut().zip(&values) {
                    *acc = p.mul_add(value, *acc);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            let inv = T::splat(inv[i]);
            for (n, acc) in acc.iter().enumerate() {
                acc.mul(inv)
                    .store(io.out.add(i * io.out_stride + c + n * T::W));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use crate::simd::{F256, F512};

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn attend_512(io: HeadIo, bias: Option<RowBias<'_>>, scratch: &mut Scratch) {
        unsafe { attend::<F512>(io, bias, scratch) }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn attend_256(io: HeadIo, bias: Option<RowBias<'_>>, scratch: &mut Scratch) {
        unsafe { attend::<F256>(io, bias, scratch) }
    }
}
