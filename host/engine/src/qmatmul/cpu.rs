//! The SIMD level the matmul kernels run at, chosen once at start from what the CPU
//! reports (`is_x86_feature_detected!`), never from how the binary was compiled: the
//! same build runs its AVX2 kernels where the CPU has them and its portable ones where
//! it does not, instead of dying with SIGILL.

use std::sync::OnceLock;

use super::repack::Layout;

/// A kernel family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Simd {
    /// AVX-512 (F, BW, VL) with VNNI, on top of AVX2: every block format repacked at
    /// load and dotted with `vpdpbusd` (`qmatmul/vnni.rs`), in one canonical float
    /// order whatever the batch height.
    Avx512Vnni,
    /// AVX2 with FMA and F16C (x86-64-v3): the same repacked weights and canonical
    /// order with `vpmaddubsw` (`qmatmul/avx2.rs`): the VNNI kernels' bits.
    Avx2,
    /// AVX2 with FMA and F16C: lynx's first batched kernels, weights in their GGUF
    /// blocks and candle's arithmetic bit for bit (what the golden recordings pin).
    Avx2Candle,
    /// Plain Rust: correct everywhere, batched for Q4_1/Q8_0, and candle's own
    /// (run-time dispatched) kernels one sequence at a time for the other formats.
    Portable,
}

/// What the operator asked for (`--simd`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SimdChoice {
    /// The best level this CPU has.
    Auto,
    /// AVX-512 with VNNI (and AVX2+FMA+F16C); refused at start on a CPU without them.
    #[value(name = "avx512-vnni")]
    Avx512Vnni,
    /// AVX2+FMA+F16C, repacked weights; refused at start on a CPU without them.
    Avx2,
    /// AVX2+FMA+F16C in candle's arithmetic; refused at start on a CPU without them.
    #[value(name = "avx2-candle")]
    Avx2Candle,
    /// The portable kernels, whatever the CPU has.
    Portable,
}

static LEVEL: OnceLock<Simd> = OnceLock::new();

/// Whether this CPU can run the AVX2 kernels.
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU can run the AVX-512 VNNI kernels (and the AVX2 ones beside them).
pub fn has_avx512_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_avx2()
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl Simd {
    /// Whether the AVX2 kernels may run at this level (every level above portable).
    pub fn avx2(self) -> bool {
        matches!(self, Simd::Avx2 | Simd::Avx2Candle | Simd::Avx512Vnni)
    }

    /// How weights are repacked for the integer kernels at this level (`None`: they
    /// stay in their GGUF blocks).
    pub fn layout(self) -> Option<Layout> {
        match self {
            Simd::Avx512Vnni => Some(Layout::Masks),
            Simd::Avx2 => Some(Layout::Bytes),
            Simd::Avx2Candle | Simd::Portable => None,
        }
    }

    /// Whether weights are repacked for the integer kernels at this level.
    pub fn repacks(self) -> bool {
        self.layout().is_some()
    }
}

/// The best level this CPU has.
fn best() -> Simd {
    if has_avx512_vnni() {
        Simd::Avx512Vnni
    } else if has_avx2() {
        Simd::Avx2
    } else {
        Simd::Portable
    }
}

/// Fixes the level for the life of the process. Called once by `main` before the model
/// loads; a later call (tests, benches) cannot change it once a kernel ran.
pub fn init(choice: SimdChoice) -> Result<Simd, String> {
    let want = match choice {
        SimdChoice::Auto => best(),
        SimdChoice::Portable => Simd::Portable,
        SimdChoice::Avx512Vnni if has_avx512_vnni() => Simd::Avx512Vnni,
        SimdChoice::Avx512Vnni => {
            return Err(format!(
                "--simd {} asked for, but this CPU lacks it ({})",
                flag_name(choice),
                features()
            ))
        }
        SimdChoice::Avx2 if has_avx2() => Simd::Avx2,
        SimdChoice::Avx2Candle if has_avx2() => Simd::Avx2Candle,
        SimdChoice::Avx2 | SimdChoice::Avx2Candle => {
            return Err(format!(
                "--simd {} asked for, but this CPU lacks AVX2, FMA or F16C ({})",
                flag_name(choice),
                features()
            ))
        }
    };
    let got = *LEVEL.get_or_init(|| want);
    if got != want {
        return Err(format!("the SIMD level is already {got:?}"));
    }
    Ok(got)
}

/// `choice` as `--simd` spells it (clap's name for the value).
fn flag_name(choice: SimdChoice) -> String {
    clap::ValueEnum::to_possible_value(&choice)
        .map_or_else(|| format!("{choice:?}"), |v| v.get_name().to_owned())
}

/// The level in force: `init`'s, or the best the CPU has if nothing chose.
pub fn simd() -> Simd {
    *LEVEL.get_or_init(best)
}

/// The CPU's SIMD features, for the start-up log line.
pub fn features() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        let mut have = Vec::new();
        macro_rules! probe {
            ($($f:tt),*) => {$(
                if std::is_x86_feature_detected!($f) {
                    have.push($f);
                }
            )*};
        }
        probe!(
            "sse4.2",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512vnni",
            "avxvnni"
        );
        if have.is_empty() {
            "x86-64 baseline".into()
        } else {
            have.join(",")
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH.to_string()
    }
}
