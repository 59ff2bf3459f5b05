//! Intel AMX-INT8 (`Path::Amx`): `tdpbssd` straight on the packed weights.
//!
//! Every tile is configured 16 rows x 64 bytes (palette 1, one `ldtilecfg` per call):
//! - A (tmm4, tmm5): 16 activation rows x 64 k, signed bytes.
//! - B (tmm6, tmm7): 16 consecutive k-groups of one weight panel, each 16 channels x 4 bytes:
//!   the packed layout already is the row-of-dwords ("VNNI") layout `tdpbssd` reads, so a B
//!   tile is the 1 KiB at `w.packed[p * k4 * PANEL + s * 1024..]`, stride 64.
//! - C (tmm0-3): `C[2i + j] = A[i] x B[j]`, 16 rows x 16 channels of i32: 2 x 2 blocking,
//!   4 products per 2 A and 2 B loads.
//!
//! `tdpbssd` (signed x signed) rather than `tdpbusd` (unsigned x signed): rows keep the
//! AVX2/scalar encoding (`xq`, or `u - 128` with its -128 for asymmetric rows), so the
//! zero-point correction is the one every path makes and no +128 offset is added. The sums
//! are exact: i32 accumulation without intermediate saturation, and
//! `128 * 127 * MAX_IN_FEATURES < 2^31`.
//!
//! Nothing is read out of bounds: a row block of fewer than 32 rows or a K not a multiple of 64
//! is copied once per call into zero-padded 64-byte-multiple rows, and a panel's last, partial
//! B tile into a zero-padded 1 KiB buffer. One tile shape keeps one `ldtilecfg` per call; tail
//! shapes would need a second configuration and more tile registers than remain.
//!
//! The tile logic is written once, over [`TileOps`]: [`Hw`] executes the instructions (inline
//! assembly; the AMX intrinsics are not stable Rust) and the tests' `Emu` models them in plain
//! Rust after the SDM's pseudo-code. No AMX machine was available when this was written, so the
//! hardware path has not run yet. Verified: the emulated kernel is bit-identical to the scalar
//! path; the instructions' encodings (`objdump -d`); and on an AMX CPU the first use runs a
//! known-answer self-check against the scalar kernel before the path is offered ([`status`]).

use super::{Acts, InputQuant, Out, QuantRows, SyncPtr, epilogue, tile_scalar, x86};
use crate::simd::{F512, V};
use crate::weight::{KGROUP, PANEL, QuantizedWeight, WeightView, k4_of};
use crate::{Activation, MAX_IN_FEATURES};
use std::arch::asm;
use std::cell::Cell;
use std::sync::OnceLock;

/// Rows of every tile.
const ROWS: usize = 16;
/// Bytes per tile row: 64 k of an A row, one k-group of a panel in B, 16 i32 of C.
const COLSB: usize = 64;
/// Bytes of one B tile: 16 k-groups of a panel.
const B_TILE: usize = ROWS * COLSB;
const _: () = assert!(COLSB == PANEL * KGROUP && ROWS == PANEL);
const _: () = assert!(128 * 127 * MAX_IN_FEATURES < 1 << 31);

/// `ldtilecfg`'s operand: palette 1, start_row 0, bytes 2-15 reserved (0); tiles 0-7
/// `ROWS` x `COLSB` (colsb: u16 at byte 16 + 2t; rows: byte 48 + t); tiles 8-15 unused (0).
const TILE_CFG: [u8; 64] = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = COLSB as u8;
        c[48 + t] = ROWS as u8;
        t += 1;
    }
    c
};

/// The tile instructions the kernel uses. Tile numbers are const generics: they are part of
/// the instruction encoding.
trait TileOps {
    /// `ldtilecfg [cfg]`.
    unsafe fn config(&mut self, cfg: &[u8; 64]);
    /// `tilezero tmmT`.
    unsafe fn zero<const T: u8>(&mut self);
    /// `tileloadd tmmT, [src + stride * row]`.
    unsafe fn load<const T: u8>(&mut self, src: *const u8, stride: usize);
    /// `tdpbssd tmmC, tmmA, tmmB`.
    unsafe fn dot<const C: u8, const A: u8, const B: u8>(&mut self);
    /// `tilestored [dst + stride * row], tmmT`.
    unsafe fn store<const T: u8>(&mut self, dst: *mut u8, stride: usize);
    /// `tilerelease`.
    unsafe fn release(&mut self);
}

/// The instructions themselves. The tile registers are invisible to the compiler (it has no
/// tile register class and emits no AMX code), so state carried from one `asm!` block to the
/// next survives; no block is `pure`, so they stay in program order.
struct Hw;

impl TileOps for Hw {
    #[inline(always)]
    unsafe fn config(&mut self, cfg: &[u8; 64]) {
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) cfg.as_ptr(),
                options(readonly, nostack, preserves_flags));
        }
    }
    #[inline(always)]
    unsafe fn zero<const T: u8>(&mut self) {
        unsafe { asm!("tilezero tmm{t}", t = const T, options(nomem, nostack, preserves_flags)) }
    }
    #[inline(always)]
    unsafe fn load<const T: u8>(&mut self, src: *const u8, stride: usize) {
        // The stride is the SIB index register: tileloadd has no other addressing form.
        unsafe {
            asm!("tileloadd tmm{t}, [{p} + {s}*1]",
                t = const T, p = in(reg) src, s = in(reg) stride,
                options(readonly, nostack, preserves_flags));
        }
    }
    #[inline(always)]
    unsafe fn dot<const C: u8, const A: u8, const B: u8>(&mut self) {
        unsafe {
            asm!("tdpbssd tmm{c}, tmm{a}, tmm{b}", c = const C, a = const A, b = const B,
                options(nomem, nostack, preserves_flags));
        }
    }
    #[inline(always)]
    unsafe fn store<const T: u8>(&mut self, dst: *mut u8, stride: usize) {
        unsafe {
            asm!("tilestored [{p} + {s}*1], tmm{t}",
                t = const T, p = in(reg) dst, s = in(reg) stride,
                options(nostack, preserves_flags));
        }
    }
    #[inline(always)]
    unsafe fn release(&mut self) {
        unsafe { asm!("tilerelease", options(nomem, nostack, preserves_flags)) }
    }
}

/// The kernel `tile_dispatch` runs for `Path::Amx` (the tests' emulator when they turn it on).
pub(super) unsafe fn tile(
    a: Acts,
    w: WeightView<'_>,
    r0: usize,
    r1: usize,
    p0: usize,
    p1: usize,
    out: Out,
) {
    #[cfg(test)]
    if tests::emulating() {
        return unsafe { drive::<_, f32>(&mut tests::Emu::new(), a, &w, r0, r1, p0, p1, out) };
    }
    unsafe { tile_hw(a, w, r0, r1, p0, p1, out) }
}

#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn tile_hw(
    a: Acts,
    w: WeightView<'_>,
    r0: usize,
    r1: usize,
    p0: usize,
    p1: usize,
    out: Out,
) {
    unsafe { drive::<_, F512>(&mut Hw, a, &w, r0, r1, p0, p1, out) }
}

/// The quantizer for `Path::Amx`: AVX-512, signed bytes.
pub(super) unsafe fn quantize(x: &[f32], input: InputQuant<'_>, k: usize, out: QuantRows<'_>) {
    #[cfg(test)]
    if tests::emulating() {
        return unsafe { super::quantize_v::<f32>(x, input, k, out, 0) };
    }
    unsafe { x86::quantize_avx512(x, input, k, out, 0) }
}

thread_local! {
    /// Row blocks zero-padded to whole tiles (a last block of fewer than 32 rows, or K not a
    /// multiple of 64), per thread and reused: the tile loop allocates nothing once warm.
    /// Taken and put back rather than borrowed in a closure, which would not inherit the
    /// caller's target features.
    static STAGED: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// Rows `r0..r1` x panels `p0..p1` on the tile instructions `ops`, results through the shared
/// epilogue at width `T`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn drive<O: TileOps, T: V>(
    ops: &mut O,
    a: Acts,
    w: &WeightView<'_>,
    r0: usize,
    r1: usize,
    p0: usize,
    p1: usize,
    out: Out,
) {
    let k4 = w.k4();
    let panel = k4 * PANEL;
    let steps = k4.div_ceil(COLSB);
    // K steps whose B tile lies whole in the panel, and the bytes of the partial one.
    let whole = k4 / COLSB;
    let tail = panel - whole * B_TILE;
    let padded = steps * COLSB;
    let mut staged = STAGED.take();
    let mut b_tail = [[0u8; B_TILE]; 2];
    let mut c = [0i32; ROWS * PANEL];
    unsafe {
        ops.config(&TILE_CFG);
        for rb in (r0..r1).step_by(2 * ROWS) {
            let mr = (r1 - rb).min(2 * ROWS);
            let two_a = mr > ROWS;
            let (a0, lda) = if mr == 2 * ROWS && k4 == padded {
                (a.bytes.add(rb * k4), k4)
            } else {
                staged.clear();
                staged.resize(mr.next_multiple_of(ROWS) * padded, 0u8);
                for (i, row) in staged.chunks_exact_mut(padded).take(mr).enumerate() {
                    std::ptr::copy_nonoverlapping(a.bytes.add((rb + i) * k4), row.as_mut_ptr(), k4);
                }
                (staged.as_ptr(), padded)
            };
            for p in (p0..p1).step_by(2) {
                let two_b = p + 1 < p1;
                let b0 = w.packed.as_ptr().add(p * panel);
                if tail > 0 {
                    for (j, t) in b_tail.iter_mut().enumerate().take(1 + two_b as usize) {
                        let src = b0.add(j * panel + whole * B_TILE);
                        std::ptr::copy_nonoverlapping(src, t.as_mut_ptr(), tail);
                    }
                }
                ops.zero::<0>();
                ops.zero::<1>();
                ops.zero::<2>();
                ops.zero::<3>();
                for s in 0..steps {
                    let b = |j: usize| {
                        if s < whole {
                            b0.add(j * panel + s * B_TILE)
                        } else {
                            b_tail[j].as_ptr()
                        }
                    };
                    ops.load::<4>(a0.add(s * COLSB), lda);
                    ops.load::<6>(b(0), COLSB);
                    ops.dot::<0, 4, 6>();
                    if two_b {
                        ops.load::<7>(b(1), COLSB);
                        ops.dot::<1, 4, 7>();
                    }
                    if two_a {
                        ops.load::<5>(a0.add(ROWS * lda + s * COLSB), lda);
                        ops.dot::<2, 5, 6>();
                        if two_b {
                            ops.dot::<3, 5, 7>();
                        }
                    }
                }
                let top = mr.min(ROWS);
                ops.store::<0>(c.as_mut_ptr().cast(), COLSB);
                finish::<T>(&c, a, w, rb, top, p, out);
                if two_b {
                    ops.store::<1>(c.as_mut_ptr().cast(), COLSB);
                    finish::<T>(&c, a, w, rb, top, p + 1, out);
                }
                if two_a {
                    ops.store::<2>(c.as_mut_ptr().cast(), COLSB);
                    finish::<T>(&c, a, w, rb + ROWS, mr - ROWS, p, out);
                    if two_b {
                        ops.store::<3>(c.as_mut_ptr().cast(), COLSB);
                        finish::<T>(&c, a, w, rb + ROWS, mr - ROWS, p + 1, out);
                    }
                }
            }
        }
        ops.release();
    }
    STAGED.set(staged);
}

/// The first `rows` rows of a stored C tile (rows `row..` x panel `p`): the zero-point
/// correction, then the i32 store or the shared epilogue, as on every other path.
#[inline(always)]
unsafe fn finish<T: V>(
    c: &[i32; ROWS * PANEL],
    a: Acts,
    w: &WeightView<'_>,
    row: usize,
    rows: usize,
    p: usize,
    out: Out,
) {
    let n0 = p * PANEL;
    let nv = (w.n - n0).min(PANEL);
    let sums = &w.row_sums[n0..n0 + PANEL];
    for (i, acc) in c.chunks_exact(PANEL).take(rows).enumerate() {
        let r = row + i;
        let zero = unsafe { *a.zero.add(r) };
        let mut v = [0i32; PANEL];
        for ((v, &acc), &s) in v.iter_mut().zip(acc).zip(sums) {
            *v = acc - zero * s;
        }
        match out {
            Out::I32 { ptr } => unsafe {
                std::ptr::copy_nonoverlapping(v.as_ptr(), ptr.get().add(r * w.n + n0), nv)
            },
            Out::F32 { .. } => {
                let f = v.map(|v| v as f32);
                for q in (0..nv).step_by(T::W) {
                    let acc_f = unsafe { T::load(f.as_ptr().add(q)) };
                    unsafe { epilogue::<T>(acc_f, r, n0 + q, (nv - q).min(T::W), w, out) };
                }
            }
        }
    }
}

/// Whether `Path::Amx` may run: [`status`] is `Ok` (or a test turned the emulator on).
pub(crate) fn available() -> bool {
    #[cfg(test)]
    if tests::emulating() {
        return true;
    }
    status().is_ok()
}

/// Whether this process can use AMX, decided once: the CPU's features, the kernel's grant of
/// the tile state, then a known-answer self-check on the instructions. `Err` says why not.
pub(crate) fn status() -> Result<(), &'static str> {
    static STATUS: OnceLock<Result<(), String>> = OnceLock::new();
    STATUS
        .get_or_init(|| {
            detect()?;
            self_check(tile_hw).map_err(|e| {
                let why = format!("AMX self-check against the scalar kernel failed: {e}");
                eprintln!("qmodel-kernels: {why}; not using the amx path");
                why
            })
        })
        .as_ref()
        .map(|_| ())
        .map_err(String::as_str)
}

/// CPU, OS and kernel support (everything but the self-check).
fn detect() -> Result<(), String> {
    use std::arch::x86_64::{__cpuid_count, __get_cpuid_max, _xgetbv};
    // `is_x86_feature_detected!("amx-int8")` is unstable (x86_amx_intrinsics): raw cpuid.
    let max_leaf = __get_cpuid_max(0).0;
    let leaf = __cpuid_count;
    let edx7 = if max_leaf >= 7 { leaf(7, 0).edx } else { 0 };
    if edx7 & 1 << 24 == 0 {
        return Err("CPU lacks AMX-TILE (cpuid 7.0 edx bit 24)".into());
    }
    if edx7 & 1 << 25 == 0 {
        return Err("CPU lacks AMX-INT8 (cpuid 7.0 edx bit 25)".into());
    }
    if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")) {
        return Err("CPU lacks AVX-512 F/BW (the AMX path's quantizer and epilogue)".into());
    }
    // TILE_CFG's shapes must fit palette 1 (cpuid 0x1d.1) and the TMUL unit (cpuid 0x1e.0).
    if max_leaf < 0x1e || leaf(0x1d, 0).eax < 1 {
        return Err("CPU reports no AMX palette 1 (cpuid 0x1d)".into());
    }
    let (palette, tmul) = (leaf(0x1d, 1), leaf(0x1e, 0));
    let (row_bytes, names, max_rows) = (palette.ebx & 0xffff, palette.ebx >> 16, palette.ecx);
    let (max_k, max_n) = (tmul.ebx & 0xff, (tmul.ebx >> 8) & 0xffff);
    if row_bytes < 64 || names < 8 || max_rows & 0xffff < 16 || max_k < 16 || max_n < 64 {
        return Err(format!(
            "AMX palette 1 / TMUL smaller than 8 tiles of 16 x 64 bytes (cpuid 0x1d.1 ebx \
             {:#x} ecx {max_rows:#x}, 0x1e.0 ebx {:#x})",
            palette.ebx, tmul.ebx
        ));
    }
    // SAFETY: AVX-512 was detected, which needs OSXSAVE, so xgetbv exists.
    let xcr0 = unsafe { _xgetbv(0) };
    if xcr0 & 3 << 17 != 3 << 17 {
        return Err(format!(
            "the OS does not enable the AMX tile state (XCR0 {xcr0:#x}, bits 17/18)"
        ));
    }
    request_tile_permission()
}

/// Linux hands out the 8 KiB tile state only on request (process-wide, once).
#[cfg(target_os = "linux")]
fn request_tile_permission() -> Result<(), String> {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_GET_XCOMP_PERM: u64 = 0x1022;
    const ARCH_REQ_XCOMP_PERM: u64 = 0x1023;
    const XFEATURE_XTILEDATA: u64 = 18;
    /// `arch_prctl(code, arg)`: 0 or `-errno` (raw: the crate has no libc dependency).
    unsafe fn arch_prctl(code: u64, arg: u64) -> i64 {
        let ret;
        unsafe {
            asm!("syscall",
                inlateout("rax") SYS_ARCH_PRCTL => ret, in("rdi") code, in("rsi") arg,
                lateout("rcx") _, lateout("r11") _, options(nostack));
        }
        ret
    }
    // SAFETY: the request only reads its arguments.
    let r = unsafe { arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) };
    if r != 0 {
        let hint = match -r {
            22 => ": EINVAL, a kernel before 5.16 or AMX disabled",
            28 => ": ENOSPC, a thread's sigaltstack is too small for the tile state",
            _ => "",
        };
        return Err(format!(
            "kernel refused ARCH_REQ_XCOMP_PERM (errno {}{hint})",
            -r
        ));
    }
    let mut perm = 0u64;
    // SAFETY: the kernel writes the permitted feature mask to `perm`.
    let r = unsafe { arch_prctl(ARCH_GET_XCOMP_PERM, &mut perm as *mut u64 as u64) };
    if r != 0 || perm & 1 << XFEATURE_XTILEDATA == 0 {
        return Err(format!(
            "kernel did not grant the tile state (ARCH_GET_XCOMP_PERM: {r}, mask {perm:#x})"
        ));
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn request_tile_permission() -> Result<(), String> {
    Err("the AMX tile state is only requested on Linux".into())
}

/// A tile kernel with `tile_dispatch`'s signature.
type TileFn = unsafe fn(Acts, WeightView<'_>, usize, usize, usize, usize, Out);

/// Runs one small known-answer product through `kernel` and the scalar kernel: every i32,
/// then every f32 bit with bias and GELU. 19 rows (a whole A tile and a row tail), k = 100 (a
/// whole K step and a tail), 20 channels (a panel pair, the second partial), bytes over
/// [-128, 127], zero points 0 and not.
fn self_check(kernel: TileFn) -> Result<(), String> {
    let (rows, k, n) = (19, 100, 20);
    let k4 = k4_of(k);
    let q: Vec<i8> = (0..n * k)
        .map(|i| ((i * 37 % 255) as i32 - 127) as i8)
        .collect();
    let scales: Vec<f32> = (0..n).map(|c| 0.01 + c as f32 * 1e-3).collect();
    let qw = QuantizedWeight::from_int8(&q, &scales, n, k).expect("values in range");
    let w = qw.view();
    let bytes: Vec<u8> = (0..rows * k4).map(|i| (i * 101 % 256) as u8).collect();
    let zero: Vec<i32> = (0..rows as i32).map(|r| (r % 3) * (r * 7 - 60)).collect();
    let sx: Vec<f32> = (0..rows).map(|r| 1e-3 * (r + 1) as f32).collect();
    let bias: Vec<f32> = (0..n).map(|c| c as f32 * 0.01 - 0.1).collect();
    let acts = Acts {
        bytes: bytes.as_ptr(),
        zero: zero.as_ptr(),
    };
    let np = w.n_panels();
    let (mut want, mut got) = (vec![0i32; rows * n], vec![0i32; rows * n]);
    for (k_fn, y) in [(tile_scalar as TileFn, &mut want), (kernel, &mut got)] {
        let out = Out::I32 {
            ptr: SyncPtr(y.as_mut_ptr()),
        };
        // SAFETY: `acts` holds `rows` rows of `k4` bytes, `y` `rows * n` outputs.
        unsafe { k_fn(acts, w, 0, rows, 0, np, out) };
    }
    if let Some(i) = (0..want.len()).find(|&i| want[i] != got[i]) {
        return Err(format!(
            "i32 [{}][{}]: {} instead of {}",
            i / n,
            i % n,
            got[i],
            want[i]
        ));
    }
    let (mut want, mut got) = (vec![0f32; rows * n], vec![0f32; rows * n]);
    for (k_fn, y) in [(tile_scalar as TileFn, &mut want), (kernel, &mut got)] {
        let out = Out::F32 {
            ptr: SyncPtr(y.as_mut_ptr()),
            sx: sx.as_ptr(),
            bias: bias.as_ptr(),
            act: Activation::Gelu,
        };
        // SAFETY: as above; `sx` has `rows` scales, `bias` `n` values.
        unsafe { k_fn(acts, w, 0, rows, 0, np, out) };
    }
    match (0..want.len()).find(|&i| want[i].to_bits() != got[i].to_bits()) {
        Some(i) => Err(format!(
            "f32 [{}][{}]: {:e} instead of {:e}",
            i / n,
            i % n,
            got[i],
            want[i]
        )),
        None => Ok(()),
    }
}

/// Multiply-accumulates per [`peak_tdp`] iteration: four `tdpbssd`, each 16 rows x 16
/// channels x 64 k.
pub(crate) const PEAK_MACS_PER_ITER: u64 = 4 * (ROWS * PANEL * COLSB) as u64;

/// The AMX int8 peak loop: `iters` x 4 independent `tdpbssd` (C tmm0-3 from A tmm4/5 and B
/// tmm6/7, every byte of A `a` and of B `b`), nothing but tile registers inside the loop.
/// Returns the wrapping sum of every accumulator lane: `iters * PEAK_MACS_PER_ITER * a * b`.
///
/// # Safety
/// `Path::Amx` must be supported.
pub(crate) unsafe fn peak_tdp(iters: u64, a: i8, b: i8) -> i32 {
    unsafe { peak_loop(&mut Hw, iters, a, b) }
}

#[inline(always)]
unsafe fn peak_loop<O: TileOps>(ops: &mut O, iters: u64, a: i8, b: i8) -> i32 {
    let (va, vb) = ([a as u8; B_TILE], [b as u8; B_TILE]);
    let mut c = [0i32; 4 * ROWS * PANEL];
    unsafe {
        ops.config(&TILE_CFG);
        ops.zero::<0>();
        ops.zero::<1>();
        ops.zero::<2>();
        ops.zero::<3>();
        ops.load::<4>(va.as_ptr(), COLSB);
        ops.load::<5>(va.as_ptr(), COLSB);
        ops.load::<6>(vb.as_ptr(), COLSB);
        ops.load::<7>(vb.as_ptr(), COLSB);
        for _ in 0..iters {
            ops.dot::<0, 4, 6>();
            ops.dot::<1, 4, 7>();
            ops.dot::<2, 5, 6>();
            ops.dot::<3, 5, 7>();
        }
        let cp = c.as_mut_ptr().cast::<u8>();
        ops.store::<0>(cp, COLSB);
        ops.store::<1>(cp.add(B_TILE), COLSB);
        ops.store::<2>(cp.add(2 * B_TILE), COLSB);
        ops.store::<3>(cp.add(3 * B_TILE), COLSB);
        ops.release();
    }
    c.iter().fold(0, |s, &v| s.wrapping_add(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Exec, Path, ThreadPool, gemm_i32_with, linear_quant_with};
    use std::cell::Cell;

    thread_local! {
        static EMULATING: Cell<bool> = const { Cell::new(false) };
        /// `tdpbssd`s the emulator ran on this thread.
        static DOTS: Cell<u64> = const { Cell::new(0) };
    }

    /// Whether this thread runs `Path::Amx` on [`Emu`] (set only by [`emulated`]).
    pub(super) fn emulating() -> bool {
        EMULATING.get()
    }

    /// Runs `f` with `Path::Amx` on the emulator, on this thread only: give `Exec` a 1-thread
    /// pool.
    fn emulated(f: impl FnOnce()) {
        struct Off;
        impl Drop for Off {
            fn drop(&mut self) {
                EMULATING.set(false);
            }
        }
        EMULATING.set(true);
        let _off = Off;
        f();
    }

    /// Plain-Rust model of the tile instructions after the SDM's pseudo-code (palette 1:
    /// 8 tiles of up to 16 rows x 64 bytes). A fault (#GP, #UD) is a panic.
    pub(super) struct Emu {
        /// (rows, colsb) of each tile; `None` in the init state (no `ldtilecfg` yet, or after
        /// `tilerelease`).
        shapes: Option<[(usize, usize); 8]>,
        tiles: [[[u8; COLSB]; ROWS]; 8],
        /// `dot` runs `tdpbusd` (A unsigned) instead of `tdpbssd`: a kernel reading the
        /// activations in the wrong encoding, for the self-check to catch.
        unsigned_a: bool,
        /// Addresses no load may touch: a test's data outside the block a call was given.
        fence: Vec<std::ops::Range<usize>>,
    }

    impl Emu {
        pub(super) fn new() -> Emu {
            Emu {
                shapes: None,
                tiles: [[[0; COLSB]; ROWS]; 8],
                unsigned_a: false,
                fence: Vec::new(),
            }
        }

        /// A configured tile's (rows, colsb); #UD otherwise.
        fn shape(&self, t: u8) -> (usize, usize) {
            let s = self
                .shapes
                .expect("#UD: tile instruction in the init state")[t as usize];
            assert!(s.0 > 0, "#UD: tmm{t} is not configured");
            s
        }
    }

    impl TileOps for Emu {
        unsafe fn config(&mut self, cfg: &[u8; 64]) {
            // LDTILECFG: palette 0 is the init state; every field checked before any is used.
            match cfg[0] {
                0 => return unsafe { self.release() },
                1 => {}
                p => panic!("#GP: palette {p}"),
            }
            assert!(cfg[2..16].iter().all(|&b| b == 0), "#GP: reserved bytes");
            let mut shapes = [(0, 0); 8];
            for t in 0..16 {
                let colsb = u16::from_le_bytes([cfg[16 + 2 * t], cfg[17 + 2 * t]]) as usize;
                let rows = cfg[48 + t] as usize;
                if t >= 8 {
                    assert!(colsb == 0 && rows == 0, "#GP: tile {t} beyond palette 1");
                    continue;
                }
                assert!(
                    colsb <= COLSB && rows <= ROWS,
                    "#GP: tmm{t} {rows} x {colsb}"
                );
                assert_eq!(colsb == 0, rows == 0, "#GP: tmm{t} half configured");
                shapes[t] = (rows, colsb);
            }
            // A restarted load would resume at start_row; nothing here is restarted.
            assert_eq!(cfg[1], 0, "start_row");
            self.shapes = Some(shapes);
            self.tiles = [[[0; COLSB]; ROWS]; 8];
        }

        unsafe fn zero<const T: u8>(&mut self) {
            self.shape(T);
            self.tiles[T as usize] = [[0; COLSB]; ROWS];
        }

        unsafe fn load<const T: u8>(&mut self, src: *const u8, stride: usize) {
            let (rows, colsb) = self.shape(T);
            let tile = &mut self.tiles[T as usize];
            // write_row_and_zero for each configured row, zero_upper_rows for the rest.
            *tile = [[0; COLSB]; ROWS];
            for (r, row) in tile.iter_mut().enumerate().take(rows) {
                let at = src as usize + r * stride;
                let outside = self
                    .fence
                    .iter()
                    .any(|f| at < f.end && f.start < at + colsb);
                assert!(
                    !outside,
                    "tileloadd tmm{T} row {r} reads {at:#x}, outside its block"
                );
                unsafe {
                    std::ptr::copy_nonoverlapping(src.add(r * stride), row.as_mut_ptr(), colsb)
                };
            }
        }

        unsafe fn dot<const C: u8, const A: u8, const B: u8>(&mut self) {
            DOTS.set(DOTS.get() + 1);
            let (c, a, b) = (self.shape(C), self.shape(A), self.shape(B));
            // AMX-E4 #UD conditions.
            assert!(C != A && C != B && A != B, "#UD: tile operands must differ");
            assert_eq!(c.1, b.1, "#UD: C.colsb != B.colsb");
            assert_eq!(c.0, a.0, "#UD: C.rows != A.rows");
            assert_eq!(a.1 / 4, b.0, "#UD: A.colsb / 4 != B.rows");
            assert!(
                c.1 % 4 == 0 && a.1 % 4 == 0,
                "#UD: colsb not a multiple of 4"
            );
            let dword =
                |t: &[u8; COLSB], i: usize| [t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3]];
            let (ta, tb) = (self.tiles[A as usize], self.tiles[B as usize]);
            let unsigned_a = self.unsigned_a;
            let tc = &mut self.tiles[C as usize];
            for m in 0..c.0 {
                let mut tmp: [i32; ROWS] =
                    std::array::from_fn(|n| i32::from_le_bytes(dword(&tc[m], n)));
                for (k, b_row) in tb.iter().enumerate().take(a.1 / 4) {
                    let x = dword(&ta[m], k);
                    for (n, acc) in tmp.iter_mut().enumerate().take(c.1 / 4) {
                        // DPBD: four byte products, each extended to 32 bits, summed into
                        // the dword (wrapping: no saturation).
                        for (&x, y) in x.iter().zip(dword(b_row, n)) {
                            let x = if unsigned_a { x as i32 } else { x as i8 as i32 };
                            *acc = acc.wrapping_add(x * y as i8 as i32);
                        }
                    }
                }
                // write_row_and_zero(C, m, tmp, C.colsb)
                tc[m] = [0; COLSB];
                for n in 0..c.1 / 4 {
                    tc[m][4 * n..4 * n + 4].copy_from_slice(&tmp[n].to_le_bytes());
                }
            }
            // zero_upper_rows(C, C.rows)
            tc[c.0..].fill([0; COLSB]);
        }

        unsafe fn store<const T: u8>(&mut self, dst: *mut u8, stride: usize) {
            let (rows, colsb) = self.shape(T);
            for (r, row) in self.tiles[T as usize].iter().enumerate().take(rows) {
                unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), dst.add(r * stride), colsb) };
            }
        }

        unsafe fn release(&mut self) {
            self.shapes = None;
            self.tiles = [[[0; COLSB]; ROWS]; 8];
        }
    }

    /// splitmix64 bytes.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn f32(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }
        fn i8(&mut self) -> i8 {
            self.next() as i8
        }
    }

    /// The emulator against the SDM's definition written out directly:
    /// `C[m][n] += sum_k sum_t A[m][4k + t] * B[k][4n + t]`, signed bytes.
    #[test]
    fn emulated_tdpbssd_is_the_sdm_product() {
        let mut rng = Rng(1);
        let a: Vec<u8> = (0..B_TILE).map(|_| rng.next() as u8).collect();
        let b: Vec<u8> = (0..B_TILE).map(|_| rng.next() as u8).collect();
        let c0: Vec<i32> = (0..ROWS * PANEL).map(|_| rng.next() as i32 >> 8).collect();
        let mut emu = Emu::new();
        let mut got = c0.clone();
        unsafe {
            emu.config(&TILE_CFG);
            emu.load::<0>(got.as_ptr() as *const u8, COLSB);
            emu.load::<4>(a.as_ptr(), COLSB);
            emu.load::<6>(b.as_ptr(), COLSB);
            emu.dot::<0, 4, 6>();
            emu.store::<0>(got.as_mut_ptr() as *mut u8, COLSB);
        }
        for m in 0..ROWS {
            for n in 0..PANEL {
                let dot: i32 = (0..64)
                    .map(|kk| {
                        a[m * 64 + kk] as i8 as i32 * b[kk / 4 * 64 + 4 * n + kk % 4] as i8 as i32
                    })
                    .sum();
                assert_eq!(got[m * PANEL + n], c0[m * PANEL + n] + dot, "[{m}][{n}]");
            }
        }
    }

    #[test]
    #[should_panic(expected = "#UD: A.colsb / 4 != B.rows")]
    fn emulator_faults_on_mismatched_shapes() {
        let mut cfg = TILE_CFG;
        cfg[48 + 6] = 8; // B: 8 rows for a 64-byte A
        let mut emu = Emu::new();
        unsafe {
            emu.config(&cfg);
            emu.dot::<0, 4, 6>();
        }
    }

    #[test]
    #[should_panic(expected = "#UD: tile instruction in the init state")]
    fn emulator_faults_after_release() {
        let mut emu = Emu::new();
        unsafe {
            emu.config(&TILE_CFG);
            emu.release();
            emu.zero::<0>();
        }
    }

    /// (rows, k, n): row tails (1-15, 17-31, 33+ rows, two 64-row tasks), K tails (k < 64,
    /// k4 not a multiple of 64, k not a multiple of 4) and whole K steps, n not a multiple of
    /// 16 or 32, an odd number of panels; the last two are split over threads (by channels,
    /// by rows) where the pool has several.
    const SHAPES: &[(usize, usize, usize)] = &[
        (1, 1, 1),
        (3, 31, 17),
        (16, 64, 16),
        (17, 100, 33),
        (32, 128, 32),
        (31, 63, 47),
        (40, 384, 50),
        (70, 130, 64),
        (64, 256, 48),
        (5, 1536, 20),
        (100, 256, 160),
        (400, 64, 96),
    ];

    /// `Path::Amx` (emulated or not, as the caller set up) against `Path::Scalar` through the
    /// public entry points: exact i32 sums, then `linear` bits for symmetric and asymmetric
    /// rows (mixed in one batch: zero rows, one-sided rows), with and without GELU.
    fn amx_matches_scalar(pool: &ThreadPool) {
        let (amx, scalar) = (
            Exec {
                path: Path::Amx,
                pool,
            },
            Exec {
                path: Path::Scalar,
                pool,
            },
        );
        let mut rng = Rng(2);
        for &(rows, k, n) in SHAPES {
            let w: Vec<f32> = (0..n * k).map(|_| rng.f32() * 0.1).collect();
            let qw = QuantizedWeight::from_f32(&w, n, k);
            // Extremes included: +-127 on both sides.
            let xq: Vec<i8> = (0..rows * k)
                .map(|i| match i % 7 {
                    0 => 127,
                    1 => -127,
                    _ => rng.i8().max(-127),
                })
                .collect();
            let (mut want, mut got) = (vec![0i32; rows * n], vec![0i32; rows * n]);
            gemm_i32_with(&scalar, &xq, rows, &qw, &mut want);
            gemm_i32_with(&amx, &xq, rows, &qw, &mut got);
            assert_eq!(got, want, "i32 {rows}x{k}->{n}");

            let x: Vec<f32> = (0..rows * k)
                .map(|i| match (i / k) % 4 {
                    0 => rng.f32() * 3.0,
                    1 => rng.f32().abs() + 0.25,
                    2 => 0.0,
                    _ => crate::gelu_scalar(rng.f32() * 4.0),
                })
                .collect();
            let bias: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
            for asymmetric in [false, true] {
                for act in [Activation::None, Activation::Gelu] {
                    let input = InputQuant {
                        scale: None,
                        asymmetric,
                    };
                    let (mut want, mut got) = (vec![0f32; rows * n], vec![1f32; rows * n]);
                    let b = Some(&bias[..]);
                    linear_quant_with(&scalar, &x, input, rows, &qw, b, act, &mut want);
                    linear_quant_with(&amx, &x, input, rows, &qw, b, act, &mut got);
                    let same = want
                        .iter()
                        .zip(&got)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{rows}x{k}->{n} asymmetric {asymmetric} {act:?}");
                }
            }
        }
    }

    #[test]
    fn emulated_amx_matches_scalar() {
        emulated(|| amx_matches_scalar(&ThreadPool::new(1)));
        assert!(DOTS.get() > 0, "Path::Amx did not reach the tile driver");
    }

    /// The hardware path: the same checks on the instructions, on 3 threads (each task loads
    /// its own tile configuration). Skipped, with the reason, where AMX is not usable.
    #[test]
    fn hardware_amx_matches_scalar() {
        if let Err(why) = status() {
            eprintln!("AMX test skipped: {why}");
            return;
        }
        amx_matches_scalar(&ThreadPool::new(3));
        eprintln!("AMX hardware path matches the scalar path");
    }

    /// The driver on sub-blocks as thread-pool tasks split the work (a row range not starting
    /// at a tile boundary, a 32-row block ending at the range's end, a panel range starting at
    /// an odd panel), non-zero zero points, against the scalar kernel; and no load touches
    /// rows or panels outside its block, nor the bytes after the last row or panel.
    #[test]
    fn emulated_driver_on_sub_blocks_reads_only_its_block() {
        let mut rng = Rng(3);
        let (rows, k, n) = (45, 200, 83);
        let q: Vec<i8> = (0..n * k).map(|_| rng.i8().max(-127)).collect();
        let qw = QuantizedWeight::from_int8(&q, &vec![1.0; n], n, k).unwrap();
        let (k4, np) = (k4_of(k), qw.view().n_panels());
        let panel = k4 * PANEL;
        // Both operands with 1 KiB of our own after them, so an over-read hits a fence.
        let packed = [qw.view().packed, &[0; B_TILE]].concat();
        let w = WeightView {
            packed: &packed[..np * panel],
            ..qw.view()
        };
        let bytes: Vec<u8> = (0..rows * k4 + B_TILE)
            .map(|i| {
                if i % k4 < k && i < rows * k4 {
                    rng.next() as u8
                } else {
                    0
                }
            })
            .collect();
        let zero: Vec<i32> = (0..rows).map(|_| (rng.next() % 256) as i32 - 128).collect();
        let acts = Acts {
            bytes: bytes.as_ptr(),
            zero: zero.as_ptr(),
        };
        let (mut want, mut got) = (vec![0i32; rows * n], vec![0i32; rows * n]);
        let out = |y: &mut Vec<i32>| Out::I32 {
            ptr: SyncPtr(y.as_mut_ptr()),
        };
        unsafe { tile_scalar(acts, w, 0, rows, 0, np, out(&mut want)) };
        let (a, b) = (bytes.as_ptr() as usize, packed.as_ptr() as usize);
        for (r0, r1) in [(0, 5), (5, 37), (37, 45)] {
            for (p0, p1) in [(0, 1), (1, 4), (4, np)] {
                let mut emu = Emu::new();
                emu.fence = vec![
                    a..a + r0 * k4,
                    a + r1 * k4..a + bytes.len(),
                    b..b + p0 * panel,
                    b + p1 * panel..b + packed.len(),
                ];
                unsafe { drive::<_, f32>(&mut emu, acts, &w, r0, r1, p0, p1, out(&mut got)) };
            }
        }
        assert_eq!(got, want);
    }

    #[test]
    fn self_check_passes_a_right_kernel_and_fails_a_wrong_one() {
        emulated(|| assert_eq!(self_check(tile), Ok(())));
        unsafe fn wrong(
            a: Acts,
            w: WeightView<'_>,
            r0: usize,
            r1: usize,
            p0: usize,
            p1: usize,
            out: Out,
        ) {
            let mut emu = Emu::new();
            emu.unsigned_a = true;
            unsafe { drive::<_, f32>(&mut emu, a, &w, r0, r1, p0, p1, out) }
        }
        let err = self_check(wrong).unwrap_err();
        assert!(err.starts_with("i32 ["), "{err}");
    }

    #[test]
    fn emulated_peak_loop_sums() {
        for (iters, a, b) in [(1, 3, -2), (5, -128, 127), (3, 127, -128)] {
            let want = (iters * PEAK_MACS_PER_ITER).wrapping_mul((a as i64 * b as i64) as u64);
            assert_eq!(
                unsafe { peak_loop(&mut Emu::new(), iters, a, b) },
                want as i32
            );
        }
    }
}
