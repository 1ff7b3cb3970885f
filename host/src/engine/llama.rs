//! A llama forward pass for many sequences at once, over candle ops and the GGUF's
//! quantized weights, with a slot KV cache allocated once.
//!
//! One step takes any mix of sequences (one decode token each, or a chunk of a prompt
//! being prefilled), stacks all their tokens into one activation matrix, and runs every
//! projection and MLP matmul of a layer once for all of them. Attention is per sequence
//! (its own positions, its own causal mask, its own slot's K/V), since each attends to a
//! different history. The math follows candle's `quantized_llama` exactly, which the
//! tests hold it to.
//!
//! A row's result never depends on the other rows of the step (quantized matmuls,
//! norms and softmax work row by row). It does depend, in the last bits, on how its
//! own prompt was split into chunks (candle's attention matmul takes another path for
//! longer chunks, and 8-bit activation quantization can amplify that), so the scheduler
//! splits every prompt the same way whatever else runs.

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Embedding;
use candle_transformers::quantized_nn::RmsNorm;
use rayon::prelude::*;

use super::kv_cache::{self, KvCache};
use super::qmatmul::Linear;
use super::EngineError;

struct Layer {
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// The weights and shape of a llama-family model.
pub struct Llama {
    embed: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: Linear,
    cos: Tensor,
    sin: Tensor,
    /// `cos`/`sin` as plain rows (`[position][rope_dim / 2]`) for decode tokens.
    cos_rows: Vec<f32>,
    sin_rows: Vec<f32>,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    /// Positions the rotary tables cover.
    pub max_positions: usize,
    device: Device,
}

/// One sequence's part of a step: `tokens` at positions `pos..`, in `slot`.
pub struct Entry<'a> {
    pub slot: usize,
    pub pos: usize,
    pub tokens: &'a [u32],
    /// Whether the logits after the last token are wanted.
    pub logits: bool,
}

fn md<'a>(ct: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value, EngineError> {
    ct.metadata
        .get(key)
        .ok_or_else(|| EngineError::Model(format!("GGUF metadata {key} is missing")))
}

impl Llama {
    pub fn from_gguf<R: std::io::Seek + std::io::Read>(
        ct: &gguf_file::Content,
        reader: &mut R,
        device: &Device,
        max_positions: usize,
    ) -> Result<Self, EngineError> {
        let n_head = md(ct, "llama.attention.head_count")?.to_u32()? as usize;
        let n_kv_head = md(ct, "llama.attention.head_count_kv")?.to_u32()? as usize;
        let blocks = md(ct, "llama.block_count")?.to_u32()? as usize;
        let hidden = md(ct, "llama.embedding_length")?.to_u32()? as usize;
        let rope_dim = md(ct, "llama.rope.dimension_count")?.to_u32()? as usize;
        let eps = f64::from(md(ct, "llama.attention.layer_norm_rms_epsilon")?.to_f32()?);
        let freq_base = md(ct, "llama.rope.freq_base")
            .and_then(|v| Ok(v.to_f32()?))
            .unwrap_or(10_000.0);
        if ct.metadata.contains_key("llama.expert_count") {
            return Err(EngineError::Model(
                "mixture-of-experts llama models are not served".into(),
            ));
        }
        let mut tensor = |name: &str| ct.tensor(reader, name, device);
        let embed_q = tensor("token_embd.weight")?;
        let embed = Embedding::new(embed_q.dequantize(device)?, hidden);
        let norm = RmsNorm::from_qtensor(tensor("output_norm.weight")?, eps)?;
        let output = match tensor("output.weight") {
            Ok(t) => t,
            Err(_) => embed_q,
        };
        let mut layers = Vec::with_capacity(blocks);
        for i in 0..blocks {
            let mut q = |part: &str| -> Result<Linear, EngineError> {
                Linear::from_qtensor(tensor(&format!("blk.{i}.{part}.weight"))?)
            };
            let (wq, wk, wv, wo) = (q("attn_q")?, q("attn_k")?, q("attn_v")?, q("attn_output")?);
            let (gate, up, down) = (q("ffn_gate")?, q("ffn_up")?, q("ffn_down")?);
            let attn_norm =
                RmsNorm::from_qtensor(tensor(&format!("blk.{i}.attn_norm.weight"))?, eps)?;
            let ffn_norm =
                RmsNorm::from_qtensor(tensor(&format!("blk.{i}.ffn_norm.weight"))?, eps)?;
            layers.push(Layer {
                wq,
                wk,
                wv,
                wo,
                attn_norm,
                ffn_norm,
                gate,
                up,
                down,
            });
        }
        // The rotary tables, as candle's quantized llama computes them.
        let theta: Vec<f32> = (0..rope_dim)
            .step_by(2)
            .map(|i| 1f32 / freq_base.powf(i as f32 / rope_dim as f32))
            .collect();
        let theta = Tensor::new(theta.as_slice(), device)?;
        let angles = Tensor::arange(0, max_positions as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((max_positions, 1))?
            .matmul(&theta.reshape((1, theta.elem_count()))?)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        Ok(Self {
            embed,
            layers,
            norm,
            output: Linear::from_qtensor(output)?,
            cos_rows: cos.flatten_all()?.to_vec1()?,
            sin_rows: sin.flatten_all()?.to_vec1()?,
            cos,
            sin,
            n_head,
            n_kv_head,
            head_dim: hidden / n_head,
            max_positions,
            device: device.clone(),
        })
    }

    /// Bytes of KV cache one position takes (f32 keys and values, every layer).
    pub fn kv_bytes_per_position(&self) -> usize {
        self.layers.len() * 2 * self.n_kv_head * self.head_dim * 4
    }

    /// A cache of `slots` slots of `capacity` positions each.
    pub fn kv_cache(&self, slots: usize, capacity: usize) -> Result<KvCache, EngineError> {
        KvCache::new(
            slots,
            self.layers.len(),
            (self.n_kv_head, self.head_dim),
            capacity.min(self.max_positions),
            &self.device,
        )
    }

    /// Runs one step. Returns, for each entry that asked, the logits after its last
    /// token, in entry order, as `[n, vocab]`.
    pub fn forward(
        &self,
        cache: &KvCache,
        entries: &[Entry],
    ) -> Result<Option<Tensor>, EngineError> {
        for e in entries {
            if e.tokens.is_empty()
                || e.pos + e.tokens.len() > cache.capacity
                || e.slot >= cache.slots()
            {
                return Err(EngineError::Model(format!(
                    "step entry out of bounds: slot {}, positions {}..{} of {}",
                    e.slot,
                    e.pos,
                    e.pos + e.tokens.len(),
                    cache.capacity
                )));
            }
        }
        let ids: Vec<u32> = entries
            .iter()
            .flat_map(|e| e.tokens.iter().copied())
            .collect();
        let n = ids.len();
        let ids = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
        let mut x = self.embed.forward(&ids)?; // [1, n, hidden]
        for (li, layer) in self.layers.iter().enumerate() {
            let residual = &x;
            let h = layer.attn_norm.forward(&x)?;
            let [q, k, v] = Linear::forward_all([&layer.wq, &layer.wk, &layer.wv], &h)?;
            let attn = self.attention(cache, li, entries, (q, k, v))?;
            let attn = layer.wo.forward(&attn)?;
            let x1 = (attn + residual)?;
            let h = layer.ffn_norm.forward(&x1)?;
            let [gate, up] = Linear::forward_all([&layer.gate, &layer.up], &h)?;
            let mlp = layer.down.forward(&(candle_nn::ops::silu(&gate)? * up)?)?;
            x = (mlp + x1)?;
        }
        let x = self.norm.forward(&x)?.squeeze(0)?; // [n, hidden]
        let mut last = Vec::new();
        let mut end = 0;
        for e in entries {
            end += e.tokens.len();
            if e.logits {
                last.push((end - 1) as u32);
            }
        }
        debug_assert_eq!(end, n);
        if last.is_empty() {
            return Ok(None);
        }
        let rows = x.index_select(&Tensor::new(last.as_slice(), &self.device)?, 0)?;
        Ok(Some(self.output.forward(&rows)?))
    }

    /// Every entry's attention at layer `li`, given the step's projections
    /// (`[1, n, ..]`); returns `[1, n, hidden]`. New keys and values go into the cache
    /// first, one entry after the other; then the sequences attend in parallel.
    fn attention(
        &self,
        cache: &KvCache,
        li: usize,
        entries: &[Entry],
        (q, k, v): (Tensor, Tensor, Tensor),
    ) -> Result<Tensor, EngineError> {
        let (hd, kvh) = (self.head_dim, self.n_kv_head);
        let mut queries = Vec::with_capacity(entries.len());
        let mut start = 0;
        for e in entries {
            let t = e.tokens.len();
            let (q, k, v) = (
                q.narrow(1, start, t)?,
                k.narrow(1, start, t)?,
                v.narrow(1, start, t)?,
            );
            let (q, k, v) = if t == 1 {
                // One token: rotated in place with candle's single-token formula, which
                // saves a dozen tensor ops per sequence and layer.
                let half = self.cos_rows.len() / self.max_positions;
                let angles = e.pos * half..(e.pos + 1) * half;
                let (cos, sin) = (&self.cos_rows[angles.clone()], &self.sin_rows[angles]);
                let row = |x: &Tensor, heads: usize, rotate: bool| -> Result<Tensor, EngineError> {
                    let mut x = x.flatten_all()?.to_vec1::<f32>()?;
                    if rotate {
                        kv_cache::rope_row(&mut x, hd, cos, sin);
                    }
                    Ok(Tensor::from_vec(x, (1, heads, 1, hd), &self.device)?)
                };
                (
                    row(&q, self.n_head, true)?,
                    row(&k, kvh, true)?,
                    row(&v, kvh, false)?,
                )
            } else {
                let heads = |x: &Tensor, n: usize| -> candle_core::Result<Tensor> {
                    x.reshape((1, t, n, hd))?.transpose(1, 2)?.contiguous()
                };
                let cos = self.cos.narrow(0, e.pos, t)?;
                let sin = self.sin.narrow(0, e.pos, t)?;
                let rope = |x| candle_nn::rotary_emb::rope_i(&x, &cos, &sin);
                (
                    rope(heads(&q, self.n_head)?)?,
                    rope(heads(&k, kvh)?)?,
                    heads(&v, kvh)?,
                )
            };
            cache.write((e.slot, li, e.pos), &k, &v)?;
            queries.push(q);
            start += t;
        }
        let outs = entries
            .par_iter()
            .zip(&queries)
            .map(|(e, q)| cache.attend((e.slot, li, e.pos), q))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Tensor::cat(&outs, 1)?)
    }
}
