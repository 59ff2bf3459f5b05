//! Runtime CPU-feature dispatch.

use std::sync::OnceLock;

/// A kernel implementation. All paths produce bit-identical int32
/// accumulations and bit-identical `linear` outputs; softmax/LayerNorm differ
/// only by summation order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Path {
    /// Intel AMX-INT8 (Sapphire Rapids and later Xeons, Linux): `tdpbssd` on 16 x 64-byte
    /// tiles, AVX-512 F/BW quantizer and epilogue. Only offered once the kernel has granted
    /// the tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`) and a known-answer product on the
    /// instructions matched the scalar path. Not yet run on AMX hardware: verified on an
    /// emulator of the tile instructions (see `gemm::amx`).
    Amx,
    /// AVX-512 F/BW + VNNI: `vpdpbusd` on 512-bit vectors (u8 x s8, +128 offset).
    Avx512Vnni,
    /// AVX2 (+FMA present): `vpsignb` + `vpmaddubsw` + `vpmaddwd` on 256-bit vectors.
    Avx2,
    /// Arm int8 matrix multiply (FEAT_I8MM, with dotprod): `smmla`, a 2x8 by 8x2 int8
    /// product per instruction (Graviton 3/4, Ampere One, Neoverse V1/V2/N2).
    NeonI8mm,
    /// Arm dot product (FEAT_DotProd): `sdot`, four int8 products per int32 lane
    /// (Graviton 2, Ampere Altra, Neoverse N1 and every later core).
    NeonDot,
    /// Portable Rust, no intrinsics.
    Scalar,
}

impl Path {
    /// Every path, fastest first.
    pub const ALL: [Path; 6] = [
        Path::Amx,
        Path::Avx512Vnni,
        Path::Avx2,
        Path::NeonI8mm,
        Path::NeonDot,
        Path::Scalar,
    ];

    /// The name used by `QMODEL_KERNEL`.
    pub fn name(self) -> &'static str {
        match self {
            Path::Amx => "amx",
            Path::Avx512Vnni => "avx512vnni",
            Path::Avx2 => "avx2",
            Path::NeonI8mm => "neon-i8mm",
            Path::NeonDot => "neon-dot",
            Path::Scalar => "scalar",
        }
    }

    /// Every name, comma-separated, for messages.
    pub fn names() -> String {
        Path::ALL.map(Path::name).join(", ")
    }

    /// Parses a `QMODEL_KERNEL` value (case-insensitive).
    pub fn parse(s: &str) -> Option<Path> {
        Path::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s.trim()))
    }

    /// Whether this CPU can run the path.
    pub fn is_supported(self) -> bool {
        match self {
            Path::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Path::Amx => crate::gemm::amx::available(),
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => {
                std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Path::Avx512Vnni => {
                std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "aarch64")]
            Path::NeonDot => std::arch::is_aarch64_feature_detected!("dotprod"),
            // The i8mm kernel hands odd rows to the dot-product one.
            #[cfg(target_arch = "aarch64")]
            Path::NeonI8mm => {
                std::arch::is_aarch64_feature_detected!("i8mm")
                    && std::arch::is_aarch64_feature_detected!("dotprod")
            }
            _ => false,
        }
    }

    /// Paths this CPU supports, fastest first.
    pub fn supported() -> Vec<Path> {
        Path::ALL.into_iter().filter(|p| p.is_supported()).collect()
    }

    /// The fastest supported path.
    pub fn best() -> Path {
        Path::ALL
            .into_iter()
            .find(|p| p.is_supported())
            .unwrap_or(Path::Scalar)
    }

    /// The path `QMODEL_KERNEL` asks for, or [`Path::best`] when it is unset or empty; an
    /// unknown name or a path this CPU lacks is an error (a forced path that silently fell
    /// back would defeat the point of forcing it). Servers call it at start to refuse a bad
    /// value with that message instead of panicking at the first product.
    pub fn from_env() -> Result<Path, String> {
        match std::env::var("QMODEL_KERNEL") {
            Ok(v) if !v.trim().is_empty() => {
                let p = Path::parse(&v).ok_or_else(|| {
                    format!("QMODEL_KERNEL={v:?}: expected one of {}", Path::names())
                })?;
                if !p.is_supported() {
                    // AMX can also lack the kernel's permission or fail its self-check.
                    #[cfg(target_arch = "x86_64")]
                    let why = match p {
                        Path::Amx => crate::gemm::amx::status()
                            .err()
                            .map_or(String::new(), |why| format!("{why}; ")),
                        _ => String::new(),
                    };
                    #[cfg(not(target_arch = "x86_64"))]
                    let why = "";
                    return Err(format!(
                        "QMODEL_KERNEL={v}: this CPU does not support it ({why}supported: {})",
                        Path::supported()
                            .into_iter()
                            .map(Path::name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                Ok(p)
            }
            _ => Ok(Path::best()),
        }
    }

    /// The process-wide path, [`Path::from_env`] read once. Panics where that is an error.
    pub fn active() -> Path {
        static ACTIVE: OnceLock<Path> = OnceLock::new();
        *ACTIVE.get_or_init(|| Path::from_env().unwrap_or_else(|e| panic!("{e}")))
    }

    /// Panics unless supported; called before entering `#[target_feature]` code.
    #[inline]
    pub fn assert_supported(self) {
        assert!(
            self.is_supported(),
            "kernel path {} not supported on this CPU",
            self.name()
        );
    }
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
