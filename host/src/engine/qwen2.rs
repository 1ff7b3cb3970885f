//! Qwen2 (and Qwen2.5) for many sequences at once: llama's block with biases on the
//! query, key and value projections and NeoX-style rotation. Follows candle's
//! `quantized_qwen2` op for op, which the tests hold it to.

use candle_core::quantized::gguf_file;
use candle_core::{Device, Module, Tensor};
use candle_nn::Embedding;
use candle_transformers::quantized_nn::RmsNorm;

use super::arch::{self, Architecture, AttnShape, Entry, KvShape, Meta, Rope};
use super::kv_cache::KvCache;
use super::qmatmul::Linear;
use super::EngineError;

struct Layer {
    wq: Linear,
    wk: Linear,
    wv: Linear,
    bq: Tensor,
    bk: Tensor,
    bv: Tensor,
    wo: Linear,
    attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
}

pub struct Qwen2 {
    embed: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: Linear,
    rope: Rope,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    max_positions: usize,
}

impl Qwen2 {
    pub fn from_gguf<R: std::io::Seek + std::io::Read>(
        ct: &gguf_file::Content,
        reader: &mut R,
        device: &Device,
        max_positions: usize,
    ) -> Result<Self, EngineError> {
        let md = Meta {
            ct,
            prefix: "qwen2",
        };
        let n_head = md.usize("attention.head_count")?;
        let n_kv_head = md.usize("attention.head_count_kv")?;
        let blocks = md.usize("block_count")?;
        let hidden = md.usize("embedding_length")?;
        let eps = f64::from(md.f32_or("attention.layer_norm_rms_epsilon", 1e-6)?);
        let freq_base = md.f32_or("rope.freq_base", 10_000.0)?;
        if n_head == 0 || n_kv_head == 0 || hidden % n_head != 0 || n_head % n_kv_head != 0 {
            return Err(EngineError::Model(format!(
                "inconsistent qwen2 shape: {hidden} wide, {n_head} heads, {n_kv_head} KV heads"
            )));
        }
        let head_dim = hidden / n_head;
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
            let mut t = |part: &str| tensor(&format!("blk.{i}.{part}"));
            let mut lin = |part: &str| -> Result<Linear, EngineError> {
                Linear::from_qtensor(t(&format!("{part}.weight"))?)
            };
            let (wq, wk, wv, wo) = (
                lin("attn_q")?,
                lin("attn_k")?,
                lin("attn_v")?,
                lin("attn_output")?,
            );
            let (gate, up, down) = (lin("ffn_gate")?, lin("ffn_up")?, lin("ffn_down")?);
            let mut t = |part: &str| tensor(&format!("blk.{i}.{part}"));
            let (bq, bk, bv) = (
                t("attn_q.bias")?.dequantize(device)?,
                t("attn_k.bias")?.dequantize(device)?,
                t("attn_v.bias")?.dequantize(device)?,
            );
            let attn_norm = RmsNorm::from_qtensor(t("attn_norm.weight")?, eps)?;
            let ffn_norm = RmsNorm::from_qtensor(t("ffn_norm.weight")?, eps)?;
            layers.push(Layer {
                wq,
                wk,
                wv,
                bq,
                bk,
                bv,
                wo,
                attn_norm,
                ffn_norm,
                gate,
                up,
                down,
            });
        }
        Ok(Self {
            embed,
            layers,
            norm,
            output: Linear::from_qtensor(output)?,
            rope: Rope::new((head_dim, freq_base), max_positions, None, 1.0, true)?,
            n_head,
            n_kv_head,
            head_dim,
            max_positions,
        })
    }
}

impl Architecture for Qwen2 {
    fn name(&self) -> &'static str {
        "qwen2"
    }

    fn kv_shape(&self) -> KvShape {
        KvShape {
            layers: self.layers.len(),
            kv_heads: self.n_kv_head,
            head_dim: self.head_dim,
        }
    }

    fn max_positions(&self) -> usize {
        self.max_positions
    }

    fn forward(&self, cache: &KvCache, entries: &[Entry]) -> Result<Option<Tensor>, EngineError> {
        arch::check_entries(cache, entries)?;
        let spans: Vec<usize> = entries.iter().map(|e| e.tokens.len()).collect();
        let shape = AttnShape {
            n_head: self.n_head,
            n_kv_head: self.n_kv_head,
            head_dim: self.head_dim,
            rope: &self.rope,
            window: None,
            qk_norm: None,
        };
        let mut x = self.embed.forward(&arch::step_ids(entries)?)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let residual = &x;
            let h = layer.attn_norm.forward(&x)?;
            let [q, k, v] = Linear::forward_all([&layer.wq, &layer.wk, &layer.wv], &h, &spans)?;
            let (q, k, v) = (
                q.broadcast_add(&layer.bq)?,
                k.broadcast_add(&layer.bk)?,
                v.broadcast_add(&layer.bv)?,
            );
            let attn = arch::attention(cache, li, entries, &shape, (q, k, v))?;
            let attn = layer.wo.forward(&attn, &spans)?;
            let x1 = (attn + residual)?;
            let h = layer.ffn_norm.forward(&x1)?;
            let [gate, up] = Linear::forward_all([&layer.gate, &layer.up], &h, &spans)?;
            let mlp = layer
                .down
                .forward(&(candle_nn::ops::silu(&gate)? * up)?, &spans)?;
            x = (mlp + x1)?;
        }
        let x = self.norm.forward(&x)?.squeeze(0)?;
        arch::logits(&self.output, &x, entries)
    }
}
