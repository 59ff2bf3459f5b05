//! INT8 `linear` vs f32 GEMM (`gemm` 0.19, what candle uses) in one process.
//!
//! `cargo run --release -p qmodel-kernels --example gemm_bench [-- --reps N] [--quick]`
//!
//! Prints, per shape and thread count: our INT8 GOP/s (AVX-512 VNNI path and
//! AVX2 path), f32 GFLOP/s, the ratio, and the fraction of the INT8 peak
//! *measured in this process* (a `vpdpbusd` throughput loop) plus the
//! theoretical figure from the measured clock. Medians over interleaved reps.

use qmodel_kernels::{Activation, Exec, Path, QuantizedWeight, ThreadPool, linear_with};
use std::hint::black_box;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Seconds per call, median over `reps`, each rep >= ~`min_s` long.
fn time_reps(reps: usize, min_s: f64, mut f: impl FnMut()) -> Vec<f64> {
    let t = Instant::now();
    f();
    let once = t.elapsed().as_secs_f64().max(1e-7);
    let inner = ((min_s / once).ceil() as usize).clamp(1, 10_000);
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..inner {
                f();
            }
            t.elapsed().as_secs_f64() / inner as f64
        })
        .collect()
}

#[cfg(target_arch = "x86_64")]
mod peak {
    use std::arch::x86_64::*;

    /// 12 independent vpdpbusd chains: 12 * 64 MAC = 1536 ops per iteration.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn vnni(iters: usize, seed: i32) -> i32 {
        let a = _mm512_set1_epi32(seed);
        let b = _mm512_set1_epi32(seed ^ 0x0101);
        let mut acc = [_mm512_setzero_si512(); 12];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_dpbusd_epi32(*x, a, b);
            }
        }
        let mut s = acc[0];
        for x in &acc[1..] {
            s = _mm512_add_epi32(s, *x);
        }
        _mm512_reduce_add_epi32(s)
    }
    pub const VNNI_OPS_PER_ITER: f64 = 12.0 * 64.0 * 2.0;

    /// 12 independent zmm FMA chains: 12 * 16 * 2 = 384 flops per iteration.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma(iters: usize, seed: f32) -> f32 {
        let a = _mm512_set1_ps(seed);
        let b = _mm512_set1_ps(0.999);
        let mut acc = [_mm512_setzero_ps(); 12];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, b, a);
            }
        }
        let mut s = acc[0];
        for x in &acc[1..] {
            s = _mm512_add_ps(s, *x);
        }
        _mm512_reduce_add_ps(s)
    }
    pub const FMA_FLOPS_PER_ITER: f64 = 12.0 * 16.0 * 2.0;

    /// Dependent chain of 1-cycle adds: 10 per iteration.
    pub fn clock_chain(iters: u64) -> u64 {
        let mut x = 0u64;
        unsafe {
            std::arch::asm!(
                "2:",
                "add {x}, 1", "add {x}, 1", "add {x}, 1", "add {x}, 1", "add {x}, 1",
                "add {x}, 1", "add {x}, 1", "add {x}, 1", "add {x}, 1", "add {x}, 1",
                "dec {n}",
                "jnz 2b",
                x = inout(reg) x,
                n = inout(reg) iters => _,
                options(nomem, nostack),
            );
        }
        x
    }
}

struct Peak {
    ghz: f64,
    vnni_gops_1t: f64,
    fma_gflops_1t: f64,
}

#[cfg(target_arch = "x86_64")]
fn measure_peak(reps: usize) -> Peak {
    let n = 200_000_000u64;
    let ghz = median(time_reps(reps, 0.05, || {
        black_box(peak::clock_chain(black_box(n / 10)));
    }))
    .recip()
        * (n as f64)
        / 1e9;
    let (vnni, fma) = if Path::Avx512Vnni.is_supported() {
        let it = 2_000_000;
        let v = median(time_reps(reps, 0.05, || {
            black_box(unsafe { peak::vnni(it, black_box(3)) });
        }));
        let f = median(time_reps(reps, 0.05, || {
            black_box(unsafe { peak::fma(it, black_box(1.0)) });
        }));
        (
            peak::VNNI_OPS_PER_ITER * it as f64 / v / 1e9,
            peak::FMA_FLOPS_PER_ITER * it as f64 / f / 1e9,
        )
    } else {
        (f64::NAN, f64::NAN)
    };
    Peak {
        ghz,
        vnni_gops_1t: vnni,
        fma_gflops_1t: fma,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn measure_peak(_: usize) -> Peak {
    Peak {
        ghz: f64::NAN,
        vnni_gops_1t: f64::NAN,
        fma_gflops_1t: f64::NAN,
    }
}

fn f32_gemm(m: usize, k: usize, n: usize, x: &[f32], w: &[f32], out: &mut [f32], threads: usize) {
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // out[m,n] = x[m,k] * W^T, W row-major [n,k].
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        )
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let reps = args
        .iter()
        .position(|a| a == "--reps")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(9);
    let quick = args.iter().any(|a| a == "--quick");

    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpu.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    println!(
        "CPU: {} (family {}, model {}), /proc/cpuinfo MHz {}, {} logical CPUs",
        field("model name"),
        field("cpu family"),
        field("model\t"),
        field("cpu MHz"),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "supported paths: {:?}; reps per point: {reps} (median)",
        Path::supported()
    );
    let pk = measure_peak(reps);
    let vnni_per_cycle = pk.vnni_gops_1t / pk.ghz / 128.0;
    let fma_per_cycle = pk.fma_gflops_1t / pk.ghz / 32.0;
    println!(
        "measured: clock ~{:.2} GHz (dependent-add chain); 1-core peak vpdpbusd zmm {:.0} GOP/s \
         (= {:.2} instr/cycle), zmm FMA {:.0} GFLOP/s (= {:.2} instr/cycle); INT8/F32 peak ratio {:.2}",
        pk.ghz,
        pk.vnni_gops_1t,
        vnni_per_cycle,
        pk.fma_gflops_1t,
        fma_per_cycle,
        pk.vnni_gops_1t / pk.fma_gflops_1t
    );
    println!(
        "theoretical: Zen 4 (double-pumped 512-bit): 1 vpdpbusd zmm/cycle = 128 OP/cycle/core; \
         Zen 5 (full-width): 2/cycle = 256 OP/cycle/core -> at {:.2} GHz {:.0} / {:.0} GOP/s/core",
        pk.ghz,
        128.0 * pk.ghz,
        256.0 * pk.ghz
    );
    println!("%peak below = INT8 GOP/s / (measured 1-core vpdpbusd peak x threads)\n");

    let ms: &[usize] = if quick { &[1, 128] } else { &[1, 128, 4096] };
    let shapes: &[(usize, usize, &str)] = &[
        (384, 384, "attn out / Q"),
        (384, 1152, "fused QKV"),
        (384, 1536, "FFN up"),
        (1536, 384, "FFN down"),
    ];
    let pools = [ThreadPool::new(1), ThreadPool::new(2)];
    let best = Path::best();
    let has_avx2 = Path::Avx2.is_supported() && best != Path::Avx2;

    println!(
        "| M | K->N | layer | thr | int8 {best} GOP/s | %peak | f32 gemm GFLOP/s | int8/f32 |{}",
        if has_avx2 {
            " int8 avx2 GOP/s | avx2/f32 |"
        } else {
            ""
        }
    );
    println!(
        "|---|---|---|---|---|---|---|---|{}",
        if has_avx2 { "---|---|" } else { "" }
    );
    let mut seed = 1u32;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        (seed as f32 / u32::MAX as f32) * 2.0 - 1.0
    };
    for &m in ms {
        for &(k, n, name) in shapes {
            let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rnd() * 0.05).collect();
            let b: Vec<f32> = (0..n).map(|_| rnd() * 0.1).collect();
            let qw = QuantizedWeight::from_f32(&w, n, k);
            let mut out = vec![0f32; m * n];
            let ops = 2.0 * (m * n * k) as f64;
            let min_s = 0.02;
            for (ti, pool) in pools.iter().enumerate() {
                let threads = ti + 1;
                let (mut ti8, mut tf32, mut tavx2) = (vec![], vec![], vec![]);
                let e = Exec { path: best, pool };
                let e2 = Exec {
                    path: Path::Avx2,
                    pool,
                };
                // Interleave the engines so machine noise hits them alike.
                for _ in 0..reps {
                    ti8.extend(time_reps(1, min_s, || {
                        linear_with(&e, &x, m, &qw, Some(&b), Activation::None, &mut out)
                    }));
                    tf32.extend(time_reps(1, min_s, || {
                        f32_gemm(m, k, n, &x, &w, &mut out, threads)
                    }));
                    if has_avx2 {
                        tavx2.extend(time_reps(1, min_s, || {
                            linear_with(&e2, &x, m, &qw, Some(&b), Activation::None, &mut out)
                        }));
                    }
                }
                let gi8 = ops / median(ti8) / 1e9;
                let gf = ops / median(tf32) / 1e9;
                let pct = 100.0 * gi8 / (pk.vnni_gops_1t * threads as f64);
                let mut line = format!(
                    "| {m} | {k}->{n} | {name} | {threads} | {gi8:.0} | {pct:.0}% | {gf:.0} | {:.2}x |",
                    gi8 / gf
                );
                if has_avx2 {
                    let ga = ops / median(tavx2) / 1e9;
                    line += &format!(" {ga:.0} | {:.2}x |", ga / gf);
                }
                println!("{line}");
            }
        }
    }
}
