//! The slot KV cache and the attention that reads it.
//!
//! Every slot holds, per layer, keys and values `[1, kv_heads, capacity, head_dim]`,
//! allocated once at start-up. Attention reads a slot's history in place: each query
//! head is multiplied against a view of its key/value head, never a copy. candle's
//! llama copies the history twice per layer (contiguous, then repeated for the
//! grouped-query heads), which at 8 sequences and a few hundred positions was most of
//! a decode step's attention time. The gemm calls themselves (one per head, same
//! shapes, same strides) are the ones candle's llama makes, so results stay bit for bit
//! candle's: 8-bit requantization of each layer's input would turn any last-bit
//! difference into visibly different logits.

use candle_core::{DType, Device, Tensor};
use candle_transformers::utils::build_causal_mask;

use super::EngineError;

struct Slot {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
}

/// Keys and values of `slots` sequences of up to `capacity` positions, every layer.
pub struct KvCache {
    slots: Vec<Slot>,
    kv_heads: usize,
    pub capacity: usize,
}

impl KvCache {
    pub fn new(
        slots: usize,
        layers: usize,
        (kv_heads, head_dim): (usize, usize),
        capacity: usize,
        device: &Device,
    ) -> Result<Self, EngineError> {
        let shape = (1, kv_heads, capacity, head_dim);
        let mut all = Vec::with_capacity(slots);
        for _ in 0..slots {
            let mut k = Vec::with_capacity(layers);
            let mut v = Vec::with_capacity(layers);
            for _ in 0..layers {
                k.push(Tensor::zeros(shape, DType::F32, device)?);
                v.push(Tensor::zeros(shape, DType::F32, device)?);
            }
            all.push(Slot { k, v });
        }
        Ok(Self {
            slots: all,
            kv_heads,
            capacity,
        })
    }

    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Stores new keys and values (`[1, kv_heads, t, head_dim]`) at `pos..pos + t`.
    pub fn write(
        &self,
        (slot, layer, pos): (usize, usize, usize),
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(), EngineError> {
        let s = &self.slots[slot];
        s.k[layer].slice_set(k, 2, pos)?;
        s.v[layer].slice_set(v, 2, pos)?;
        Ok(())
    }

    /// One sequence's attention at one layer, over its slot's first `pos + t`
    /// positions: `q` holds its `t` new roped queries, `[1, n_head, t, head_dim]`, whose
    /// keys and values are already written. With a `window`, a query sees only the
    /// last `window` positions up to its own (llama.cpp's sliding window). Returns
    /// `[1, t, n_head * head_dim]`.
    pub fn attend(
        &self,
        (slot, layer, pos): (usize, usize, usize),
        q: &Tensor,
        window: Option<usize>,
    ) -> Result<Tensor, EngineError> {
        let (_, n_head, t, hd) = q.dims4()?;
        let len = pos + t;
        // Keys no query of the chunk can see are left out of the product altogether.
        let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let n_rep = n_head / self.kv_heads.max(1);
        let s = &self.slots[slot];
        let keys = s.k[layer].narrow(2, first, len - first)?;
        let values = s.v[layer].narrow(2, first, len - first)?;
        let per_head = |h: usize| -> candle_core::Result<(Tensor, Tensor)> {
            Ok((
                keys.narrow(1, h / n_rep, 1)?,
                values.narrow(1, h / n_rep, 1)?,
            ))
        };
        let heads = (0..n_head).map(per_head).collect::<Result<Vec<_>, _>>()?;
        let scores = heads
            .iter()
            .enumerate()
            .map(|(h, (k, _))| q.narrow(1, h, 1)?.matmul(&k.t()?))
            .collect::<Result<Vec<_>, _>>()?;
        let att = (Tensor::cat(&scores, 1)? / (hd as f64).sqrt())?;
        let att = if t > 1 {
            let device = q.device();
            let mask = match window {
                None => build_causal_mask(t, pos, device)?,
                Some(w) => window_mask(t, pos, first, w, device)?,
            }
            .broadcast_as(att.shape())?;
            let neg_inf = Tensor::new(f32::NEG_INFINITY, device)?.broadcast_as(att.shape())?;
            mask.where_cond(&neg_inf, &att)?
        } else {
            att
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let ys = heads
            .iter()
            .enumerate()
            .map(|(h, (_, v))| att.narrow(1, h, 1)?.matmul(v))
            .collect::<Result<Vec<_>, _>>()?;
        let y = Tensor::cat(&ys, 1)?; // [1, n_head, t, head_dim]
        Ok(y.transpose(1, 2)?.reshape((1, t, n_head * hd))?)
    }
}

/// `[t, len - first]`, 1 where query `pos + i` must not see key `first + j`: a later
/// position, or one `window` or more positions back.
fn window_mask(
    t: usize,
    pos: usize,
    first: usize,
    window: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let len = pos + t;
    let mask: Vec<u8> = (0..t)
        .flat_map(|i| {
            let query = pos + i;
            (first..len).map(move |key| u8::from(key > query || key + window <= query))
        })
        .collect();
    Tensor::from_slice(&mask, (t, len - first), device)
}
