//! INT8 `linear` vs f32 GEMM (`gemm` 0.19, what candle uses) in one process.
//!
//! `cargo run --release -p qmodel-kernels --example gemm_bench [-- --reps N] [--quick]`
//!
//! Prints, per shape and thread count: our INT8 GOP/s (best path and AVX2
//! path), f32 GFLOP/s, the ratio, and the fraction of the INT8 peak
//! *measured in this process* (`qmodel_kernels::measure_peak` of the best
//! path: `vpdpbusd`, the AVX2 triple, `sdot` / `smmla`) plus the theoretical
//! figure from the measured clock. Medians over interleaved reps.

use qmodel_kernels::{Activation, Exec, Path, QuantizedWeight, ThreadPool, linear_with};
use std::time::{Duration, Instant};

fn min(v: Vec<f64>) -> f64 {
    v.into_iter().fold(f64::INFINITY, f64::min)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[cfg(target_arch = "x86_64")]
mod fp {
    use std::arch::x86_64::*;

    /// 24 independent zmm FMA chains: 24 * 16 * 2 flops per iteration.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma(iters: usize, seed: f32) -> f32 {
        let a = _mm512_set1_ps(seed);
        let b = _mm512_set1_ps(0.999);
        let mut acc = [_mm512_setzero_ps(); 24];
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
    pub const FMA_FLOPS_PER_ITER: f64 = 24.0 * 16.0 * 2.0;

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

/// (clock GHz, 1-core zmm FMA GFLOP/s): best (min) thread-CPU time of interleaved reps; the
/// machine is shared, wall time would measure the neighbours.
#[cfg(target_arch = "x86_64")]
fn clock_and_fma(reps: usize) -> (f64, f64) {
    use std::hint::black_box;
    let n = 100_000_000u64;
    let it = 1_000_000;
    let has = std::is_x86_feature_detected!("avx512f");
    let (mut tc, mut tf) = (Samples::default(), Samples::default());
    for _ in 0..reps.max(5) {
        tc.push(rep(0.03, || {
            black_box(fp::clock_chain(black_box(n / 10)));
        }));
        if has {
            tf.push(rep(0.03, || {
                black_box(unsafe { fp::fma(it, black_box(1.0)) });
            }));
        }
    }
    let fma = if has {
        fp::FMA_FLOPS_PER_ITER * it as f64 / min(tf.cpu) / 1e9
    } else {
        f64::NAN
    };
    (n as f64 / min(tc.cpu) / 1e9, fma)
}

#[cfg(not(target_arch = "x86_64"))]
fn clock_and_fma(_: usize) -> (f64, f64) {
    (f64::NAN, f64::NAN)
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

fn cpu_s(clock: libc::clockid_t) -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// One rep: (wall, calling-thread CPU, whole-process CPU) seconds per call,
/// calls repeated until the rep lasts >= `min_s`.
fn rep(min_s: f64, mut f: impl FnMut()) -> (f64, f64, f64) {
    let t = Instant::now();
    f();
    let once = t.elapsed().as_secs_f64().max(1e-7);
    let inner = ((min_s / once).ceil() as usize).clamp(1, 100_000);
    let (t, c, pc) = (
        Instant::now(),
        cpu_s(libc::CLOCK_THREAD_CPUTIME_ID),
        cpu_s(libc::CLOCK_PROCESS_CPUTIME_ID),
    );
    for _ in 0..inner {
        f();
    }
    let k = inner as f64;
    (
        t.elapsed().as_secs_f64() / k,
        (cpu_s(libc::CLOCK_THREAD_CPUTIME_ID) - c) / k,
        (cpu_s(libc::CLOCK_PROCESS_CPUTIME_ID) - pc) / k,
    )
}

#[derive(Default)]
struct Samples {
    wall: Vec<f64>,
    cpu: Vec<f64>,
    pcpu: Vec<f64>,
}
impl Samples {
    fn push(&mut self, (w, c, p): (f64, f64, f64)) {
        self.wall.push(w);
        self.cpu.push(c);
        self.pcpu.push(p);
    }
    fn pcpu_med(&self) -> f64 {
        median(self.pcpu.clone())
    }
    fn med(&self) -> f64 {
        median(self.wall.clone())
    }
    fn best(&self) -> f64 {
        min(self.wall.clone())
    }
    fn cpu_med(&self) -> f64 {
        median(self.cpu.clone())
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
    let mhz: f64 = field("cpu MHz").parse().unwrap_or(f64::NAN);
    println!(
        "CPU: {} (family {}, model {}), /proc/cpuinfo {mhz} MHz, {} logical CPUs, loadavg {}",
        field("model name"),
        field("cpu family"),
        field("model\t"),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!(
        "supported paths: {:?}; {reps} interleaved reps per point",
        Path::supported()
    );
    let (ghz, fma_gflops_1t) = clock_and_fma(reps);
    // The best path's 1-thread int8 peak (best of the library's wall-time reps); NaN without one.
    let int8 = qmodel_kernels::measure_peak(Path::best(), 1, Duration::from_millis(500));
    let int8_gops_1t = int8.map_or(f64::NAN, |p| p.gops);
    let int8_line = int8.map_or(format!("no int8 peak loop for {}", Path::best()), |p| {
        format!(
            "1-core {} int8 peak ({}) {:.0} GOP/s (= {:.0} ops/cycle at that clock)",
            p.path,
            p.instructions,
            p.gops,
            p.gops / ghz
        )
    });
    println!(
        "measured (best of reps): clock ~{ghz:.2} GHz (dependent-add chain); {int8_line}; zmm FMA \
         {fma_gflops_1t:.0} GFLOP/s (= {:.2}/cycle); INT8/F32 peak ratio {:.2}",
        fma_gflops_1t / ghz / 32.0,
        int8_gops_1t / fma_gflops_1t
    );
    println!(
        "theoretical INT8 peak per core: Zen 4 (512-bit double-pumped, 1 vpdpbusd zmm/cycle) 128 OP/cycle, \
         Zen 5 (full-width, 2/cycle) 256 OP/cycle -> at {:.2} GHz (cpuinfo) {:.0} / {:.0} GOP/s",
        mhz / 1e3,
        0.128 * mhz,
        0.256 * mhz
    );
    println!(
        "GOP/s = 2*M*N*K / time. Primary figures use CPU time (median of reps), robust on a shared machine:\n\
         1 thread: the calling thread's CPU time; 2 threads: whole-process CPU time, i.e. GOP per CPU-second\n\
         (parallel efficiency incl. spinning/imbalance; x2 = expected wall rate on 2 idle cores).\n\
         %peak = CPU-time GOP/s / measured 1-core int8 peak of the best path. Wall columns: median (best) GOP/s on this busy box.\n"
    );

    let ms: &[usize] = if quick {
        &[16, 128]
    } else {
        &[1, 16, 128, 4096]
    };
    let shapes: &[(usize, usize, &str)] = &[
        (384, 384, "attn out/Q"),
        (384, 1152, "fused QKV"),
        (384, 1536, "FFN up"),
        (1536, 384, "FFN down"),
    ];
    let pools = [ThreadPool::new(1), ThreadPool::new(2)];
    let best = Path::best();
    let has_avx2 = Path::Avx2.is_supported() && best != Path::Avx2;

    println!(
        "| M | K->N | layer | thr | int8 {best} GOP/s | %peak | f32 gemm GFLOP/s | int8/f32 | wall int8 | wall f32 |{}",
        if has_avx2 { " int8 avx2 GOP/s |" } else { "" }
    );
    println!(
        "|---|---|---|---|---|---|---|---|---|---|{}",
        if has_avx2 { "---|" } else { "" }
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
            let gop = 2.0 * (m * n * k) as f64 / 1e9;
            let min_s = 0.02;
            for (ti, pool) in pools.iter().enumerate() {
                let threads = ti + 1;
                let (mut si8, mut sf32, mut savx2) =
                    (Samples::default(), Samples::default(), Samples::default());
                let e = Exec { path: best, pool };
                let e2 = Exec {
                    path: Path::Avx2,
                    pool,
                };
                // Interleave the engines so machine noise hits them alike.
                for _ in 0..reps {
                    si8.push(rep(min_s, || {
                        linear_with(&e, &x, m, &qw, Some(&b), Activation::None, &mut out)
                    }));
                    sf32.push(rep(min_s, || f32_gemm(m, k, n, &x, &w, &mut out, threads)));
                    if has_avx2 {
                        savx2.push(rep(min_s, || {
                            linear_with(&e2, &x, m, &qw, Some(&b), Activation::None, &mut out)
                        }));
                    }
                }
                let cpu = |x: &Samples| {
                    if threads == 1 {
                        x.cpu_med()
                    } else {
                        x.pcpu_med()
                    }
                };
                let (ci, cf) = (cpu(&si8), cpu(&sf32));
                let mut line = format!(
                    "| {m} | {k}->{n} | {name} | {threads} | {:.0} | {:.0}% | {:.0} | {:.1}x | {:.0} ({:.0}) | {:.0} ({:.0}) |",
                    gop / ci,
                    100.0 * gop / ci / int8_gops_1t,
                    gop / cf,
                    cf / ci,
                    gop / si8.med(),
                    gop / si8.best(),
                    gop / sf32.med(),
                    gop / sf32.best(),
                );
                if has_avx2 {
                    line += &format!(" {:.0} |", gop / cpu(&savx2));
                }
                println!("{line}");
            }
        }
    }

    // Epilogue and helper costs, 1 thread.
    println!();
    let pool1 = &pools[0];
    let (m, k, n) = (128, 384, 1536);
    let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
    let w: Vec<f32> = (0..n * k).map(|_| rnd() * 0.05).collect();
    let qw = QuantizedWeight::from_f32(&w, n, k);
    let mut out = vec![0f32; m * n];
    let e = Exec {
        path: best,
        pool: pool1,
    };
    let (mut a, mut g) = (Samples::default(), Samples::default());
    for _ in 0..reps {
        a.push(rep(0.02, || {
            linear_with(&e, &x, m, &qw, None, Activation::None, &mut out)
        }));
        g.push(rep(0.02, || {
            linear_with(&e, &x, m, &qw, None, Activation::Gelu, &mut out)
        }));
    }
    println!(
        "FFN up 128x384->1536, 1 thread (cpu time): plain {:.1} us, fused GELU {:.1} us (+{:.1} us for {} GELUs)",
        a.cpu_med() * 1e6,
        g.cpu_med() * 1e6,
        (g.cpu_med() - a.cpu_med()) * 1e6,
        m * n
    );
    let src: Vec<f32> = (0..128 * 1536).map(|_| rnd() * 4.0).collect();
    let mut v = src.clone();
    let mut c = Samples::default();
    for _ in 0..reps.min(5) {
        c.push(rep(0.01, || v.copy_from_slice(&src)));
    }
    let copy = c.cpu_med();
    for path in Path::supported() {
        let (mut sg, mut ss, mut sl) = (Samples::default(), Samples::default(), Samples::default());
        let gamma = vec![1.0f32; 384];
        let beta = vec![0.0f32; 384];
        // Each call starts from the same input (repeated in-place GELU would
        // walk into denormals); the copy's cost is subtracted.
        for _ in 0..reps.min(5) {
            sg.push(rep(0.01, || {
                v.copy_from_slice(&src);
                qmodel_kernels::gelu_inplace_with(path, &mut v)
            }));
            ss.push(rep(0.01, || {
                v.copy_from_slice(&src);
                qmodel_kernels::softmax_rows_inplace_with(path, &mut v, 128)
            }));
            sl.push(rep(0.01, || {
                v.copy_from_slice(&src);
                qmodel_kernels::layer_norm_rows_with(path, &mut v, &gamma, &beta, 1e-12)
            }));
        }
        let me = v.len() as f64 / 1e6;
        println!(
            "helpers {path:>10} (cpu time, 196608 f32): gelu {:.0} Melem/s, softmax(128) {:.0} Melem/s, layer_norm(384) {:.0} Melem/s",
            me / (sg.cpu_med() - copy),
            me / (ss.cpu_med() - copy),
            me / (sl.cpu_med() - copy)
        );
    }
}
