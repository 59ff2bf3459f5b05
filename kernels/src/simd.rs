//! A minimal f32 vector abstraction so each elementwise algorithm (exp, GELU,
//! softmax, LayerNorm, the GEMM epilogue) is written once and instantiated for
//! AVX-512 (16 lanes), AVX2 (8 lanes), Arm NEON (4 lanes) and plain `f32` (1 lane).
//!
//! Every elementwise operation here is a single IEEE-754 operation (no FMA,
//! rounding by the `1.5 * 2^23` magic-number trick), so an elementwise result is
//! bit-identical whichever width computes it. Only horizontal reductions (sums)
//! differ in order between widths.
//!
//! All methods are `#[inline(always)]` and are only meant to be called from a
//! function compiled with the matching `#[target_feature]`.

#![allow(clippy::missing_safety_doc)]

/// Round-to-nearest-even for |x| < 2^22 without SSE4.1: (x + M) - M.
pub(crate) const ROUND_MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23

pub(crate) trait V: Copy {
    const W: usize;
    fn splat(x: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    /// Loads `n < W` lanes, the rest set to `fill`.
    #[inline(always)]
    unsafe fn load_part(p: *const f32, n: usize, fill: f32) -> Self {
        let mut buf = [fill; 16];
        unsafe {
            std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), n);
            Self::load(buf.as_ptr())
        }
    }
    /// Stores the first `n < W` lanes.
    #[inline(always)]
    unsafe fn store_part(self, p: *mut f32, n: usize) {
        let mut buf = [0f32; 16];
        unsafe {
            self.store(buf.as_mut_ptr());
            std::ptr::copy_nonoverlapping(buf.as_ptr(), p, n);
        }
    }
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
    /// `self * a + b`, fused where the ISA has FMA: the one operation here whose result
    /// depends on the width (scalar rounds twice). Only attention's dot products use it, and
    /// those sum in a per-width order anyway.
    fn mul_add(self, a: Self, b: Self) -> Self;
    fn min(self, o: Self) -> Self;
    fn max(self, o: Self) -> Self;
    /// `2^n` for `n` an integral value in [-126, 127].
    fn pow2i(self) -> Self;
    /// `self < o ? t : f`, lane-wise.
    fn select_lt(self, o: Self, t: Self, f: Self) -> Self;
    fn hsum(self) -> f32;
    fn hmax(self) -> f32;
    /// Stores integral lanes in [-127, 127] as bytes `(v as i8) ^ xor`.
    unsafe fn store_i8(self, p: *mut u8, xor: u8);
    #[inline(always)]
    fn round_even(self) -> Self {
        let m = Self::splat(ROUND_MAGIC);
        self.add(m).sub(m)
    }
}

impl V for f32 {
    const W: usize = 1;
    #[inline(always)]
    fn splat(x: f32) -> Self {
        x
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        unsafe { *p }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        unsafe { *p = self }
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        self + o
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        self - o
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        self * o
    }
    #[inline(always)]
    fn div(self, o: Self) -> Self {
        self / o
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        // Not `f32::mul_add`: without a target FMA that is a slow libm call.
        self * a + b
    }
    // min/max mirror x86 minps/maxps: return the second operand unless the
    // first is strictly smaller/greater (matters only for NaN and -0.0).
    #[inline(always)]
    fn min(self, o: Self) -> Self {
        if self < o { self } else { o }
    }
    #[inline(always)]
    fn max(self, o: Self) -> Self {
        if self > o { self } else { o }
    }
    #[inline(always)]
    fn pow2i(self) -> Self {
        f32::from_bits(((self as i32 + 127) as u32) << 23)
    }
    #[inline(always)]
    fn select_lt(self, o: Self, t: Self, f: Self) -> Self {
        if self < o { t } else { f }
    }
    #[inline(always)]
    fn hsum(self) -> f32 {
        self
    }
    #[inline(always)]
    fn hmax(self) -> f32 {
        self
    }
    #[inline(always)]
    unsafe fn store_i8(self, p: *mut u8, xor: u8) {
        unsafe { *p = (self as i32 as i8 as u8) ^ xor }
    }
}

#[cfg(target_arch = "aarch64")]
pub(crate) use arm::F128;
#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{F256, F512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::V;
    use std::arch::x86_64::*;

    #[derive(Clone, Copy)]
    pub(crate) struct F512(pub __m512);
    #[derive(Clone, Copy)]
    pub(crate) struct F256(pub __m256);

    impl V for F512 {
        const W: usize = 16;
        #[inline(always)]
        fn splat(x: f32) -> Self {
            unsafe { F512(_mm512_set1_ps(x)) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { F512(_mm512_loadu_ps(p)) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm512_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn load_part(p: *const f32, n: usize, fill: f32) -> Self {
            unsafe {
                let m: __mmask16 = ((1u32 << n) - 1) as u16;
                F512(_mm512_mask_loadu_ps(_mm512_set1_ps(fill), m, p))
            }
        }
        #[inline(always)]
        unsafe fn store_part(self, p: *mut f32, n: usize) {
            unsafe {
                let m: __mmask16 = ((1u32 << n) - 1) as u16;
                _mm512_mask_storeu_ps(p, m, self.0)
            }
        }
        #[inline(always)]
        fn add(self, o: Self) -> Self {
            unsafe { F512(_mm512_add_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn sub(self, o: Self) -> Self {
            unsafe { F512(_mm512_sub_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn mul(self, o: Self) -> Self {
            unsafe { F512(_mm512_mul_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn div(self, o: Self) -> Self {
            unsafe { F512(_mm512_div_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn mul_add(self, a: Self, b: Self) -> Self {
            unsafe { F512(_mm512_fmadd_ps(self.0, a.0, b.0)) }
        }
        #[inline(always)]
        fn min(self, o: Self) -> Self {
            unsafe { F512(_mm512_min_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn max(self, o: Self) -> Self {
            unsafe { F512(_mm512_max_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn pow2i(self) -> Self {
            unsafe {
                let n = _mm512_cvttps_epi32(self.0);
                let e = _mm512_slli_epi32::<23>(_mm512_add_epi32(n, _mm512_set1_epi32(127)));
                F512(_mm512_castsi512_ps(e))
            }
        }
        #[inline(always)]
        fn select_lt(self, o: Self, t: Self, f: Self) -> Self {
            unsafe {
                let m = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(self.0, o.0);
                F512(_mm512_mask_blend_ps(m, f.0, t.0))
            }
        }
        #[inline(always)]
        fn hsum(self) -> f32 {
            unsafe { _mm512_reduce_add_ps(self.0) }
        }
        #[inline(always)]
        fn hmax(self) -> f32 {
            unsafe { _mm512_reduce_max_ps(self.0) }
        }
        #[inline(always)]
        unsafe fn store_i8(self, p: *mut u8, xor: u8) {
            unsafe {
                let b = _mm512_cvtsepi32_epi8(_mm512_cvttps_epi32(self.0));
                _mm_storeu_si128(
                    p as *mut __m128i,
                    _mm_xor_si128(b, _mm_set1_epi8(xor as i8)),
                );
            }
        }
    }

    impl V for F256 {
        const W: usize = 8;
        #[inline(always)]
        fn splat(x: f32) -> Self {
            unsafe { F256(_mm256_set1_ps(x)) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { F256(_mm256_loadu_ps(p)) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm256_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        fn add(self, o: Self) -> Self {
            unsafe { F256(_mm256_add_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn sub(self, o: Self) -> Self {
            unsafe { F256(_mm256_sub_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn mul(self, o: Self) -> Self {
            unsafe { F256(_mm256_mul_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn div(self, o: Self) -> Self {
            unsafe { F256(_mm256_div_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn mul_add(self, a: Self, b: Self) -> Self {
            unsafe { F256(_mm256_fmadd_ps(self.0, a.0, b.0)) }
        }
        #[inline(always)]
        fn min(self, o: Self) -> Self {
            unsafe { F256(_mm256_min_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn max(self, o: Self) -> Self {
            unsafe { F256(_mm256_max_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn pow2i(self) -> Self {
            unsafe {
                let n = _mm256_cvttps_epi32(self.0);
                let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(n, _mm256_set1_epi32(127)));
                F256(_mm256_castsi256_ps(e))
            }
        }
        #[inline(always)]
        fn select_lt(self, o: Self, t: Self, f: Self) -> Self {
            unsafe {
                let m = _mm256_cmp_ps::<_CMP_LT_OQ>(self.0, o.0);
                F256(_mm256_blendv_ps(f.0, t.0, m))
            }
        }
        #[inline(always)]
        fn hsum(self) -> f32 {
            unsafe {
                let lo = _mm256_castps256_ps128(self.0);
                let hi = _mm256_extractf128_ps::<1>(self.0);
                let s = _mm_add_ps(lo, hi);
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
                _mm_cvtss_f32(s)
            }
        }
        #[inline(always)]
        fn hmax(self) -> f32 {
            unsafe {
                let lo = _mm256_castps256_ps128(self.0);
                let hi = _mm256_extractf128_ps::<1>(self.0);
                let s = _mm_max_ps(lo, hi);
                let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_max_ss(s, _mm_shuffle_ps::<0b01>(s, s));
                _mm_cvtss_f32(s)
            }
        }
        #[inline(always)]
        unsafe fn store_i8(self, p: *mut u8, xor: u8) {
            unsafe {
                let i = _mm256_cvttps_epi32(self.0);
                let w =
                    _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256::<1>(i));
                let b = _mm_xor_si128(_mm_packs_epi16(w, w), _mm_set1_epi8(xor as i8));
                _mm_storel_epi64(p as *mut __m128i, b);
            }
        }
    }
}

/// NEON is part of every aarch64 CPU: these need no `#[target_feature]`.
#[cfg(target_arch = "aarch64")]
mod arm {
    use super::V;
    use std::arch::aarch64::*;

    #[derive(Clone, Copy)]
    pub(crate) struct F128(pub float32x4_t);

    impl V for F128 {
        const W: usize = 4;
        #[inline(always)]
        fn splat(x: f32) -> Self {
            unsafe { F128(vdupq_n_f32(x)) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { F128(vld1q_f32(p)) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { vst1q_f32(p, self.0) }
        }
        #[inline(always)]
        fn add(self, o: Self) -> Self {
            unsafe { F128(vaddq_f32(self.0, o.0)) }
        }
        #[inline(always)]
        fn sub(self, o: Self) -> Self {
            unsafe { F128(vsubq_f32(self.0, o.0)) }
        }
        #[inline(always)]
        fn mul(self, o: Self) -> Self {
            unsafe { F128(vmulq_f32(self.0, o.0)) }
        }
        #[inline(always)]
        fn div(self, o: Self) -> Self {
            unsafe { F128(vdivq_f32(self.0, o.0)) }
        }
        #[inline(always)]
        fn mul_add(self, a: Self, b: Self) -> Self {
            unsafe { F128(vfmaq_f32(b.0, self.0, a.0)) }
        }
        // min/max as compare-and-select, not `fmin`/`fmax`: the same answer as the x86
        // `minps`/`maxps` and the scalar `if` for every input, NaN included.
        #[inline(always)]
        fn min(self, o: Self) -> Self {
            unsafe { F128(vbslq_f32(vcltq_f32(self.0, o.0), self.0, o.0)) }
        }
        #[inline(always)]
        fn max(self, o: Self) -> Self {
            unsafe { F128(vbslq_f32(vcgtq_f32(self.0, o.0), self.0, o.0)) }
        }
        #[inline(always)]
        fn pow2i(self) -> Self {
            unsafe {
                let n = vcvtq_s32_f32(self.0);
                let e = vshlq_n_s32::<23>(vaddq_s32(n, vdupq_n_s32(127)));
                F128(vreinterpretq_f32_s32(e))
            }
        }
        #[inline(always)]
        fn select_lt(self, o: Self, t: Self, f: Self) -> Self {
            unsafe { F128(vbslq_f32(vcltq_f32(self.0, o.0), t.0, f.0)) }
        }
        #[inline(always)]
        fn hsum(self) -> f32 {
            unsafe { vaddvq_f32(self.0) }
        }
        #[inline(always)]
        fn hmax(self) -> f32 {
            // Lane by lane with `max` above (vmaxvq would propagate NaN differently).
            let mut lanes = [0f32; 4];
            unsafe { self.store(lanes.as_mut_ptr()) };
            lanes.into_iter().fold(lanes[0], V::max)
        }
        #[inline(always)]
        unsafe fn store_i8(self, p: *mut u8, xor: u8) {
            unsafe {
                let w = vqmovn_s32(vcvtq_s32_f32(self.0));
                let b = vqmovn_s16(vcombine_s16(w, w));
                let b = veor_u8(vreinterpret_u8_s8(b), vdup_n_u8(xor));
                let word = vget_lane_u32::<0>(vreinterpret_u32_u8(b));
                (p as *mut u32).write_unaligned(word);
            }
        }
    }
}
