//! Qwen2 (and Qwen2.5) for many sequences at once: llama's block with biases on the
//! query, key and value projections and NeoX-style rotation. Follows candle's
//! `quantized_qwen2` op for op, which the tests hold it to.

use candle_core::quantized::gguf_file;
use candle_core::{Module, Tensor};
use candle_transformers::quantized_nn::RmsNorm;

use super::arch::{self, Architecture, Entry, LayerTensors, Meta, Rope, Trunk};
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
    trunk: Trunk,
    layers: Vec<Layer>,
    rope: Rope,
}

impl Qwen2 {
    pub fn from_gguf<R: std::io::Seek + std::io::Read>(
        ct: &gguf_file::Content,
        reader: &mut R,
        max_positions: usize,
    ) -> Result<Self, EngineError> {
        let md = Meta {
            ct,
            prefix: "qwen2",
        };
        let trunk = Trunk::load(&md, reader, None, max_positions)?;
        let freq_base = md.f32_or("rope.freq_base", 10_000.0)?;
        let mut layers = Vec::with_capacity(trunk.layers);
        for layer in 0..trunk.layers {
            let mut t = LayerTensors {
                md: &md,
                reader: &mut *reader,
                layer,
            };
            layers.push(Layer {
                wq: t.linear("attn_q")?,
                wk: t.linear("attn_k")?,
                wv: t.linear("attn_v")?,
                bq: t.f32("attn_q.bias")?,
                bk: t.f32("attn_k.bias")?,
                bv: t.f32("attn_v.bias")?,
                wo: t.linear("attn_output")?,
                attn_norm: t.norm("attn_norm", trunk.eps)?,
                ffn_norm: t.norm("ffn_norm", trunk.eps)?,
                gate: t.linear("ffn_gate")?,
                up: t.linear("ffn_up")?,
                down: t.linear("ffn_down")?,
            });
        }
        let rope = Rope::new((trunk.head_dim, freq_base), max_positions, None, 1.0, true)?;
        Ok(Self {
            trunk,
            layers,
            rope,
        })
    }
}

impl Architecture for Qwen2 {
    fn trunk(&self) -> &Trunk {
        &self.trunk
    }

    fn forward(&self, cache: &KvCache, entries: &[Entry]) -> Result<Option<Tensor>, EngineError> {
        let (mut x, spans) = self.trunk.embed(cache, entries)?;
        let shape = self.trunk.attn(&self.rope, None, None);
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
        self.trunk.logits(&x, entries)
    }
}
