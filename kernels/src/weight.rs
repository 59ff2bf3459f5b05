//! Pre-packed int8 weights and their serialized form.
//!
//! Layout (`LAYOUT_VERSION` 1, "panel16-k4"): output channels are grouped in
//! panels of 16; K is padded with zeros to a multiple of 4. Panel `p` is
//! `k4 * 16` bytes: for each group of 4 consecutive k, 16 channels x 4 bytes,
//! i.e. byte `(g * 16 + c) * 4 + t` holds `w[16p + c][4g + t]`. One 64-byte
//! load is exactly the `vpdpbusd` operand for 16 channels; the AVX2 kernel
//! reads it as two 32-byte halves. Channels past `out_features` are zero.

use std::fmt;

/// Output channels per packed panel.
pub const PANEL: usize = 16;
/// K values interleaved per channel (the `vpdpbusd` dot-4).
pub const KGROUP: usize = 4;
/// Version of the packed layout / serialized format.
pub const LAYOUT_VERSION: u32 = 1;
/// Largest supported `in_features`: keeps `sum_k (x+128) * w` below 2^31
/// (255 * 127 * 66_000 < 2^31).
pub const MAX_IN_FEATURES: usize = 66_000;

const MAGIC: &[u8; 4] = b"QKW8";
const LAYOUT_PANEL16_K4: u32 = 1;
const HEADER_LEN: usize = 64;

/// Symmetric per-output-channel int8 weight, pre-packed for the kernels.
///
/// `w[n][k] ~= scale[n] * q[n][k]`, `q` in [-127, 127] (never -128: the AVX2
/// path negates weights with `vpsignb`, which cannot negate -128).
#[derive(Clone, PartialEq)]
pub struct QuantizedWeight {
    n: usize,
    k: usize,
    /// `n_panels * 16`, zero past `n`.
    scales: Vec<f32>,
    /// Per-channel sum of `q`, `n_panels * 16`, zero past `n`.
    row_sums: Vec<i32>,
    packed: Vec<u8>,
}

/// A borrowed view of packed weights: what the kernels take. Obtain it from
/// a [`QuantizedWeight`] or, zero-copy, from serialized bytes (e.g. an mmap).
#[derive(Clone, Copy)]
pub struct WeightView<'a> {
    pub(crate) n: usize,
    pub(crate) k: usize,
    pub(crate) scales: &'a [f32],
    pub(crate) row_sums: &'a [i32],
    pub(crate) packed: &'a [u8],
}

/// Why serialized weights were rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatError {
    /// Not our magic bytes.
    BadMagic,
    /// A version or layout this build does not know.
    Unsupported {
        /// Format version found.
        version: u32,
        /// Layout id found.
        layout: u32,
    },
    /// Sizes or offsets inconsistent with the buffer.
    Corrupt(&'static str),
    /// Zero-copy view needs 4-byte-aligned input.
    Misaligned,
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormatError::BadMagic => write!(f, "not a qmodel int8 weight (bad magic)"),
            FormatError::Unsupported { version, layout } => {
                write!(
                    f,
                    "unsupported int8 weight format version {version} layout {layout}"
                )
            }
            FormatError::Corrupt(why) => write!(f, "corrupt int8 weight: {why}"),
            FormatError::Misaligned => write!(f, "int8 weight bytes not 4-byte aligned"),
        }
    }
}
impl std::error::Error for FormatError {}

pub(crate) fn k4_of(k: usize) -> usize {
    k.div_ceil(KGROUP) * KGROUP
}
pub(crate) fn panels_of(n: usize) -> usize {
    n.div_ceil(PANEL)
}

/// Symmetric quantization of one row to [-127, 127]; returns the scale.
/// `q = round_half_even(x * (127 / amax))`, scale = `amax / 127`.
pub(crate) fn quantize_row_i8(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, &v| {
        let a = v.abs();
        if a > m { a } else { m }
    });
    if amax == 0.0 || !amax.is_finite() {
        q.iter_mut().for_each(|v| *v = 0);
        return if amax == 0.0 { 0.0 } else { f32::NAN };
    }
    let inv = 127.0 / amax;
    for (d, &v) in q.iter_mut().zip(x) {
        let r = (v * inv + crate::simd::ROUND_MAGIC) - crate::simd::ROUND_MAGIC;
        *d = r.clamp(-127.0, 127.0) as i8;
    }
    amax / 127.0
}

impl QuantizedWeight {
    /// Quantizes a row-major `[out_features, in_features]` f32 matrix (the
    /// PyTorch `nn.Linear.weight` layout).
    pub fn from_f32(w: &[f32], out_features: usize, in_features: usize) -> Self {
        assert_eq!(w.len(), out_features * in_features, "weight size mismatch");
        let mut q = vec![0i8; w.len()];
        let mut scales = Vec::with_capacity(out_features);
        for (row, qrow) in w
            .chunks_exact(in_features.max(1))
            .zip(q.chunks_exact_mut(in_features.max(1)))
        {
            scales.push(quantize_row_i8(row, qrow));
        }
        if in_features == 0 {
            scales.resize(out_features, 0.0);
        }
        Self::from_int8(&q, &scales, out_features, in_features).expect("quantized values in range")
    }

    /// Packs already-quantized weights (`q` row-major `[out, in]`, values in
    /// [-127, 127]) with per-channel `scales`, e.g. from a Q8_0-like container.
    pub fn from_int8(
        q: &[i8],
        scales: &[f32],
        out_features: usize,
        in_features: usize,
    ) -> Result<Self, FormatError> {
        if q.len() != out_features * in_features || scales.len() != out_features {
            return Err(FormatError::Corrupt("int8 weight/scale size mismatch"));
        }
        if in_features > MAX_IN_FEATURES {
            return Err(FormatError::Corrupt("in_features above MAX_IN_FEATURES"));
        }
        if q.contains(&i8::MIN) {
            return Err(FormatError::Corrupt(
                "weight value -128 (must be in [-127, 127])",
            ));
        }
        let (n, k) = (out_features, in_features);
        let (k4, np) = (k4_of(k), panels_of(n));
        let mut packed = vec![0u8; np * k4 * PANEL];
        let mut row_sums = vec![0i32; np * PANEL];
        let mut sc = vec![0f32; np * PANEL];
        sc[..n].copy_from_slice(scales);
        for c in 0..n {
            let (p, cc) = (c / PANEL, c % PANEL);
            let base = p * k4 * PANEL;
            let row = &q[c * k..(c + 1) * k];
            row_sums[c] = row.iter().map(|&v| v as i32).sum();
            for (kk, &v) in row.iter().enumerate() {
                let (g, t) = (kk / KGROUP, kk % KGROUP);
                packed[base + (g * PANEL + cc) * KGROUP + t] = v as u8;
            }
        }
        Ok(QuantizedWeight {
            n,
            k,
            scales: sc,
            row_sums,
            packed,
        })
    }

    /// Borrowed view for the kernels.
    pub fn view(&self) -> WeightView<'_> {
        WeightView {
            n: self.n,
            k: self.k,
            scales: &self.scales,
            row_sums: &self.row_sums,
            packed: &self.packed,
        }
    }

    /// Output channels (rows of the PyTorch weight).
    pub fn out_features(&self) -> usize {
        self.n
    }
    /// Input features (K).
    pub fn in_features(&self) -> usize {
        self.k
    }
    /// Per-output-channel scales (`out_features` values).
    pub fn scales(&self) -> &[f32] {
        &self.scales[..self.n]
    }
    /// Unpacked int8 values, row-major `[out, in]`.
    pub fn to_int8(&self) -> Vec<i8> {
        self.view().to_int8()
    }
    /// Dequantized f32 weight, row-major `[out, in]`.
    pub fn to_f32(&self) -> Vec<f32> {
        self.view().to_f32()
    }

    /// Serializes (little-endian, 64-byte header, 64-byte-aligned sections):
    /// `[header][scales f32 x n_pad][row_sums i32 x n_pad][packed u8]`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let n_pad = self.scales.len();
        let scales_off = HEADER_LEN;
        let sums_off = scales_off + 4 * n_pad;
        let packed_off = sums_off + 4 * n_pad;
        let total = packed_off + self.packed.len();
        let mut b = Vec::with_capacity(total);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&LAYOUT_VERSION.to_le_bytes());
        b.extend_from_slice(&LAYOUT_PANEL16_K4.to_le_bytes());
        b.extend_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        for v in [
            self.n,
            self.k,
            scales_off,
            sums_off,
            packed_off,
            self.packed.len(),
        ] {
            b.extend_from_slice(&(v as u64).to_le_bytes());
        }
        debug_assert_eq!(b.len(), HEADER_LEN);
        self.scales
            .iter()
            .for_each(|v| b.extend_from_slice(&v.to_le_bytes()));
        self.row_sums
            .iter()
            .for_each(|v| b.extend_from_slice(&v.to_le_bytes()));
        b.extend_from_slice(&self.packed);
        b
    }

    /// Parses and validates [`QuantizedWeight::to_bytes`] output (any alignment; copies).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, FormatError> {
        let h = parse_header(bytes)?;
        let rd_f32 = |off: usize, i: usize| {
            f32::from_le_bytes(bytes[off + 4 * i..off + 4 * i + 4].try_into().unwrap())
        };
        let rd_i32 = |off: usize, i: usize| {
            i32::from_le_bytes(bytes[off + 4 * i..off + 4 * i + 4].try_into().unwrap())
        };
        let w = QuantizedWeight {
            n: h.n,
            k: h.k,
            scales: (0..h.n_pad).map(|i| rd_f32(h.scales_off, i)).collect(),
            row_sums: (0..h.n_pad).map(|i| rd_i32(h.sums_off, i)).collect(),
            packed: bytes[h.packed_off..h.packed_off + h.packed_len].to_vec(),
        };
        w.view().validate()?;
        Ok(w)
    }
}

struct Header {
    n: usize,
    k: usize,
    n_pad: usize,
    scales_off: usize,
    sums_off: usize,
    packed_off: usize,
    packed_len: usize,
}

fn parse_header(b: &[u8]) -> Result<Header, FormatError> {
    if b.len() < HEADER_LEN {
        return Err(FormatError::Corrupt("shorter than header"));
    }
    if &b[..4] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let (version, layout) = (u32_at(4), u32_at(8));
    if version != LAYOUT_VERSION || layout != LAYOUT_PANEL16_K4 || u32_at(12) as usize != HEADER_LEN
    {
        return Err(FormatError::Unsupported { version, layout });
    }
    let to_usize = |v: u64| usize::try_from(v).map_err(|_| FormatError::Corrupt("size overflow"));
    let n = to_usize(u64_at(16))?;
    let k = to_usize(u64_at(24))?;
    let (scales_off, sums_off, packed_off, packed_len) = (
        to_usize(u64_at(32))?,
        to_usize(u64_at(40))?,
        to_usize(u64_at(48))?,
        to_usize(u64_at(56))?,
    );
    if k > MAX_IN_FEATURES || n > (1 << 28) {
        return Err(FormatError::Corrupt("dimensions out of range"));
    }
    let n_pad = panels_of(n) * PANEL;
    if scales_off != HEADER_LEN
        || sums_off != scales_off + 4 * n_pad
        || packed_off != sums_off + 4 * n_pad
        || packed_len != panels_of(n) * k4_of(k) * PANEL
        || b.len() != packed_off + packed_len
    {
        return Err(FormatError::Corrupt("section sizes/offsets"));
    }
    Ok(Header {
        n,
        k,
        n_pad,
        scales_off,
        sums_off,
        packed_off,
        packed_len,
    })
}

impl<'a> WeightView<'a> {
    /// Zero-copy view over [`QuantizedWeight::to_bytes`] output, e.g. a
    /// memory-mapped file section. Needs 4-byte alignment (mmap and the
    /// format's 64-byte section alignment give it) and a little-endian host.
    /// Validates contents (O(n*k)).
    pub fn from_bytes(bytes: &'a [u8]) -> Result<Self, FormatError> {
        if cfg!(target_endian = "big") {
            return Err(FormatError::Corrupt("big-endian host"));
        }
        let h = parse_header(bytes)?;
        if !(bytes.as_ptr() as usize).is_multiple_of(4) {
            return Err(FormatError::Misaligned);
        }
        // SAFETY: in bounds (parse_header), aligned (checked), any bit
        // pattern is a valid f32/i32.
        let (scales, row_sums) = unsafe {
            (
                std::slice::from_raw_parts(bytes.as_ptr().add(h.scales_off) as *const f32, h.n_pad),
                std::slice::from_raw_parts(bytes.as_ptr().add(h.sums_off) as *const i32, h.n_pad),
            )
        };
        let v = WeightView {
            n: h.n,
            k: h.k,
            scales,
            row_sums,
            packed: &bytes[h.packed_off..h.packed_off + h.packed_len],
        };
        v.validate()?;
        Ok(v)
    }

    /// Checks padding is zero, no -128, row sums match, scales finite.
    fn validate(&self) -> Result<(), FormatError> {
        let (n, k, k4) = (self.n, self.k, self.k4());
        if self.scales[..n].iter().any(|s| !s.is_finite() || *s < 0.0)
            || self.scales[n..].iter().any(|&s| s != 0.0)
        {
            return Err(FormatError::Corrupt("scales"));
        }
        let mut sums = vec![0i32; self.row_sums.len()];
        for p in 0..self.n_panels() {
            let panel = &self.packed[p * k4 * PANEL..(p + 1) * k4 * PANEL];
            for (i, &b) in panel.iter().enumerate() {
                let (t, c, g) = (i % KGROUP, (i / KGROUP) % PANEL, i / (KGROUP * PANEL));
                let (ch, kk) = (p * PANEL + c, g * KGROUP + t);
                let v = b as i8;
                if (ch >= n || kk >= k) && v != 0 {
                    return Err(FormatError::Corrupt("non-zero padding"));
                }
                if v == i8::MIN {
                    return Err(FormatError::Corrupt("weight value -128"));
                }
                sums[ch] += v as i32;
            }
        }
        if sums != self.row_sums {
            return Err(FormatError::Corrupt("row sums do not match weights"));
        }
        Ok(())
    }

    /// Output channels.
    pub fn out_features(&self) -> usize {
        self.n
    }
    /// Input features.
    pub fn in_features(&self) -> usize {
        self.k
    }
    /// Per-channel scales (`out_features` values).
    pub fn scales(&self) -> &'a [f32] {
        &self.scales[..self.n]
    }
    pub(crate) fn k4(&self) -> usize {
        k4_of(self.k)
    }
    pub(crate) fn n_panels(&self) -> usize {
        panels_of(self.n)
    }
    /// Unpacked int8 values, row-major `[out, in]`.
    pub fn to_int8(&self) -> Vec<i8> {
        let (n, k, k4) = (self.n, self.k, self.k4());
        let mut q = vec![0i8; n * k];
        for c in 0..n {
            let base = (c / PANEL) * k4 * PANEL;
            for kk in 0..k {
                q[c * k + kk] = self.packed
                    [base + ((kk / KGROUP) * PANEL + c % PANEL) * KGROUP + kk % KGROUP]
                    as i8;
            }
        }
        q
    }
    /// Dequantized f32 weight, row-major `[out, in]`.
    pub fn to_f32(&self) -> Vec<f32> {
        let k = self.k.max(1);
        self.to_int8()
            .iter()
            .enumerate()
            .map(|(i, &q)| q as f32 * self.scales[i / k])
            .collect()
    }
}

impl<'a> From<&'a QuantizedWeight> for WeightView<'a> {
    fn from(w: &'a QuantizedWeight) -> Self {
        w.view()
    }
}

impl fmt::Debug for QuantizedWeight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuantizedWeight")
            .field("out", &self.n)
            .field("in", &self.k)
            .finish()
    }
}
impl fmt::Debug for WeightView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeightView")
            .field("out", &self.n)
            .field("in", &self.k)
            .finish()
    }
}
