//! Measured int8 peak of a kernel path on the machine it runs on.
//!
//! [`measure_peak`] times an in-register loop of the path's int8 multiply-accumulate
//! instructions, with enough independent accumulators to hide their latency, on `threads`
//! threads at once (so a 2-thread figure on a 2-vCPU VM whose vCPUs are SMT siblings of one
//! core comes out near the 1-thread one, as it should). It is the denominator of "fraction of
//! peak" figures: what the hardware does with these instructions and nothing else (no loads,
//! no packing, no epilogue), not a datasheet number.
//!
//! | path | instructions timed | MACs per instruction (group) |
//! |---|---|---|
//! | [`Path::Amx`] | `tdpbssd` on 16 x 64-byte tiles, 4 accumulator tiles | 16,384 |
//! | [`Path::Avx512Vnni`] | `vpdpbusd` zmm, 24 accumulators | 64 |
//! | [`Path::Avx2`] | `vpmaddubsw` + `vpmaddwd` (by ones) + `vpaddd` ymm, 8 accumulators | 32 per triple |
//! | [`Path::NeonDot`] | `sdot` (vector form), 24 accumulators | 16 |
//! | [`Path::NeonI8mm`] | `smmla`, 24 accumulators | 32 |
//!
//! The AVX2 triple is the cheapest exact int8 sequence on AVX2 (ONNX Runtime's MLAS uses the
//! same); our AVX2 kernel adds a `vpsignb` per product on top of it. Other paths (the scalar
//! one, paths this CPU or architecture lacks) have no peak: [`measure_peak`] returns `None`. The scalar kernel is whatever the
//! compiler made of plain Rust, so a hand-picked instruction loop would not be its ceiling.
//!
//! The loops are inline assembly (the compiler can neither hoist nor drop them), and each
//! checks its result: every accumulator lane sums to exactly `MACs x a x b` (wrapping i32) for
//! the broadcast bytes `a`, `b`, so an instruction that did not run is a panic, not a fast
//! figure.

use crate::Path;
use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// A measured int8 peak: [`measure_peak`]'s answer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Peak {
    /// The path measured.
    pub path: Path,
    /// Threads that ran the loop at once.
    pub threads: usize,
    /// The instructions timed, e.g. `"vpdpbusd zmm"`.
    pub instructions: &'static str,
    /// int8 GOP/s of all threads together, 2 ops per multiply-accumulate: the best rep.
    pub gops: f64,
    /// Reps timed.
    pub reps: usize,
}

/// Fewest and most timed reps of [`measure_peak`] (its budget decides in between).
const MIN_REPS: usize = 3;
const MAX_REPS: usize = 1000;
/// The broadcast bytes every loop multiplies (unsigned `A` where the instruction takes an
/// unsigned operand): small enough that `vpmaddubsw`'s i16 pair sums never saturate.
const A: i8 = 3;
const B: i8 = -2;

/// One path's loop: `run(iters, a, b)` runs `iters` iterations of `macs_per_iter`
/// multiply-accumulates of the broadcast bytes `a` and `b` and returns the wrapping sum of
/// every accumulator lane. Unsafe: the CPU must support the path.
struct Loop {
    instructions: &'static str,
    macs_per_iter: u64,
    run: unsafe fn(u64, i8, i8) -> i32,
}

impl Loop {
    /// The `run` of a path this CPU supports; `None` for paths without a peak loop.
    fn of(path: Path) -> Option<Loop> {
        if !path.is_supported() {
            return None;
        }
        match path {
            #[cfg(target_arch = "x86_64")]
            Path::Amx => Some(Loop {
                instructions: "tdpbssd 16x64 tiles",
                macs_per_iter: crate::gemm::amx::PEAK_MACS_PER_ITER,
                run: crate::gemm::amx::peak_tdp,
            }),
            #[cfg(target_arch = "x86_64")]
            Path::Avx512Vnni => Some(Loop {
                instructions: "vpdpbusd zmm",
                macs_per_iter: 24 * 64,
                run: x86::vnni,
            }),
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => Some(Loop {
                instructions: "vpmaddubsw+vpmaddwd+vpaddd ymm",
                macs_per_iter: 8 * 32,
                run: x86::avx2,
            }),
            #[cfg(target_arch = "aarch64")]
            Path::NeonDot => Some(Loop {
                instructions: "sdot",
                macs_per_iter: 24 * 16,
                run: arm::sdot,
            }),
            #[cfg(target_arch = "aarch64")]
            Path::NeonI8mm => Some(Loop {
                instructions: "smmla",
                macs_per_iter: 24 * 32,
                run: arm::smmla,
            }),
            // Scalar and the other architecture's paths.
            _ => None,
        }
    }

    /// Runs the loop once on this thread; panics unless every multiply-accumulate ran.
    fn run_checked(&self, iters: u64) {
        let iters = iters.max(1); // the loops run at least once
        // SAFETY: `Loop::of` only hands out loops of supported paths.
        let sum = unsafe { (self.run)(black_box(iters), black_box(A), black_box(B)) };
        let expected = (iters * self.macs_per_iter).wrapping_mul((A as i64 * B as i64) as u64);
        assert_eq!(
            black_box(sum),
            expected as i32,
            "{} peak loop: wrong accumulator sum",
            self.instructions
        );
    }

    /// Wall seconds for `threads` threads to each run `iters` iterations, started together by
    /// a barrier: the slowest thread's time (as a parallel kernel waits for its last tile).
    fn time(&self, iters: u64, threads: usize) -> f64 {
        let barrier = Barrier::new(threads);
        let one = || {
            barrier.wait();
            let started = Instant::now();
            self.run_checked(iters);
            started.elapsed().as_secs_f64()
        };
        std::thread::scope(|s| {
            let others: Vec<_> = (1..threads).map(|_| s.spawn(one)).collect();
            let mine = one();
            others
                .into_iter()
                .map(|h| h.join().expect("peak loop thread panicked"))
                .fold(mine, f64::max)
        })
    }
}

/// Measures `path`'s int8 peak with `threads` threads at once, for about `budget` (at least
/// 3 reps; the best one counts). `None` where the path has no peak loop: the scalar path,
/// paths this CPU lacks, paths of another architecture (see the module docs).
///
/// ```
/// use qmodel_kernels::{Path, measure_peak};
/// use std::time::Duration;
/// assert!(measure_peak(Path::Scalar, 1, Duration::from_millis(10)).is_none());
/// if let Some(peak) = measure_peak(Path::best(), 1, Duration::from_millis(30)) {
///     assert!(peak.gops > 0.0 && peak.reps >= 3);
/// }
/// ```
pub fn measure_peak(path: Path, threads: usize, budget: Duration) -> Option<Peak> {
    let kernel = Loop::of(path)?;
    let threads = threads.max(1);
    // Size a rep to ~1/10 of the budget (1-50 ms) from a 1-thread calibration.
    let target = (budget.as_secs_f64() / 10.0).clamp(1e-3, 0.05);
    let mut iters = 256u64;
    let per_iter = loop {
        let t = kernel.time(iters, 1);
        if t >= 2e-4 || iters >= 1 << 30 {
            break t / iters as f64;
        }
        iters *= 4;
    };
    let iters = ((target / per_iter) as u64).max(1);
    let (started, mut best, mut reps) = (Instant::now(), f64::INFINITY, 0);
    while reps < MIN_REPS || (started.elapsed() < budget && reps < MAX_REPS) {
        best = best.min(kernel.time(iters, threads));
        reps += 1;
    }
    let ops = 2.0 * (threads as u64 * iters * kernel.macs_per_iter) as f64;
    Some(Peak {
        path,
        threads,
        instructions: kernel.instructions,
        gops: ops / best / 1e9,
        reps,
    })
}

/// `concat!`s one line per register: `$pre $r $post`.
macro_rules! each {
    ($pre:literal, $post:literal; $($r:literal)*) => { concat!($($pre, $r, $post, "\n"),*) };
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;
    use std::arch::x86_64::*;

    /// 24 independent `vpdpbusd` chains in zmm0-23 (a in zmm30, unsigned; b in zmm31).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn vnni(iters: u64, a: i8, b: i8) -> i32 {
        let (va, vb) = (_mm512_set1_epi8(a), _mm512_set1_epi8(b));
        let sum: __m512i;
        // SAFETY: register-only arithmetic; every vector register is declared clobbered.
        unsafe {
            asm!(
                concat!(
                    each!("vpxord zmm", ", zmm0, zmm0"; 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15
                        16 17 18 19 20 21 22 23),
                    "2:\n",
                    each!("vpdpbusd zmm", ", zmm30, zmm31"; 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14
                        15 16 17 18 19 20 21 22 23),
                    "dec rcx\n",
                    "jnz 2b\n",
                    each!("vpaddd zmm0, zmm0, zmm", ""; 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16
                        17 18 19 20 21 22 23),
                ),
                inout("rcx") iters => _,
                in("zmm30") va,
                in("zmm31") vb,
                out("zmm0") sum,
                clobber_abi("C"),
                options(nomem, nostack),
            );
            _mm512_reduce_add_epi32(sum)
        }
    }

    /// 8 independent chains of `vpmaddubsw` (a in ymm13, unsigned; b in ymm14) + `vpmaddwd`
    /// by ones (ymm15) into a temporary (ymm8-11) + `vpaddd` into ymm0-7.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn avx2(iters: u64, a: i8, b: i8) -> i32 {
        let (va, vb, ones) = (
            _mm256_set1_epi8(a),
            _mm256_set1_epi8(b),
            _mm256_set1_epi16(1),
        );
        let sum: __m256i;
        // SAFETY: register-only arithmetic; every vector register is declared clobbered.
        unsafe {
            asm!(
                concat!(
                    each!("vpxor ymm", ", ymm0, ymm0"; 0 1 2 3 4 5 6 7),
                    "2:\n",
                    "vpmaddubsw ymm8, ymm13, ymm14\n",
                    "vpmaddwd ymm8, ymm8, ymm15\n",
                    "vpaddd ymm0, ymm0, ymm8\n",
                    "vpmaddubsw ymm9, ymm13, ymm14\n",
                    "vpmaddwd ymm9, ymm9, ymm15\n",
                    "vpaddd ymm1, ymm1, ymm9\n",
                    "vpmaddubsw ymm10, ymm13, ymm14\n",
                    "vpmaddwd ymm10, ymm10, ymm15\n",
                    "vpaddd ymm2, ymm2, ymm10\n",
                    "vpmaddubsw ymm11, ymm13, ymm14\n",
                    "vpmaddwd ymm11, ymm11, ymm15\n",
                    "vpaddd ymm3, ymm3, ymm11\n",
                    "vpmaddubsw ymm8, ymm13, ymm14\n",
                    "vpmaddwd ymm8, ymm8, ymm15\n",
                    "vpaddd ymm4, ymm4, ymm8\n",
                    "vpmaddubsw ymm9, ymm13, ymm14\n",
                    "vpmaddwd ymm9, ymm9, ymm15\n",
                    "vpaddd ymm5, ymm5, ymm9\n",
                    "vpmaddubsw ymm10, ymm13, ymm14\n",
                    "vpmaddwd ymm10, ymm10, ymm15\n",
                    "vpaddd ymm6, ymm6, ymm10\n",
                    "vpmaddubsw ymm11, ymm13, ymm14\n",
                    "vpmaddwd ymm11, ymm11, ymm15\n",
                    "vpaddd ymm7, ymm7, ymm11\n",
                    "dec rcx\n",
                    "jnz 2b\n",
                    each!("vpaddd ymm0, ymm0, ymm", ""; 1 2 3 4 5 6 7),
                ),
                inout("rcx") iters => _,
                in("ymm13") va,
                in("ymm14") vb,
                in("ymm15") ones,
                out("ymm0") sum,
                clobber_abi("C"),
                options(nomem, nostack),
            );
        }
        // SAFETY: a __m256i is 8 i32 lanes.
        let lanes: [i32; 8] = unsafe { std::mem::transmute(sum) };
        lanes.into_iter().fold(0, i32::wrapping_add)
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use std::arch::aarch64::*;
    use std::arch::asm;

    /// `$name(iters, a, b)`: 24 independent chains of `$instr<i>.4s, v24.16b, v25.16b` in
    /// v0-23 (`a` broadcast in v24, `b` in v25), then their lane sums.
    macro_rules! chains24 {
        ($(#[$doc:meta])* $name:ident, $features:literal, $instr:literal) => {
            $(#[$doc])*
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name(iters: u64, a: i8, b: i8) -> i32 {
                let (va, vb) = (vdupq_n_s8(a), vdupq_n_s8(b));
                let sum: int32x4_t;
                // SAFETY: register-only arithmetic; every vector register is declared
                // clobbered.
                unsafe {
                    asm!(
                        concat!(
                            each!("movi v", ".16b, #0"; 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16
                                17 18 19 20 21 22 23),
                            "2:\n",
                            each!($instr, ".4s, v24.16b, v25.16b"; 0 1 2 3 4 5 6
                                7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23),
                            "subs x9, x9, #1\n",
                            "b.ne 2b\n",
                            each!("add v0.4s, v0.4s, v", ".4s"; 1 2 3 4 5 6 7 8 9 10 11 12 13 14
                                15 16 17 18 19 20 21 22 23),
                        ),
                        inout("x9") iters => _,
                        in("v24") va,
                        in("v25") vb,
                        out("v0") sum,
                        clobber_abi("C"),
                        options(nomem, nostack),
                    );
                }
                // `addv` sums modulo 2^32, as the lanes wrap.
                vaddvq_s32(sum)
            }
        };
    }

    chains24!(
        /// `sdot`: 4 x 4 int8 products per lane, 16 MACs per instruction.
        sdot, "neon,dotprod", "sdot v"
    );
    chains24!(
        /// `smmla`: a 2 x 8 by 8 x 2 int8 product per instruction, 32 MACs.
        smmla, "neon,i8mm", "smmla v"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_simd_path_has_a_checked_peak() {
        for path in Path::supported() {
            let Some(kernel) = Loop::of(path) else {
                // Scalar has none by design; a newer path's loop may not be wired in yet.
                let simd = [Path::Avx512Vnni, Path::Avx2, Path::NeonDot, Path::NeonI8mm];
                assert!(!simd.contains(&path), "{path} has no peak loop");
                continue;
            };
            for iters in [1, 2, 1000] {
                kernel.run_checked(iters); // panics on a wrong sum
            }
            for threads in [1, 2] {
                let peak = measure_peak(path, threads, Duration::from_millis(20)).unwrap();
                assert_eq!((peak.path, peak.threads), (path, threads));
                assert!(peak.gops.is_finite() && peak.gops > 0.0, "{peak:?}");
                assert!(peak.reps >= MIN_REPS);
            }
        }
    }

    #[test]
    fn scalar_and_unsupported_paths_have_none() {
        assert_eq!(measure_peak(Path::Scalar, 1, Duration::ZERO), None);
        for path in Path::ALL.into_iter().filter(|p| !p.is_supported()) {
            assert_eq!(measure_peak(path, 1, Duration::ZERO), None);
        }
    }
}
