//! Weights repacked at load for the integer kernels (`vnni.rs`, `avx2.rs`). Every block format of
//! lynx's files becomes one shape, `w = dw * q + mw`, with `q` unsigned (4, 5, 6 or 8
//! bits) and one `dw`, `mw` per group of 32 values (16 for Q6_K):
//!
//! | format | bits | group | `mw` |
//! |---|---|---|---|
//! | Q4_0 | 4 | 32 | `-8 dw` |
//! | Q4_1 | 4 | 32 | the block's `m` |
//! | Q5_0 | 5 | 32 | `-16 dw` |
//! | Q8_0 | 8 (`q + 128`) | 32 | `-128 dw` |
//! | Q4_K | 4 | 32 | `-dmin * min` (`dw = d * scale`) |
//! | Q5_K | 5 | 32 | `-dmin * min` |
//! | Q6_K | 6 | 16 | `-32 dw` (`dw = d * scale`) |
//!
//! Columns (weight rows: output features) are interleaved sixteen at a time, one per
//! 32-bit lane of a 512-bit register, as llama.cpp's repacked GEMM kernels do: a
//! `vpdpbusd` multiplies four values of each of sixteen columns by the same four
//! activations (broadcast), so every float step (a group's scale) serves sixteen
//! columns at once. Per group of sixteen columns and block of 32 values:
//! - 4 and more bits: four 64-byte vectors of nibbles; vector `L`, byte `4c + j`: value
//!   `8L + j` of column `c` in the low nibble, value `8L + 4 + j` in the high one (each
//!   vector gives chunks `2L` and `2L + 1` of four values);
//! - 5 and 6 bits: then per extra bit 64 bytes, in one of two layouts ([`Layout`]):
//!   for AVX-512, eight 64-bit masks, mask `i` bit `4c + j` that bit of value `4i + j`
//!   of column `c` (a mask register adds it); for AVX2, which has no mask registers,
//!   byte `4c + j` bit `i` (a shift and an AND move it into place);
//! - 8 bits instead: eight 64-byte vectors, vector `i` byte `4c + j` value `4i + j`;
//! - then the sixteen columns' `dw` of each group (f16), and their `mw` where the format
//!   has its own mins (an offset format's `mw` is `-offset * dw`).
//!
//! A VNNI `vpdpbusd` takes unsigned weights and signed activations, so an offset
//! format's sign becomes the `mw` term, dotted with the activations' sums. The
//! K-quants' `d * scale` and `dmin * min` are rounded to f16 once here (relative 2^-11,
//! far below 4-bit quantization's error); the 32-value formats keep their exact scales.
//! Columns past `n` in the last group are zero.

use candle_core::quantized::GgmlDType;
use half::f16;

use super::block32::half_at;
use super::kquants::q4k_scales;

/// Values per block: what one group of sixteen columns is laid out by.
pub const BLOCK: usize = 32;
/// Columns interleaved: one per 32-bit lane of a 512-bit register.
pub const LANES: usize = 16;

/// Every format that repacks ([`Spec::of`]): the block formats of lynx's files.
pub const FORMATS: [GgmlDType; 7] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q8_0,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// Where the fifth and sixth bits go: what the kernel that reads them can unpack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Per chunk of four values a 64-bit mask (`vnni.rs`).
    Masks,
    /// Per column and value of a chunk a byte, one bit a chunk (`avx2.rs`).
    Bytes,
}

/// How a format repacks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spec {
    pub dtype: GgmlDType,
    /// Bits of `q`: 4, 5, 6 or 8.
    pub bits: u8,
    /// Groups (scales) per block: 1 (groups of 32) or 2 (of 16).
    pub groups: usize,
    /// Whether `mw` is stored; else it is `-offset * dw`.
    pub mins: bool,
    pub offset: f32,
}

impl Spec {
    pub fn of(dtype: GgmlDType) -> Option<Self> {
        let (bits, groups, mins, offset) = match dtype {
            GgmlDType::Q4_0 => (4, 1, false, 8.0),
            GgmlDType::Q4_1 => (4, 1, true, 0.0),
            GgmlDType::Q5_0 => (5, 1, false, 16.0),
            GgmlDType::Q8_0 => (8, 1, false, 128.0),
            GgmlDType::Q4K => (4, 1, true, 0.0),
            GgmlDType::Q5K => (5, 1, true, 0.0),
            GgmlDType::Q6K => (6, 2, false, 32.0),
            _ => return None,
        };
        Some(Self {
            dtype,
            bits,
            groups,
            mins,
            offset,
        })
    }

    /// Bytes of a block's values, sixteen columns.
    pub const fn q_bytes(&self) -> usize {
        match self.bits {
            8 => 512,
            b => 256 + 64 * (b as usize - 4),
        }
    }

    /// Bytes of a block, sixteen columns: values, then scales.
    pub const fn block_bytes(&self) -> usize {
        self.q_bytes() + 2 * LANES * self.groups * if self.mins { 2 } else { 1 }
    }

    /// Values and bytes of one GGUF block.
    fn gguf_block(&self) -> (usize, usize) {
        (self.dtype.block_size(), self.dtype.type_size())
    }

    /// Values per group.
    pub const fn group(&self) -> usize {
        BLOCK / self.groups
    }
}

/// A weight `[n, k]` repacked.
pub struct Repacked {
    pub spec: Spec,
    pub layout: Layout,
    pub n: usize,
    pub k: usize,
    /// Blocks of 32 per column.
    pub blocks: usize,
    /// Bytes of one group of sixteen columns.
    pub group_bytes: usize,
    pub data: Vec<u8>,
}

/// f16, saturated: a scale past f16's range becomes its largest, never infinite.
fn to_f16(v: f32) -> f16 {
    f16::from_f32(v.clamp(-65504.0, 65504.0))
}

/// One GGUF block's values (`q`, unsigned) and its groups' `dw`, `mw`.
fn decode(spec: &Spec, b: &[u8], q: &mut [u8], dw: &mut [f32], mw: &mut [f32]) {
    let nib = |qs: &[u8], i: usize| {
        if i < 16 {
            qs[i] & 0x0F
        } else {
            qs[i - 16] >> 4
        }
    };
    match spec.dtype {
        GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q8_0 => {
            let d = half_at(b, 0);
            dw[0] = d;
            mw[0] = -spec.offset * d;
            for (i, q) in q.iter_mut().enumerate() {
                *q = match spec.dtype {
                    GgmlDType::Q4_0 => nib(&b[2..18], i),
                    GgmlDType::Q4_1 => nib(&b[4..20], i),
                    GgmlDType::Q5_0 => {
                        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                        nib(&b[6..22], i) | ((((qh >> i) & 1) as u8) << 4)
                    }
                    _ => (b[2 + i] as i8 as i16 + 128) as u8,
                };
            }
            if spec.dtype == GgmlDType::Q4_1 {
                mw[0] = half_at(b, 2);
            }
        }
        GgmlDType::Q4K | GgmlDType::Q5K => {
            let (d, dmin) = (half_at(b, 0), half_at(b, 2));
            let (scales, mins) = q4k_scales(&b[4..16]);
            for s in 0..8 {
                dw[s] = d * f32::from(scales[s]);
                mw[s] = -dmin * f32::from(mins[s]);
            }
            let five = spec.dtype == GgmlDType::Q5K;
            let (qh, qs) = if five {
                (&b[16..48], &b[48..176])
            } else {
                (&b[0..0], &b[16..144])
            };
            for j in 0..4 {
                for l in 0..32 {
                    let byte = qs[32 * j + l];
                    let (mut lo, mut hi) = (byte & 0x0F, byte >> 4);
                    if five {
                        lo |= ((qh[l] >> (2 * j)) & 1) << 4;
                        hi |= ((qh[l] >> (2 * j + 1)) & 1) << 4;
                    }
                    q[64 * j + l] = lo;
                    q[64 * j + 32 + l] = hi;
                }
            }
        }
        _ => {
            // Q6_K: 128 bytes of low nibbles, 64 of high bit pairs, 16 i8 scales, d.
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            let d = half_at(b, 208);
            for (g, s) in sc.iter().enumerate() {
                dw[g] = d * f32::from(*s as i8);
                mw[g] = -spec.offset * dw[g];
            }
            for n in 0..2 {
                let (ql, qh) = (&ql[64 * n..], &qh[32 * n..]);
                for l in 0..32 {
                    let v = 128 * n + l;
                    q[v] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
                    q[v + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
                    q[v + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                    q[v + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                }
            }
        }
    }
}

impl Repacked {
    /// `blocks`: the GGUF's `[n, k]` weight, row after row. `None` when `dtype` has no
    /// repacking or the bytes are not `n` rows of whole blocks.
    pub fn new(
        dtype: GgmlDType,
        layout: Layout,
        (n, k): (usize, usize),
        blocks: &[u8],
    ) -> Option<Self> {
        let spec = Spec::of(dtype)?;
        let (values, bytes) = spec.gguf_block();
        let row_bytes = k / values * bytes;
        if n == 0 || k == 0 || !k.is_multiple_of(values) || blocks.len() != n * row_bytes {
            return None;
        }
        let nb = k / BLOCK;
        let group_bytes = nb * spec.block_bytes();
        let mut data = vec![0u8; n.div_ceil(LANES) * group_bytes];
        let groups = k / spec.group();
        let per_block = values / spec.group();
        let (mut q, mut dw, mut mw) = (vec![0u8; k], vec![0f32; groups], vec![0f32; groups]);
        for (j, row) in blocks.chunks_exact(row_bytes).enumerate() {
            for (i, b) in row.chunks_exact(bytes).enumerate() {
                decode(
                    &spec,
                    b,
                    &mut q[i * values..(i + 1) * values],
                    &mut dw[i * per_block..(i + 1) * per_block],
                    &mut mw[i * per_block..(i + 1) * per_block],
                );
            }
            let (cg, c) = (j / LANES, j % LANES);
            let group = &mut data[cg * group_bytes..(cg + 1) * group_bytes];
            for (b, out) in group.chunks_exact_mut(spec.block_bytes()).enumerate() {
                let qb = &q[b * BLOCK..(b + 1) * BLOCK];
                put_values(&spec, layout, qb, c, out);
                let g = spec.groups;
                let scales = &mut out[spec.q_bytes()..];
                for i in 0..g {
                    let at = 2 * (LANES * i + c);
                    scales[at..at + 2].copy_from_slice(&to_f16(dw[b * g + i]).to_le_bytes());
                    if spec.mins {
                        let at = at + 2 * LANES * g;
                        scales[at..at + 2].copy_from_slice(&to_f16(mw[b * g + i]).to_le_bytes());
                    }
                }
            }
        }
        Some(Self {
            spec,
            layout,
            n,
            k,
            blocks: nb,
            group_bytes,
            data,
        })
    }

    /// Column group `cg`'s bytes (columns `16 cg..16 cg + 16`).
    pub fn group(&self, cg: usize) -> &[u8] {
        &self.data[cg * self.group_bytes..(cg + 1) * self.group_bytes]
    }

    /// Column `j`'s weights as the kernels see them, `dw * q + mw` (the tests'
    /// reference).
    pub fn dequantize(&self, j: usize) -> Vec<f32> {
        let spec = &self.spec;
        let (g, c) = (spec.groups, j % LANES);
        let mut out = Vec::with_capacity(self.k);
        for block in self.group(j / LANES).chunks_exact(spec.block_bytes()) {
            let scale = |i: usize| half_at(block, spec.q_bytes() + 2 * (LANES * i + c));
            for (v, q) in get_values(spec, self.layout, block, c).iter().enumerate() {
                let i = v / spec.group();
                let dw = scale(i);
                let mw = if spec.mins {
                    scale(g + i)
                } else {
                    -spec.offset * dw
                };
                out.push(dw * f32::from(*q) + mw);
            }
        }
        out
    }

    /// Column `j`'s scales of block `b`'s group `i`: `(dw, mw)` (the tests' reference).
    pub fn scales(&self, j: usize, b: usize, i: usize) -> (f32, f32) {
        let spec = &self.spec;
        let block = &self.group(j / LANES)[b * spec.block_bytes()..(b + 1) * spec.block_bytes()];
        let at = |i: usize| half_at(block, spec.q_bytes() + 2 * (LANES * i + j % LANES));
        let dw = at(i);
        let mw = if spec.mins {
            at(spec.groups + i)
        } else {
            -spec.offset * dw
        };
        (dw, mw)
    }

    /// Column `j`'s 32 values of block `b` (the tests' reference).
    pub fn values(&self, j: usize, b: usize) -> [u8; BLOCK] {
        let spec = &self.spec;
        let block = &self.group(j / LANES)[b * spec.block_bytes()..(b + 1) * spec.block_bytes()];
        get_values(spec, self.layout, block, j % LANES)
    }
}

/// Column `c`'s 32 values of one block into the block's value bytes.
fn put_values(spec: &Spec, layout: Layout, q: &[u8], c: usize, out: &mut [u8]) {
    if spec.bits == 8 {
        for (v, q) in q.iter().enumerate() {
            out[64 * (v / 4) + 4 * c + v % 4] = *q;
        }
        return;
    }
    for (v, q) in q.iter().enumerate() {
        let (chunk, j) = (v / 4, v % 4);
        let at = 64 * (chunk / 2) + 4 * c + j;
        out[at] |= if chunk % 2 == 0 {
            q & 0x0F
        } else {
            (q & 0x0F) << 4
        };
        for plane in 0..usize::from(spec.bits - 4) {
            if (q >> (4 + plane)) & 1 == 1 {
                let (byte, bit) = plane_bit(layout, chunk, 4 * c + j);
                out[256 + 64 * plane + byte] |= 1 << bit;
            }
        }
    }
}

/// Column `c`'s 32 values of one block back from its bytes.
fn get_values(spec: &Spec, layout: Layout, block: &[u8], c: usize) -> [u8; BLOCK] {
    let mut q = [0u8; BLOCK];
    for (v, q) in q.iter_mut().enumerate() {
        let (chunk, j) = (v / 4, v % 4);
        if spec.bits == 8 {
            *q = block[64 * chunk + 4 * c + j];
            continue;
        }
        let byte = block[64 * (chunk / 2) + 4 * c + j];
        *q = if chunk % 2 == 0 {
            byte & 0x0F
        } else {
            byte >> 4
        };
        for plane in 0..usize::from(spec.bits - 4) {
            let (byte, bit) = plane_bit(layout, chunk, 4 * c + j);
            let set = (block[256 + 64 * plane + byte] >> bit) & 1;
            *q |= set << (4 + plane);
        }
    }
    q
}

/// The byte (of a plane's 64) and bit that hold chunk `chunk`'s value at lane byte
/// `at` (`4c + j`).
fn plane_bit(layout: Layout, chunk: usize, at: usize) -> (usize, usize) {
    match layout {
        Layout::Masks => (8 * chunk + at / 8, at % 8),
        Layout::Bytes => (at, chunk),
    }
}
