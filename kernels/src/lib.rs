//! # qmodel-kernels
//!
//! CPU kernels for qmodel's INT8 BERT encoder (all-MiniLM-L6-v2 and kin):
//!
//! - [`linear`] / [`linear_act`] / [`linear_with`]: `y = x W^T + b` with
//!   per-output-channel symmetric int8 weights ([`QuantizedWeight`],
//!   pre-packed), activations quantized dynamically per row (per token) to
//!   int8, exact int8 x int8 -> i32 accumulation, fused dequantize + bias and
//!   optional GELU ([`Activation`]).
//! - f32 helpers: [`gelu_inplace`], [`softmax_rows_inplace`], [`layer_norm_rows`], and
//!   [`attend_head`], fused attention of one head (scores, softmax and values by query block).
//! - [`ThreadPool`]: one small persistent pool (caller + parked workers).
//! - [`measure_peak`]: a path's int8 peak measured on this machine ([`Peak`], int8 GOP/s of
//!   an in-register loop of the path's multiply-accumulate instructions on N threads), the
//!   denominator of the benchmarks' "fraction of peak".
//! - [`Path`]: runtime dispatch AMX / AVX-512 VNNI / AVX2 (x86-64), i8mm / dotprod
//!   (aarch64) / scalar; force with
//!   `QMODEL_KERNEL=amx|avx512vnni|avx2|neon-i8mm|neon-dot|scalar` (read once) or per call
//!   via [`Exec`]. The AMX path (`tdpbssd` tiles, Sapphire Rapids and later on Linux) has not
//!   run on AMX hardware yet: it is verified bit-exact on an emulator of the tile
//!   instructions, and on first use checks itself against the scalar kernel (a mismatch
//!   leaves it unsupported).
//!
//! ```
//! use qmodel_kernels::{Activation, Exec, Path, QuantizedWeight, ThreadPool, linear, linear_with};
//! let (rows, k, n) = (3, 8, 5);
//! let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.37).sin()).collect(); // [out, in]
//! let x: Vec<f32> = (0..rows * k).map(|i| (i as f32 * 0.11).cos()).collect();
//! let qw = QuantizedWeight::from_f32(&w, n, k);
//! let mut y = vec![0f32; rows * n];
//! linear(&x, rows, &qw, None, &mut y);
//! // Same result on any path and pool size:
//! let pool = ThreadPool::new(1);
//! let mut y2 = vec![0f32; rows * n];
//! linear_with(&Exec { path: Path::Scalar, pool: &pool }, &x, rows, &qw, None, Activation::None, &mut y2);
//! assert_eq!(y, y2);
//! // Serialized form round-trips.
//! assert_eq!(QuantizedWeight::from_bytes(&qw.to_bytes()).unwrap(), qw);
//! ```
//!
//! ## Why our own kernel
//! Checked before writing this (crates.io, 2026):
//! - `gemm` 0.19 (what candle uses): f32/f64/f16/complex only, no int8.
//! - `tract-linalg` 0.23: does have x86 int8 kernels, AVX-512 VNNI included,
//!   and is maintained. But they are jinja-templated assembly built by its
//!   `build.rs` (needs a system assembler; AVX-VNNI/AMX gated on binutils
//!   probes), it brings ~a dozen dependencies, and its API is tract's
//!   internal fused-op plumbing (`FusedSpec`, its own packers), which we
//!   would have to drive around our own per-token quantization, per-channel
//!   dequantization and GELU epilogue anyway, with no guarantee of stability
//!   across its minor versions.
//! - No maintained gemmlowp/fbgemm port in Rust; oneDNN bindings are a C++
//!   build dependency.
//!
//! The kernel we need is small (one micro-kernel per ISA, one packing), so
//! this crate has **no runtime dependencies**, uses `std::arch` only, and
//! controls the things the server cares about: batch invariance, bit-identical
//! results on every path, one thread pool.
//!
//! ## Numerics
//! Weights: `scale_n = max|w_n| / 127`, `q = round_half_even(w / scale)`.
//! Activations: the same per row, at run time. Integer accumulation is exact
//! on every path (see the `gemm` module docs for the VNNI +128 offset, the
//! AVX2 sign trick and the AMX tiles), `in_features <= MAX_IN_FEATURES`.
//! GELU's erf is a rational minimax approximation (max abs error ~1e-6).
//! Per output element the error against the f32 product is bounded by
//! `0.5 * (scale_n * sum_k |x_k| + sx * sum_k |q_nk| * scale_n) + f32 rounding`
//! — checked by the tests.

#![warn(missing_docs)]

mod attention;
mod dispatch;
mod gemm;
mod ops;
mod peak;
mod pool;
mod simd;
mod weight;

pub use attention::{HeadIo, QUERY_BLOCK, RowBias, attend_head, attend_head_with};
pub use dispatch::Path;
pub use gemm::{
    Activation, Exec, InputQuant, PAR_MIN_MACS, gemm_i32_with, linear, linear_act,
    linear_quant_with, linear_with, quantize_rows_i8,
};
pub use ops::{
    exp_scalar, gelu_inplace, gelu_inplace_with, gelu_scalar, layer_norm_rows,
    layer_norm_rows_with, matmul_nt_with, softmax_rows_inplace, softmax_rows_inplace_with,
};
pub use peak::{Peak, measure_peak};
pub use pool::{DEFAULT_SPIN, ThreadPool};
pub use weight::{
    FormatError, KGROUP, LAYOUT_VERSION, MAX_IN_FEATURES, PANEL, QuantizedWeight, WeightView,
};
