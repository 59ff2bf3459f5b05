//! Fused attention (`attend_head`) vs the unfused F32 recipe candle runs (`Q K^T` with the
//! `gemm` crate into a full `len x len` score matrix, a row softmax, `P V` with `gemm`), one
//! head of one sequence on one thread, in the layout of a fused QKV projection.
//!
//! `cargo run --release -p qmodel-kernels --example attention_bench [-- --reps N]`
//!
//! Prints per shape (MiniLM's 12 x 32 and MPNet's 12 x 64 heads at 16, 128 and 512 tokens):
//! GFLOP/s of both (4 x len^2 x head_dim flops: the two products), the fused one's speed-up,
//! and its time per head. Medians over interleaved reps.

use std::hint::black_box;
use std::time::Instant;

use qmodel_kernels::{HeadIo, Path, attend_head};

/// Seconds per call of `f`, median of `reps` reps that each last >= 20 ms.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let once = {
        let t = Instant::now();
        f();
        t.elapsed().as_secs_f64().max(1e-7)
    };
    let inner = ((0.02 / once).ceil() as usize).clamp(1, 100_000);
    let mut samples: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..inner {
                f();
            }
            t.elapsed().as_secs_f64() / inner as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// A matrix in memory: element `(i, j)` at `ptr + i * row + j * col` (strides in floats).
#[derive(Clone, Copy)]
struct Strided<P> {
    ptr: P,
    row: usize,
    col: usize,
}

impl<P> Strided<P> {
    /// Row-major, rows `row` apart.
    fn rows(ptr: P, row: usize) -> Self {
        Self { ptr, row, col: 1 }
    }
}

/// `out[m, n] = a[m, k] . b[k, n]` with the `gemm` crate on one thread.
fn matmul(
    (m, n, k): (usize, usize, usize),
    a: Strided<*const f32>,
    b: Strided<*const f32>,
    out: Strided<*mut f32>,
) {
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.ptr,
            out.col as isize,
            out.row as isize,
            false,
            a.ptr,
            a.col as isize,
            a.row as isize,
            b.ptr,
            b.col as isize,
            b.row as isize,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// candle's recipe: the whole score matrix, softmax row by row, then `P V`.
fn unfused(io: HeadIo, scores: &mut [f32]) {
    let HeadIo {
        q,
        k,
        v,
        in_stride,
        out,
        out_stride,
        len,
        head_dim,
    } = io;
    // Scores = Q K^T: K's rows read as the columns of the right-hand matrix.
    let kt = Strided {
        ptr: k,
        row: 1,
        col: in_stride,
    };
    let s = Strided::rows(scores.as_mut_ptr(), len);
    matmul((len, len, head_dim), Strided::rows(q, in_stride), kt, s);
    for row in scores.chunks_exact_mut(len) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for s in row.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        row.iter_mut().for_each(|s| *s /= sum);
    }
    let p = Strided::rows(scores.as_ptr(), len);
    let (v, out) = (Strided::rows(v, in_stride), Strided::rows(out, out_stride));
    matmul((len, head_dim, len), p, v, out);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let reps = args
        .iter()
        .position(|a| a == "--reps")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(9);
    println!("path {:?}, one thread", Path::active());
    println!(
        "{:>5} {:>4} | {:>13} {:>15} {:>7} | {:>9}",
        "len", "hd", "fused GFLOP/s", "unfused GFLOP/s", "fused/x", "us/head"
    );
    for (hidden, head_dim) in [(384, 32), (768, 64)] {
        for len in [16, 128, 512] {
            let stride = 3 * hidden;
            let mut seed = 0x9e37_79b9_u32;
            let qkv: Vec<f32> = (0..len * stride)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    (seed as f32 / u32::MAX as f32 - 0.5) * 0.5
                })
                .collect();
            let mut out = vec![0f32; len * hidden];
            let mut scores = vec![0f32; len * len];
            let io = HeadIo {
                q: qkv.as_ptr(),
                k: qkv[hidden..].as_ptr(),
                v: qkv[2 * hidden..].as_ptr(),
                in_stride: stride,
                out: out.as_mut_ptr(),
                out_stride: hidden,
                len,
                head_dim,
            };
            let flops = 4.0 * (len * len * head_dim) as f64;
            let fused = time(reps, || unsafe { attend_head(black_box(io), None) });
            let reference = time(reps, || unfused(black_box(io), &mut scores));
            println!(
                "{len:>5} {head_dim:>4} | {:>13.1} {:>15.1} {:>6.2}x | {:>9.1}",
                flops / fused / 1e9,
                flops / reference / 1e9,
                reference / fused,
                fused * 1e6
            );
        }
    }
}
