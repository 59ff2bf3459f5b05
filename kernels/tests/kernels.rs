//! Correctness tests for every supported dispatch path.
//! Run the scalar fallback alone with `QMODEL_KERNEL=scalar` (see `active_path_*`).

use qmodel_kernels::*;

struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    /// Roughly normal, with occasional 8x outliers like real activations.
    fn act(&mut self) -> f32 {
        let g = (0..4).map(|_| self.uniform()).sum::<f32>() * 0.8;
        if self.next_u64().is_multiple_of(97) {
            g * 8.0
        } else {
            g
        }
    }
    fn vec(&mut self, n: usize, f: impl Fn(&mut Self) -> f32) -> Vec<f32> {
        (0..n).map(|_| f(self)).collect()
    }
}

/// (rows, in, out)
const SHAPES: &[(usize, usize, usize)] = &[
    (1, 384, 384),
    (7, 384, 1536),
    (33, 1536, 384),
    (5, 100, 17),
    (3, 31, 1),
    (17, 31, 33),
    (9, 1, 5),
    (64, 384, 1152),
];

fn paths() -> Vec<Path> {
    let p = Path::supported();
    eprintln!("testing paths: {p:?}");
    p
}

fn make(rng: &mut Rng, rows: usize, k: usize, n: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let x = rng.vec(rows * k, Rng::act);
    let w = rng.vec(n * k, |r| r.uniform() * 0.08);
    let b = rng.vec(n, |r| r.uniform() * 0.1);
    (x, w, b)
}

fn exec(path: Path, pool: &ThreadPool) -> Exec<'_> {
    Exec { path, pool }
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits())
}

/// Keeps the first path's output in `reference` and asserts every later one equals it bit
/// for bit.
fn assert_same_bits(reference: &mut Option<Vec<f32>>, y: Vec<f32>, what: &str) {
    match reference {
        None => *reference = Some(y),
        Some(r) => assert!(same_bits(r, &y), "{what} differs from the first path"),
    }
}

/// The exact `x_row . w_row + bias` and the bound on a quantized result's error:
/// `0.5 * (sw * sum|x| + sx * sum|w_hat|)` plus f32 slack.
fn exact_and_bound(
    x_row: &[f32],
    w_row: &[f32],
    w_hat_row: &[f32],
    bias: f32,
    sw: f32,
    sx: f64,
) -> (f64, f64) {
    let products = x_row.iter().zip(w_row).map(|(a, b)| *a as f64 * *b as f64);
    let exact = products.clone().sum::<f64>() + bias as f64;
    let abs_xw: f64 = products.map(f64::abs).sum();
    let l1x: f64 = x_row.iter().map(|v| v.abs() as f64).sum();
    let l1w: f64 = w_hat_row.iter().map(|v| v.abs() as f64).sum();
    let bound = 0.5 * (sw as f64 * l1x + sx * l1w) + 1e-6 * (abs_xw + exact.abs()) + 1e-7;
    (exact, bound)
}

#[test]
fn i32_accumulation_exact_and_identical_across_paths() {
    let mut rng = Rng(1);
    let pool = ThreadPool::new(2);
    for &(rows, k, n) in SHAPES {
        let (x, w, _) = make(&mut rng, rows, k, n);
        let qw = QuantizedWeight::from_f32(&w, n, k);
        let (xq, _) = quantize_rows_i8(&x, rows, k);
        let wq = qw.to_int8();
        let mut naive = vec![0i32; rows * n];
        for r in 0..rows {
            for c in 0..n {
                naive[r * n + c] = (0..k)
                    .map(|kk| xq[r * k + kk] as i32 * wq[c * k + kk] as i32)
                    .sum();
            }
        }
        for path in paths() {
            let mut got = vec![0i32; rows * n];
            gemm_i32_with(&exec(path, &pool), &xq, rows, &qw, &mut got);
            assert_eq!(got, naive, "path {path} shape {rows}x{k}->{n}");
        }
    }
    // Extreme values: all +-127 (max magnitude; VNNI offset 255*127 per product).
    for path in paths() {
        let (rows, k, n) = (3, 1536, 20);
        let xq: Vec<i8> = (0..rows * k)
            .map(|i| if i % 3 == 0 { -127 } else { 127 })
            .collect();
        let wq: Vec<i8> = (0..n * k)
            .map(|i| if i % 5 == 0 { -127 } else { 127 })
            .collect();
        let qw = QuantizedWeight::from_int8(&wq, &vec![1.0; n], n, k).unwrap();
        let mut got = vec![0i32; rows * n];
        gemm_i32_with(&exec(path, &pool), &xq, rows, &qw, &mut got);
        for r in 0..rows {
            for c in 0..n {
                let e: i32 = (0..k)
                    .map(|kk| xq[r * k + kk] as i32 * wq[c * k + kk] as i32)
                    .sum();
                assert_eq!(got[r * n + c], e, "path {path} extreme");
            }
        }
    }
}

#[test]
fn linear_bitwise_identical_across_paths() {
    let mut rng = Rng(2);
    let pool = ThreadPool::new(2);
    for &(rows, k, n) in SHAPES {
        let (x, w, b) = make(&mut rng, rows, k, n);
        let qw = QuantizedWeight::from_f32(&w, n, k);
        for act in [Activation::None, Activation::Gelu] {
            let mut reference: Option<Vec<f32>> = None;
            for path in paths() {
                let mut y = vec![0f32; rows * n];
                linear_with(&exec(path, &pool), &x, rows, &qw, Some(&b), act, &mut y);
                let what = format!("path {path}, shape {rows}x{k}->{n} {act:?}");
                assert_same_bits(&mut reference, y, &what);
            }
        }
    }
}

/// The per-channel input scale is multiplied in exactly as if `x * scale` had been passed,
/// on every path, symmetric or not.
#[test]
fn input_scale_equals_prescaled_input() {
    let mut rng = Rng(7);
    let pool = ThreadPool::new(2);
    for &(rows, k, n) in SHAPES {
        let (x, w, b) = make(&mut rng, rows, k, n);
        let scale = rng.vec(k, |r| (r.uniform() * 3.0).exp());
        let prescaled: Vec<f32> = x
            .chunks_exact(k)
            .flat_map(|row| row.iter().zip(&scale).map(|(x, s)| x * s))
            .collect();
        let qw = QuantizedWeight::from_f32(&w, n, k);
        for (path, asymmetric) in paths().into_iter().flat_map(|p| [(p, false), (p, true)]) {
            let e = exec(path, &pool);
            let (mut fused, mut plain) = (vec![0f32; rows * n], vec![0f32; rows * n]);
            let act = Activation::Gelu;
            let scaled = InputQuant {
                scale: Some(&scale),
                asymmetric,
            };
            let unscaled = InputQuant {
                scale: None,
                asymmetric,
            };
            linear_quant_with(&e, &x, scaled, rows, &qw, Some(&b), act, &mut fused);
            linear_quant_with(
                &e,
                &prescaled,
                unscaled,
                rows,
                &qw,
                Some(&b),
                act,
                &mut plain,
            );
            assert!(
                same_bits(&fused, &plain),
                "path {path}, asymmetric {asymmetric}, shape {rows}x{k}->{n}"
            );
        }
    }
}

/// GELU-like rows (one-sided, including all-positive, all-negative and all-zero rows):
/// asymmetric quantization is bit-identical across paths, each output within the rounding
/// bound of its 256-level grid, and more accurate than symmetric on such data.
#[test]
fn asymmetric_rows_identical_across_paths_and_within_bound() {
    let mut rng = Rng(11);
    let pool = ThreadPool::new(2);
    let asymmetric = InputQuant {
        scale: None,
        asymmetric: true,
    };
    for &(rows, k, n) in SHAPES {
        let (mut x, w, b) = make(&mut rng, rows, k, n);
        for (i, v) in x.iter_mut().enumerate() {
            *v = match (i / k) % 4 {
                0 => gelu_scalar(*v * 2.0),
                1 => v.abs() + 0.5,
                2 => -v.abs(),
                _ => 0.0,
            };
        }
        let qw = QuantizedWeight::from_f32(&w, n, k);
        let (what, sw) = (qw.to_f32(), qw.scales());
        let mut reference: Option<Vec<f32>> = None;
        for path in paths() {
            let e = exec(path, &pool);
            let (mut y, mut y_sym) = (vec![0f32; rows * n], vec![0f32; rows * n]);
            linear_quant_with(
                &e,
                &x,
                asymmetric,
                rows,
                &qw,
                Some(&b),
                Activation::None,
                &mut y,
            );
            linear_with(&e, &x, rows, &qw, Some(&b), Activation::None, &mut y_sym);
            let (mut err2, mut err2_sym) = (0f64, 0f64);
            for r in 0..rows {
                let xr = &x[r * k..(r + 1) * k];
                let hi = xr.iter().fold(0f32, |m, v| m.max(*v));
                let lo = xr.iter().fold(0f32, |m, v| m.min(*v));
                let sx = ((hi - lo) / 255.0) as f64;
                for c in 0..n {
                    let (wr, w_hat) = (&w[c * k..(c + 1) * k], &what[c * k..(c + 1) * k]);
                    let (exact, bound) = exact_and_bound(xr, wr, w_hat, b[c], sw[c], sx);
                    let err = (y[r * n + c] as f64 - exact).abs();
                    assert!(
                        err <= bound,
                        "path {path} {rows}x{k}->{n} r{r} c{c}: {err} > {bound}"
                    );
                    err2 += err * err;
                    err2_sym += (y_sym[r * n + c] as f64 - exact).powi(2);
                }
            }
            if rows * k >= 2000 {
                assert!(
                    err2 < err2_sym,
                    "path {path} {rows}x{k}->{n}: asymmetric SSE {err2} >= symmetric {err2_sym}"
                );
            }
            assert_same_bits(
                &mut reference,
                y,
                &format!("path {path}, shape {rows}x{k}->{n}"),
            );
        }
    }
}

/// |y - exact| <= 0.5 * (sw_n * sum|x| + sx * sum|w_hat|) + f32 slack.
#[test]
fn linear_within_quantization_bound() {
    let mut rng = Rng(3);
    let pool = ThreadPool::new(2);
    for &(rows, k, n) in SHAPES {
        let (x, w, b) = make(&mut rng, rows, k, n);
        let qw = QuantizedWeight::from_f32(&w, n, k);
        let what = qw.to_f32();
        let (_, sx) = quantize_rows_i8(&x, rows, k);
        let sw = qw.scales();
        for path in paths() {
            let mut y = vec![0f32; rows * n];
            linear_with(
                &exec(path, &pool),
                &x,
                rows,
                &qw,
                Some(&b),
                Activation::None,
                &mut y,
            );
            let (mut err2, mut ref2, mut worst) = (0f64, 0f64, 0f64);
            for r in 0..rows {
                let xr = &x[r * k..(r + 1) * k];
                for c in 0..n {
                    let (wr, w_hat) = (&w[c * k..(c + 1) * k], &what[c * k..(c + 1) * k]);
                    let (exact, bound) = exact_and_bound(xr, wr, w_hat, b[c], sw[c], sx[r] as f64);
                    let e = (y[r * n + c] as f64 - exact).abs();
                    assert!(
                        e <= bound,
                        "path {path} {rows}x{k}->{n} r{r} c{c}: err {e} > bound {bound}"
                    );
                    worst = worst.max(e / bound);
                    err2 += e * e;
                    ref2 += exact * exact;
                }
            }
            eprintln!(
                "{path:>10} {rows:>3}x{k:>4}->{n:>4}: rel RMS err {:.2e}, worst err/bound {:.3}",
                (err2 / ref2).sqrt(),
                worst
            );
        }
    }
}

#[test]
fn gelu_epilogue_matches_separate_gelu() {
    let mut rng = Rng(4);
    let pool = ThreadPool::new(2);
    let (rows, k, n) = (13, 384, 1536);
    let (x, w, b) = make(&mut rng, rows, k, n);
    let qw = QuantizedWeight::from_f32(&w, n, k);
    for path in paths() {
        let e = exec(path, &pool);
        let mut y0 = vec![0f32; rows * n];
        linear_with(&e, &x, rows, &qw, Some(&b), Activation::None, &mut y0);
        gelu_inplace_with(path, &mut y0);
        let mut y1 = vec![0f32; rows * n];
        linear_with(&e, &x, rows, &qw, Some(&b), Activation::Gelu, &mut y1);
        assert!(same_bits(&y0, &y1), "path {path}");
    }
}

#[test]
fn batch_invariance() {
    let mut rng = Rng(5);
    let pool = ThreadPool::new(2);
    for &(k, n) in &[(384, 1536), (1536, 384), (384, 384)] {
        let rows = 64;
        let (x, w, b) = make(&mut rng, rows, k, n);
        let qw = QuantizedWeight::from_f32(&w, n, k);
        for path in paths() {
            let e = exec(path, &pool);
            let mut full = vec![0f32; rows * n];
            linear_with(&e, &x, rows, &qw, Some(&b), Activation::Gelu, &mut full);
            for r in [0, 1, 7, 31, 63] {
                let mut one = vec![0f32; n];
                linear_with(
                    &e,
                    &x[r * k..(r + 1) * k],
                    1,
                    &qw,
                    Some(&b),
                    Activation::Gelu,
                    &mut one,
                );
                assert!(
                    same_bits(&one, &full[r * n..(r + 1) * n]),
                    "path {path} row {r} differs alone vs in batch"
                );
            }
            // And within a differently sized batch (rows 10..20).
            let mut part = vec![0f32; 10 * n];
            linear_with(
                &e,
                &x[10 * k..20 * k],
                10,
                &qw,
                Some(&b),
                Activation::Gelu,
                &mut part,
            );
            assert!(same_bits(&part, &full[10 * n..20 * n]));
        }
    }
}

#[test]
fn thread_count_invariance() {
    let mut rng = Rng(6);
    let pools: Vec<ThreadPool> = [1, 2, 3].into_iter().map(ThreadPool::new).collect();
    for &(rows, k, n) in &[
        (1, 384, 1536),
        (7, 384, 1536),
        (33, 1536, 384),
        (300, 384, 1152),
        (4096, 384, 384),
    ] {
        let (x, w, b) = make(&mut rng, rows, k, n);
        let qw = QuantizedWeight::from_f32(&w, n, k);
        for path in paths() {
            let mut ys = pools.iter().map(|p| {
                let mut y = vec![0f32; rows * n];
                linear_with(
                    &exec(path, p),
                    &x,
                    rows,
                    &qw,
                    Some(&b),
                    Activation::None,
                    &mut y,
                );
                y
            });
            let y1 = ys.next().unwrap();
            for y in ys {
                assert!(same_bits(&y1, &y), "path {path} {rows}x{k}->{n}");
            }
        }
    }
}

#[test]
fn serialization_round_trip() {
    let mut rng = Rng(7);
    let pool = ThreadPool::new(1);
    for &(_, k, n) in SHAPES {
        let (x, w, b) = make(&mut rng, 3, k, n);
        let qw = QuantizedWeight::from_f32(&w, n, k);
        let bytes = qw.to_bytes();
        let back = QuantizedWeight::from_bytes(&bytes).unwrap();
        assert_eq!(back, qw);
        assert_eq!(back.to_int8(), qw.to_int8());
        assert_eq!(back.scales(), qw.scales());
        // Zero-copy view from an aligned buffer (as an mmap would give).
        let mut aligned = vec![0u32; bytes.len().div_ceil(4)];
        let ab: &mut [u8] =
            unsafe { std::slice::from_raw_parts_mut(aligned.as_mut_ptr() as *mut u8, bytes.len()) };
        ab.copy_from_slice(&bytes);
        let view = WeightView::from_bytes(ab).unwrap();
        let e = exec(Path::best(), &pool);
        let (mut y0, mut y1) = (vec![0f32; 3 * n], vec![0f32; 3 * n]);
        linear_with(&e, &x, 3, &qw, Some(&b), Activation::None, &mut y0);
        linear_with(&e, &x, 3, view, Some(&b), Activation::None, &mut y1);
        assert_eq!(y0, y1);
        // Raw int8 + scales round trip (e.g. through a Q8_0-like container).
        let again = QuantizedWeight::from_int8(&qw.to_int8(), qw.scales(), n, k).unwrap();
        assert_eq!(again, qw);
    }
}

#[test]
fn serialization_rejects_corruption() {
    let w: Vec<f32> = (0..40 * 30).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
    let qw = QuantizedWeight::from_f32(&w, 40, 30);
    let bytes = qw.to_bytes();
    assert_eq!(
        QuantizedWeight::from_bytes(&bytes[..bytes.len() - 1]).err(),
        Some(FormatError::Corrupt("section sizes/offsets"))
    );
    let mut bad = bytes.clone();
    bad[0] = b'X';
    assert_eq!(
        QuantizedWeight::from_bytes(&bad).err(),
        Some(FormatError::BadMagic)
    );
    let mut bad = bytes.clone();
    bad[4] = 99;
    assert!(matches!(
        QuantizedWeight::from_bytes(&bad),
        Err(FormatError::Unsupported { .. })
    ));
    let mut bad = bytes.clone();
    let last = bad.len() - 1; // padding byte of the last panel (k=30 -> k4=32)
    bad[last] = 1;
    assert!(QuantizedWeight::from_bytes(&bad).is_err());
    let mut bad = bytes.clone();
    bad[bytes.len() - 16 * 32] ^= 1; // a real weight: row sums no longer match
    assert!(QuantizedWeight::from_bytes(&bad).is_err());
    assert!(QuantizedWeight::from_int8(&[-128i8, 0], &[1.0], 1, 2).is_err());
}

#[test]
fn zero_and_degenerate_rows() {
    let pool = ThreadPool::new(2);
    let (rows, k, n) = (4, 64, 20);
    let mut x = vec![0f32; rows * k];
    x[k..2 * k]
        .iter_mut()
        .enumerate()
        .for_each(|(i, v)| *v = i as f32 * 0.01);
    let mut w = vec![0.25f32; n * k];
    w[..k].fill(0.0); // an all-zero output channel
    let qw = QuantizedWeight::from_f32(&w, n, k);
    let b: Vec<f32> = (0..n).map(|i| i as f32).collect();
    for path in paths() {
        let mut y = vec![f32::NAN; rows * n];
        linear_with(
            &exec(path, &pool),
            &x,
            rows,
            &qw,
            Some(&b),
            Activation::None,
            &mut y,
        );
        assert_eq!(&y[..n], &b[..], "zero row gives bias");
        assert_eq!(y[n], 0.0, "zero channel gives bias 0");
        assert!(
            (y[n + 1] - (1.0 + 0.25 * (0..k).map(|i| i as f32 * 0.01).sum::<f32>())).abs() < 1e-2
        );
    }
}

// ---------------- f32 helpers ----------------

fn gelu_ref(x: f64) -> f64 {
    0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
}

#[test]
fn gelu_accuracy_and_paths() {
    let mut xs: Vec<f32> = (-20000..=20000).map(|i| i as f32 * 0.0007).collect();
    xs.extend([
        0.0,
        -0.0,
        1e-30,
        -1e-30,
        50.0,
        -50.0,
        1e4,
        -1e4,
        f32::MIN_POSITIVE,
    ]);
    let mut worst = 0f64;
    for &x in &xs {
        let e = (gelu_scalar(x) as f64 - gelu_ref(x as f64)).abs();
        let tol =
            2e-7 * (1.0 + x.abs() as f64) + 2.0 * f32::EPSILON as f64 * gelu_ref(x as f64).abs();
        assert!(e <= tol, "gelu({x}) err {e}");
        if x.abs() <= 14.0 {
            worst = worst.max(e);
        }
    }
    eprintln!("gelu max abs error {worst:.2e} on [-14, 14]");
    for path in paths() {
        for len in [1, 7, 16, 33, xs.len()] {
            let mut v = xs[..len].to_vec();
            gelu_inplace_with(path, &mut v);
            for (a, &x) in v.iter().zip(&xs[..len]) {
                assert_eq!(a.to_bits(), gelu_scalar(x).to_bits(), "path {path} x {x}");
            }
        }
    }
}

#[test]
fn exp_accuracy() {
    let mut worst = 0f64;
    for i in -87000..88000 {
        let x = i as f32 * 0.001;
        let r = (x as f64).exp();
        let rel = (exp_scalar(x) as f64 - r).abs() / r;
        worst = worst.max(rel);
    }
    assert!(worst < 3e-7, "exp rel err {worst}");
    assert_eq!(exp_scalar(-100.0), 0.0);
    assert_eq!(exp_scalar(f32::NEG_INFINITY), 0.0);
    eprintln!("exp max rel error {worst:.2e}");
}

#[test]
fn softmax_matches_reference() {
    let mut rng = Rng(8);
    for path in paths() {
        for &len in &[1usize, 5, 16, 17, 128, 131] {
            let rows = 6;
            let mut x = rng.vec(rows * len, |r| r.uniform() * 12.0);
            if len > 3 {
                x[2] = f32::NEG_INFINITY; // masked position
                x[len + 1] = -10000.0;
            }
            let orig = x.clone();
            softmax_rows_inplace_with(path, &mut x, len);
            for r in 0..rows {
                let row = &orig[r * len..(r + 1) * len];
                let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
                let s: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
                for (i, &v) in row.iter().enumerate() {
                    let e = ((v as f64 - m).exp() / s - x[r * len + i] as f64).abs();
                    assert!(e < 1e-6, "path {path} len {len}: err {e}");
                }
            }
        }
        let mut masked = vec![f32::NEG_INFINITY; 8];
        softmax_rows_inplace_with(path, &mut masked, 8);
        assert_eq!(masked, vec![0.0; 8]);
    }
}

/// Fused attention against an f64 softmax(QK^T + bias)V on fused-QKV-style strided rows:
/// every row tail of the query blocks and tiles, head widths that are and are not whole vectors,
/// keys not a multiple of the vector width, a bias, large scores.
#[test]
fn attention_matches_reference() {
    let mut rng = Rng(12);
    for path in paths() {
        for &(len, hd) in &[
            (1, 32),
            (3, 32),
            (8, 64),
            (17, 32),
            (37, 12),
            (128, 32),
            (200, 5),
        ] {
            for biased in [false, true] {
                let stride = 3 * hd + 7;
                // Large enough that the softmax is far from uniform.
                let qkv = rng.vec(len * stride, |r| r.uniform() * 2.5);
                let bias = |i: usize, row: &mut [f32]| {
                    for (j, s) in row.iter_mut().enumerate() {
                        *s += ((i * 31 + j * 7) % 11) as f32 * 0.3 - 1.5;
                    }
                };
                let out_stride = hd + 3;
                let mut out = vec![f32::NAN; len * out_stride];
                let io = HeadIo {
                    q: qkv.as_ptr(),
                    k: qkv[hd..].as_ptr(),
                    v: qkv[2 * hd..].as_ptr(),
                    in_stride: stride,
                    out: out.as_mut_ptr(),
                    out_stride,
                    len,
                    head_dim: hd,
                };
                let row_bias: Option<RowBias> = if biased { Some(&bias) } else { None };
                // SAFETY: `qkv` holds `len` rows of `stride` >= 3 * hd, `out` `len` rows of
                // `out_stride` >= hd.
                unsafe { attend_head_with(path, io, row_bias) };
                let at = |i: usize, j: usize| qkv[i * stride + j] as f64;
                let mut worst = 0f64;
                for i in 0..len {
                    let mut scores: Vec<f64> = (0..len)
                        .map(|j| (0..hd).map(|d| at(i, d) * at(j, hd + d)).sum())
                        .collect();
                    if biased {
                        let mut b = vec![0f32; len];
                        bias(i, &mut b);
                        scores.iter_mut().zip(&b).for_each(|(s, b)| *s += *b as f64);
                    }
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for d in 0..hd {
                        let want: f64 = (0..len).map(|j| e[j] / sum * at(j, 2 * hd + d)).sum();
                        let got = out[i * out_stride + d] as f64;
                        worst = worst.max((got - want).abs());
                    }
                    // The gap between output rows is left alone.
                    assert!(
                        out[i * out_stride + hd..(i + 1) * out_stride]
                            .iter()
                            .all(|v| v.is_nan())
                    );
                }
                assert!(
                    worst < 2e-5,
                    "path {path} len {len} head {hd} bias {biased}: max abs err {worst:.2e}"
                );
            }
        }
    }
}

/// The F32 product against f64, in its documented order bit for bit on every path, and each
/// row's result the same bits alone as in any batch.
#[test]
fn matmul_nt_matches_reference_and_is_batch_invariant() {
    let mut rng = Rng(13);
    for path in paths() {
        for &(rows, k, n) in &[
            (1, 384, 3),
            (7, 384, 36),
            (16, 100, 5),
            (5, 13, 2),
            (9, 1, 1),
        ] {
            let x = rng.vec(rows * k, Rng::act);
            let w = rng.vec(n * k, |r| r.uniform() * 0.1);
            let mut out = vec![0f32; rows * n];
            matmul_nt_with(path, &x, k, &w, &mut out);
            for r in 0..rows {
                for i in 0..n {
                    let want: f64 = (0..k)
                        .map(|j| x[r * k + j] as f64 * w[i * k + j] as f64)
                        .sum();
                    let scale: f64 = (0..k)
                        .map(|j| (x[r * k + j] as f64 * w[i * k + j] as f64).abs())
                        .sum();
                    let got = out[r * n + i] as f64;
                    assert!(
                        (got - want).abs() <= 1e-6 * scale + 1e-7,
                        "path {path} {rows}x{k}x{n} [{r}][{i}]: {got} vs {want}"
                    );
                }
                // The documented order, bit for bit: 16 lane sums, summed in lane order, then
                // the tail.
                for i in 0..n {
                    let (xr, wr) = (&x[r * k..(r + 1) * k], &w[i * k..(i + 1) * k]);
                    let body = k / 16 * 16;
                    let mut lanes = [0f32; 16];
                    for j in 0..body {
                        lanes[j % 16] += xr[j] * wr[j];
                    }
                    let tail: f32 = xr[body..].iter().zip(&wr[body..]).map(|(a, b)| a * b).sum();
                    let want = lanes.iter().sum::<f32>() + tail;
                    assert_eq!(
                        out[r * n + i].to_bits(),
                        want.to_bits(),
                        "path {path} [{r}][{i}]"
                    );
                }
                let mut alone = vec![0f32; n];
                matmul_nt_with(path, &x[r * k..(r + 1) * k], k, &w, &mut alone);
                assert!(
                    same_bits(&alone, &out[r * n..(r + 1) * n]),
                    "path {path}: row {r} depends on the batch"
                );
            }
        }
    }
}

#[test]
fn layer_norm_matches_reference() {
    let mut rng = Rng(9);
    for path in paths() {
        for &h in &[1usize, 7, 16, 33, 384] {
            let rows = 5;
            let mut x = rng.vec(rows * h, |r| r.act() * 3.0 + 1.5);
            let g = rng.vec(h, |r| 1.0 + r.uniform() * 0.2);
            let b = rng.vec(h, |r| r.uniform() * 0.1);
            let orig = x.clone();
            layer_norm_rows_with(path, &mut x, &g, &b, 1e-12);
            for r in 0..rows {
                let row = &orig[r * h..(r + 1) * h];
                let mean = row.iter().map(|&v| v as f64).sum::<f64>() / h as f64;
                let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / h as f64;
                for i in 0..h {
                    let e =
                        (row[i] as f64 - mean) / (var + 1e-12).sqrt() * g[i] as f64 + b[i] as f64;
                    let d = (e - x[r * h + i] as f64).abs();
                    assert!(d < 2e-5 * (1.0 + e.abs()), "path {path} h {h}: {d}");
                }
            }
        }
    }
}

// ---------------- dispatch / pool ----------------

#[test]
fn active_path_honours_env() {
    assert_eq!(Path::parse("AVX2"), Some(Path::Avx2));
    assert_eq!(Path::parse("scalar"), Some(Path::Scalar));
    assert_eq!(Path::parse("avx512vnni"), Some(Path::Avx512Vnni));
    assert_eq!(Path::parse("AMX"), Some(Path::Amx));
    assert_eq!(Path::ALL[0], Path::Amx, "AMX is tried first");
    assert_eq!(Path::parse("neon"), None);
    assert_eq!(Path::parse("Neon-I8MM"), Some(Path::NeonI8mm));
    assert_eq!(Path::parse("neon-dot"), Some(Path::NeonDot));
    for p in Path::ALL {
        assert_eq!(Path::parse(p.name()), Some(p));
    }
    let active = Path::active();
    match std::env::var("QMODEL_KERNEL") {
        Ok(v) if !v.is_empty() => assert_eq!(active, Path::parse(&v).unwrap()),
        _ => assert_eq!(active, Path::best()),
    }
    eprintln!("active path: {active}, supported: {:?}", Path::supported());
}

#[test]
fn pool_runs_every_task_once_and_propagates_panics() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let pool = ThreadPool::new(3);
    for n in [1usize, 2, 5, 64, 1000] {
        let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
        pool.run(n, &|i| {
            hits[i].fetch_add(1, Ordering::Relaxed);
            // nested use runs inline instead of deadlocking
            pool.run(2, &|_| {});
        });
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
    }
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        pool.run(8, &|i| assert!(i != 5, "boom"));
    }));
    assert!(r.is_err());
    // Still usable afterwards.
    let c = AtomicUsize::new(0);
    pool.run(10, &|_| {
        c.fetch_add(1, Ordering::Relaxed);
    });
    assert_eq!(c.load(Ordering::Relaxed), 10);
}
