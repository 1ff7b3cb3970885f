//! The AVX-512 VNNI kernels over repacked weights (`repack.rs`: sixteen columns
//! interleaved, one per 32-bit lane, bit planes as 64-bit masks) and `Q8x`
//! activations, in the canonical order of `tiles.rs`:
//!
//! ```text
//! i   = Σ vpdpbusd(q_w, broadcast 4 activation bytes)   (exact integer, any order)
//! acc = fma(dw * dx, float(i), acc)
//! acc = fma(mw, dx * Σq_x, acc)
//! ```
//!
//! Two micro-kernels do that: the single-row GEMV ([`tile`], four groups of sixteen
//! columns, from the row-major activations) and the many-row GEMM ([`rows_tile`], one
//! group against up to eight rows, from the tiled activations, each block of weights
//! unpacked once for all its rows). Each float step serves sixteen columns and 32
//! values: two FMAs and a multiply per 512 multiply-adds.

use std::arch::x86_64::*;

use super::acts::{Acts, XT_BYTES, XT_FLOATS};
use super::repack::{Repacked, BLOCK, LANES};
use super::tiles::{dispatch_tiles, Kernel, Put, Shape};
use super::TILE_ROWS;

/// The AVX-512 VNNI tiles: units of sixteen columns.
pub struct Vnni;

impl Kernel for Vnni {
    const WIDTH: usize = LANES;
    const GEMV_UNITS: usize = 4;
    const ROWS: usize = 8;

    unsafe fn tiles<const B: u8, const G: usize>(
        w: &Repacked,
        shape: Shape,
        acts: &Acts,
        u0: usize,
        units: usize,
        r0: usize,
        rows: usize,
        put: &mut Put<'_>,
    ) {
        let lanes = |v: __m512| {
            // SAFETY: `__m512` is sixteen f32, every bit pattern a valid array.
            unsafe { std::mem::transmute::<__m512, [f32; LANES]>(v) }
        };
        if acts.m > 1 {
            // Many rows: one unit against a tile of `rows`, from the tiled activations.
            assert!(units == 1 && r0.is_multiple_of(TILE_ROWS) && rows <= TILE_ROWS);
            let t = r0 / TILE_ROWS;
            macro_rules! rows {
                ($($h:literal)*) => {
                    match rows {
                        $($h => {
                            // SAFETY: the caller's CPU has the features `rows_tile` enables.
                            let o = unsafe { rows_tile::<B, G, $h>(w, shape, u0, acts, t) };
                            (0..$h).for_each(|r| put(u0, r0 + r, &lanes(o[r])));
                        })*
                        _ => unreachable!("a tile height the kernel does not compile"),
                    }
                };
            }
            rows!(1 2 3 4 5 6 7 8);
            return;
        }
        // SAFETY: the caller's CPU has the features `tile` enables.
        unsafe { dispatch_tiles!(tile, lanes, (w, shape, acts, u0, units, r0, rows, put), 1) }
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn load(p: &[u8]) -> __m512i {
    assert!(p.len() >= 64);
    // SAFETY: 64 readable bytes (asserted); the load is unaligned.
    unsafe { _mm512_loadu_si512(p.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn mask(p: &[u8], i: usize) -> __mmask64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&p[8 * i..8 * i + 8]);
    _cvtu64_mask64(u64::from_le_bytes(b))
}

/// Chunks `2l` and `2l + 1` (four values of each column) of a block, `B` bits.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn chunks<const B: u8>(block: &[u8], l: usize) -> (__m512i, __m512i) {
    if B == 8 {
        return (load(&block[128 * l..]), load(&block[128 * l + 64..]));
    }
    let v = load(&block[64 * l..]);
    let m4 = _mm512_set1_epi8(0x0F);
    let mut lo = _mm512_and_si512(v, m4);
    let mut hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
    if B >= 5 {
        let planes = &block[256..];
        let sixteen = _mm512_set1_epi8(16);
        lo = _mm512_mask_add_epi8(lo, mask(planes, 2 * l), lo, sixteen);
        hi = _mm512_mask_add_epi8(hi, mask(planes, 2 * l + 1), hi, sixteen);
        if B >= 6 {
            let planes = &block[320..];
            let t32 = _mm512_set1_epi8(32);
            lo = _mm512_mask_add_epi8(lo, mask(planes, 2 * l), lo, t32);
            hi = _mm512_mask_add_epi8(hi, mask(planes, 2 * l + 1), hi, t32);
        }
    }
    (lo, hi)
}

/// Sixteen f16 scales at `at`, widened.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn scales(block: &[u8], at: usize) -> __m512 {
    assert!(block.len() >= at + 32);
    // SAFETY: 32 readable bytes (asserted); the load is unaligned.
    _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(block[at..].as_ptr().cast()) })
}

/// Group `g`'s `dw` and `mw` for the block's sixteen columns: the stored mins, or
/// `-offset * dw` (`neg_offset` is `-offset` in every lane).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn group_scales<const G: usize>(
    block: &[u8],
    shape: Shape,
    g: usize,
    neg_offset: __m512,
) -> (__m512, __m512) {
    let dw = scales(block, shape.q_bytes + 2 * LANES * g);
    let mw = if shape.mins {
        scales(block, shape.q_bytes + 2 * LANES * (G + g))
    } else {
        _mm512_mul_ps(dw, neg_offset)
    };
    (dw, mw)
}

/// Four activation bytes, broadcast to every lane.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn bcast(q: &[i8; BLOCK], at: usize) -> __m512i {
    assert!(at + 4 <= BLOCK);
    // SAFETY: bytes `at..at + 4` of `q` are readable (asserted); the read is unaligned.
    // A broadcast from memory is a load, not a shuffle competing with `vpdpbusd`.
    _mm512_set1_epi32(unsafe { std::ptr::read_unaligned(q.as_ptr().add(at).cast::<i32>()) })
}

/// Column groups `cg0..cg0 + C` against rows `r0..r0 + R`: `[c][r]`, sixteen columns
/// a vector. `G`: groups per block (1, or 2 for Q6_K).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn tile<const B: u8, const G: usize, const C: usize, const R: usize>(
    w: &Repacked,
    shape: Shape,
    cg0: usize,
    acts: &Acts,
    r0: usize,
) -> [[__m512; R]; C] {
    let (k, nb) = (w.k, w.blocks);
    assert!(r0 + R <= acts.m && acts.k == k && acts.nb == nb);
    assert!(acts.xq.len() >= acts.m * k && acts.xd.len() >= acts.m * nb);
    assert!(acts.xs32.len() >= acts.m * nb && acts.xs16.len() >= 2 * acts.m * nb);
    let groups: [&[u8]; C] = std::array::from_fn(|c| w.group(cg0 + c));
    let rows: [&[i8]; R] = std::array::from_fn(|r| &acts.xq[(r0 + r) * k..(r0 + r + 1) * k]);
    let neg_offset = _mm512_set1_ps(-shape.offset);
    let mut acc = [[_mm512_setzero_ps(); R]; C];
    // Pairs of four-value chunks per group: 4, or 2 for groups of 16.
    let per_group = 4 / G;
    for b in 0..nb {
        let mut int = [[_mm512_setzero_si512(); R]; C];
        // A plain loop, as in `avx2.rs`: `array::from_fn`'s closure can stay a call per
        // block, and every vector register is caller-saved.
        let mut xs: [&[i8; BLOCK]; R] = [&[0; BLOCK]; R];
        for (x, row) in xs.iter_mut().zip(&rows) {
            if let Ok(block) = row[b * BLOCK..(b + 1) * BLOCK].try_into() {
                *x = block;
            }
        }
        for g in 0..G {
            for l in g * per_group..(g + 1) * per_group {
                for c in 0..C {
                    let block = &groups[c][b * shape.block_bytes..(b + 1) * shape.block_bytes];
                    let (lo, hi) = chunks::<B>(block, l);
                    for r in 0..R {
                        let i = _mm512_dpbusd_epi32(int[c][r], lo, bcast(xs[r], 8 * l));
                        int[c][r] = _mm512_dpbusd_epi32(i, hi, bcast(xs[r], 8 * l + 4));
                    }
                }
            }
            for c in 0..C {
                let block = &groups[c][b * shape.block_bytes..(b + 1) * shape.block_bytes];
                let (dw, mw) = group_scales::<G>(block, shape, g, neg_offset);
                for r in 0..R {
                    let row = r0 + r;
                    let dx = _mm512_set1_ps(acts.xd[row * nb + b]);
                    let sx = _mm512_set1_ps(if G == 1 {
                        acts.xs32[row * nb + b]
                    } else {
                        acts.xs16[2 * (row * nb + b) + g]
                    });
                    let scale = _mm512_mul_ps(dw, dx);
                    let a = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(int[c][r]), acc[c][r]);
                    acc[c][r] = _mm512_fmadd_ps(mw, sx, a);
                    int[c][r] = _mm512_setzero_si512();
                }
            }
        }
    }
    acc
}

/// Column group `cg` against rows `TILE_ROWS * t..` (`R` of them), from the tiled
/// activations ([`Acts::xt`]): the many-row GEMM, in the same canonical order as
/// [`tile`]. Every broadcast and row scale sits at a constant offset from one block
/// pointer, so each folds into its `vpdpbusd` or FMA as a memory operand: no
/// broadcast register is live across rows, nothing spills.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn rows_tile<const B: u8, const G: usize, const R: usize>(
    w: &Repacked,
    shape: Shape,
    cg: usize,
    acts: &Acts,
    t: usize,
) -> [__m512; R] {
    let nb = w.blocks;
    assert!(R <= TILE_ROWS && acts.k == w.k && acts.nb == nb);
    let group = w.group(cg);
    let xt = &acts.xt[t * nb * XT_BYTES..(t + 1) * nb * XT_BYTES];
    let xf = &acts.xt_f[t * nb * XT_FLOATS..(t + 1) * nb * XT_FLOATS];
    let neg_offset = _mm512_set1_ps(-shape.offset);
    let mut acc = [_mm512_setzero_ps(); R];
    // Pairs of four-value chunks per group: 4, or 2 for groups of 16.
    let per_group = 4 / G;
    let blocks = group.chunks_exact(shape.block_bytes);
    let tiles = xt.chunks_exact(XT_BYTES).zip(xf.chunks_exact(XT_FLOATS));
    for (block, (x, f)) in blocks.zip(tiles) {
        let (Ok(x), Ok(f)) = (
            <&[i8; XT_BYTES]>::try_from(x),
            <&[f32; XT_FLOATS]>::try_from(f),
        ) else {
            continue;
        };
        for g in 0..G {
            let mut int = [_mm512_setzero_si512(); R];
            for l in g * per_group..(g + 1) * per_group {
                let (lo, hi) = chunks::<B>(block, l);
                for (r, int) in int.iter_mut().enumerate() {
                    let i = dpbusd_bcast(*int, lo, x, (2 * l) * 4 * TILE_ROWS + 4 * r);
                    *int = dpbusd_bcast(i, hi, x, (2 * l + 1) * 4 * TILE_ROWS + 4 * r);
                }
            }
            let (dw, mw) = group_scales::<G>(block, shape, g, neg_offset);
            // Each row's `d * Σq` of the group: of 32 values, or of the half `g`.
            let sums = if G == 1 {
                TILE_ROWS
            } else {
                (2 + g) * TILE_ROWS
            };
            for r in 0..R {
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(f[r]));
                let a = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(int[r]), acc[r]);
                acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(f[sums + r]), a);
            }
        }
    }
    acc
}

/// `acc + vpdpbusd(w, four activation bytes of a tile's block at `at`, broadcast)`.
///
/// In assembly so that the broadcast stays the instruction's memory operand: from the
/// intrinsics LLVM materializes every broadcast of a block first (64 of them for eight
/// rows) and spills them to the stack, which cost a third of the tile's time.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn dpbusd_bcast(acc: __m512i, w: __m512i, x: &[i8; XT_BYTES], at: usize) -> __m512i {
    assert!(at + 4 <= XT_BYTES);
    let mut acc = acc;
    // SAFETY: the instruction reads bytes `at..at + 4` of `x` (asserted in bounds) and
    // writes only `acc`; the caller's CPU has AVX-512 VNNI (the target features).
    unsafe {
        std::arch::asm!(
            "vpdpbusd {acc}, {w}, dword ptr [{p}]{{1to16}}",
            acc = inout(zmm_reg) acc,
            w = in(zmm_reg) w,
            p = in(reg) x.as_ptr().add(at),
            options(pure, readonly, nostack, preserves_flags),
        );
    }
    acc
}
