//! Weights repacked at load for the VNNI kernels (`vnni.rs`). Every block format of
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
//! One column (a weight row: one output feature) is a run of *pairs*, 64 values each:
//! 32 bytes of nibbles (byte `i`: value `i` low, value `i + 32` high), then for 5 and 6
//! bits one 64-bit plane per extra bit (bit `i`: value `i`), or for 8 bits 64 plain
//! bytes; then the pair's `dw` as f16 (2 or 4 groups) and, where the format has its own
//! mins, its `mw`. A VNNI `vpdpbusd` takes unsigned weights and signed activations, so
//! an offset format's sign becomes the `mw` term, dotted with the activations' sums.
//! The K-quants' `d * scale` and `dmin * min` are rounded to f16 once here (relative
//! 2^-11, far below 4-bit quantization's error); the 32-value formats keep their exact
//! scales. A row shorter than whole pairs is padded with zero weights and scales.

use candle_core::quantized::GgmlDType;
use half::f16;

use super::kquants::q4k_scales;

/// Values per pair: what one 512-bit `vpdpbusd` takes.
pub const PAIR: usize = 64;

/// How a format repacks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spec {
    pub dtype: GgmlDType,
    /// Bits of `q`: 4, 5, 6 or 8.
    pub bits: u8,
    /// Groups (scales) per pair: 2 (groups of 32) or 4 (of 16).
    pub groups: usize,
    /// Whether `mw` is stored; else it is `-offset * dw`.
    pub mins: bool,
    pub offset: f32,
}

impl Spec {
    pub fn of(dtype: GgmlDType) -> Option<Self> {
        let (bits, groups, mins, offset) = match dtype {
            GgmlDType::Q4_0 => (4, 2, false, 8.0),
            GgmlDType::Q4_1 => (4, 2, true, 0.0),
            GgmlDType::Q5_0 => (5, 2, false, 16.0),
            GgmlDType::Q8_0 => (8, 2, false, 128.0),
            GgmlDType::Q4K => (4, 2, true, 0.0),
            GgmlDType::Q5K => (5, 2, true, 0.0),
            GgmlDType::Q6K => (6, 4, false, 32.0),
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

    /// Bytes of a pair's values.
    pub const fn q_bytes(&self) -> usize {
        match self.bits {
            8 => 64,
            b => 32 + 8 * (b as usize - 4),
        }
    }

    /// Bytes of a pair: values, then scales.
    pub const fn pair_bytes(&self) -> usize {
        self.q_bytes() + 2 * self.groups * if self.mins { 2 } else { 1 }
    }

    /// Values and bytes of one GGUF block.
    fn block(&self) -> (usize, usize) {
        match self.dtype {
            GgmlDType::Q4_0 => (32, 18),
            GgmlDType::Q4_1 => (32, 20),
            GgmlDType::Q5_0 => (32, 22),
            GgmlDType::Q8_0 => (32, 34),
            GgmlDType::Q4K => (256, 144),
            GgmlDType::Q5K => (256, 176),
            _ => (256, 210),
        }
    }

    /// Values per group.
    fn group(&self) -> usize {
        PAIR / self.groups
    }
}

/// A weight `[n, k]` repacked.
pub struct Repacked {
    pub spec: Spec,
    pub n: usize,
    pub k: usize,
    pub pairs: usize,
    pub col_bytes: usize,
    pub data: Vec<u8>,
}

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
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
    pub fn new(dtype: GgmlDType, n: usize, k: usize, blocks: &[u8]) -> Option<Self> {
        let spec = Spec::of(dtype)?;
        let (values, bytes) = spec.block();
        if k == 0 || !k.is_multiple_of(values) || blocks.len() != n * (k / values) * bytes {
            return None;
        }
        let pairs = k.div_ceil(PAIR);
        let col_bytes = pairs * spec.pair_bytes();
        let mut data = vec![0u8; n * col_bytes];
        let padded = pairs * PAIR;
        let groups = padded / spec.group();
        let (mut q, mut dw, mut mw) = (vec![0u8; padded], vec![0f32; groups], vec![0f32; groups]);
        let per_block = values / spec.group();
        for (row, col) in blocks.chunks_exact(k / values * bytes).zip(data.chunks_exact_mut(col_bytes)) {
            for (i, b) in row.chunks_exact(bytes).enumerate() {
                decode(
                    &spec,
                    b,
                    &mut q[i * values..(i + 1) * values],
                    &mut dw[i * per_block..(i + 1) * per_block],
                    &mut mw[i * per_block..(i + 1) * per_block],
                );
            }
            for (p, out) in col.chunks_exact_mut(spec.pair_bytes()).enumerate() {
                pack_pair(&spec, &q[p * PAIR..(p + 1) * PAIR], out);
                let g = spec.groups;
                let (scales, rest) = out[spec.q_bytes()..].split_at_mut(2 * g);
                for (i, s) in scales.chunks_exact_mut(2).enumerate() {
                    s.copy_from_slice(&to_f16(dw[p * g + i]).to_le_bytes());
                }
                if spec.mins {
                    for (i, s) in rest.chunks_exact_mut(2).enumerate() {
                        s.copy_from_slice(&to_f16(mw[p * g + i]).to_le_bytes());
                    }
                }
            }
        }
        Some(Self {
            spec,
            n,
            k,
            pairs,
            col_bytes,
            data,
        })
    }

    /// Column `j`'s bytes.
    pub fn col(&self, j: usize) -> &[u8] {
        &self.data[j * self.col_bytes..(j + 1) * self.col_bytes]
    }

    /// Column `j`'s weights as the kernels see them, `dw * q + mw` (the tests'
    /// reference).
    pub fn dequantize(&self, j: usize) -> Vec<f32> {
        let spec = &self.spec;
        let g = spec.groups;
        let mut out = Vec::with_capacity(self.pairs * PAIR);
        for pair in self.col(j).chunks_exact(spec.pair_bytes()) {
            let q = unpack_pair(spec, pair);
            let scale = |i: usize| half_at(pair, spec.q_bytes() + 2 * i);
            for (v, q) in q.iter().enumerate() {
                let dw = scale(v / spec.group());
                let mw = if spec.mins {
                    scale(g + v / spec.group())
                } else {
                    -spec.offset * dw
                };
                out.push(dw * f32::from(*q) + mw);
            }
        }
        out.truncate(self.k);
        out
    }
}

/// 64 values into a pair's value bytes.
fn pack_pair(spec: &Spec, q: &[u8], out: &mut [u8]) {
    if spec.bits == 8 {
        out[..PAIR].copy_from_slice(q);
        return;
    }
    for i in 0..32 {
        out[i] = (q[i] & 0x0F) | ((q[i + 32] & 0x0F) << 4);
    }
    for plane in 0..usize::from(spec.bits - 4) {
        let mut bits = 0u64;
        for (i, q) in q.iter().enumerate() {
            bits |= u64::from((q >> (4 + plane)) & 1) << i;
        }
        out[32 + 8 * plane..40 + 8 * plane].copy_from_slice(&bits.to_le_bytes());
    }
}

/// A pair's 64 values back from its bytes (the portable kernel and the tests).
pub fn unpack_pair(spec: &Spec, pair: &[u8]) -> [u8; PAIR] {
    let mut q = [0u8; PAIR];
    if spec.bits == 8 {
        q.copy_from_slice(&pair[..PAIR]);
        return q;
    }
    for i in 0..32 {
        q[i] = pair[i] & 0x0F;
        q[i + 32] = pair[i] >> 4;
    }
    for plane in 0..usize::from(spec.bits - 4) {
        let mut b = [0u8; 8];
        b.copy_from_slice(&pair[32 + 8 * plane..40 + 8 * plane]);
        let bits = u64::from_le_bytes(b);
        for (i, q) in q.iter_mut().enumerate() {
            *q |= (((bits >> i) & 1) as u8) << (4 + plane);
        }
    }
    q
}
