//! Llama (Llama 2 and 3.x with llama 3.1's `rope_freqs`, SmolLM, TinyLlama,
//! Mistral-style models) for many sequences at once, over candle ops and the GGUF's
//! quantized weights.
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
    rope: Rope,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    max_positions: usize,
}

impl Llama {
    pub fn from_gguf<R: std::io::Seek + std::io::Read>(
        ct: &gguf_file::Content,
        reader: &mut R,
        device: &Device,
        max_positions: usize,
    ) -> Result<Self, EngineError> {
        let md = Meta {
            ct,
            prefix: "llama",
        };
        let n_head = md.usize("attention.head_count")?;
        let n_kv_head = md.usize("attention.head_count_kv")?;
        let blocks = md.usize("block_count")?;
        let hidden = md.usize("embedding_length")?;
        let rope_dim = md.usize("rope.dimension_count")?;
        let eps = f64::from(md.f32_or("attention.layer_norm_rms_epsilon", 1e-5)?);
        let freq_base = md.f32_or("rope.freq_base", 10_000.0)?;
        if md.has("expert_count") {
            return Err(EngineError::Model(
                "mixture-of-experts llama models are not served".into(),
            ));
        }
        if n_head == 0 || n_kv_head == 0 || hidden % n_head != 0 || n_head % n_kv_head != 0 {
            return Err(EngineError::Model(format!(
                "inconsistent llama shape: {hidden} wide, {n_head} heads, {n_kv_head} KV heads"
            )));
        }
        // Linear rope scaling stretches positions; llama 3.1's scaling comes as per-pair
        // frequency divisors (`rope_freqs.weight`), as llama.cpp applies them.
        let scale = match md.string("rope.scaling.type").as_deref() {
            Some("linear") => 1.0 / md.f32_or("rope.scaling.factor", 1.0)?,
            _ => 1.0,
        };
        let freq_factors: Option<Vec<f32>> = match ct.tensor(reader, "rope_freqs.weight", device) {
            Ok(t) => Some(t.dequantize(device)?.flatten_all()?.to_vec1()?),
            Err(_) => None,
        };
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
        let rope = Rope::new(
            (rope_dim, freq_base),
            max_positions,
            freq_factors.as_deref(),
            scale,
            false,
        )?;
        Ok(Self {
            embed,
            layers,
            norm,
            output: Linear::from_qtensor(output)?,
            rope,
            n_head,
            n_kv_head,
            head_dim: hidden / n_head,
            max_positions,
        })
    }
}

impl Architecture for Llama {
    fn name(&self) -> &'static str {
        "llama"
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
        let mut x = self.embed.forward(&arch::step_ids(entries)?)?; // [1, n, hidden]
        for (li, layer) in self.layers.iter().enumerate() {
            let residual = &x;
            let h = layer.attn_norm.forward(&x)?;
            let [q, k, v] = Linear::forward_all([&layer.wq, &layer.wk, &layer.wv], &h, &spans)?;
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
        let x = self.norm.forward(&x)?.squeeze(0)?; // [n, hidden]
        arch::logits(&self.output, &x, entries)
    }
}
