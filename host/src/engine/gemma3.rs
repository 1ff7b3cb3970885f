//! Gemma 3 for many sequences at once: sliding-window and global layers (five to one),
//! each kind with its own rotary base, RMS norms on queries and keys, norms before and
//! after both attention and MLP, a GELU-gated MLP, embeddings scaled by the square root
//! of the width, and the output tied to the embeddings.
//!
//! Follows candle's `quantized_gemma3` op for op with two deliberate differences, both
//! where candle departs from Gemma 3 and from llama.cpp: the MLP gate is GELU (tanh
//! form, `gelu_pytorch_tanh`), where candle 0.11 uses SiLU; and sliding-window layers
//! see only the last `sliding_window` positions during decoding too, where candle masks
//! the window only within a prompt chunk. The tests compare against candle with its
//! activation (see [`Gemma3::with_silu_gate`]) on prompts inside the window, and hold
//! the served model to its own greedy output.

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
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    attn_norm: RmsNorm,
    post_attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    post_ffn_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
    /// Sliding-window layers see this many positions back; global layers everything.
    window: Option<usize>,
}

pub struct Gemma3 {
    embed: Embedding,
    hidden: usize,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: Linear,
    rope_local: Rope,
    rope_global: Rope,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    max_positions: usize,
    silu_gate: bool,
}

impl Gemma3 {
    pub fn from_gguf<R: std::io::Seek + std::io::Read>(
        ct: &gguf_file::Content,
        reader: &mut R,
        device: &Device,
        max_positions: usize,
    ) -> Result<Self, EngineError> {
        let md = Meta {
            ct,
            prefix: "gemma3",
        };
        let n_head = md.usize("attention.head_count")?;
        let n_kv_head = md.usize("attention.head_count_kv")?;
        let blocks = md.usize("block_count")?;
        let hidden = md.usize("embedding_length")?;
        let head_dim = md.usize("attention.key_length")?;
        let eps = f64::from(md.f32_or("attention.layer_norm_rms_epsilon", 1e-6)?);
        let window = md.usize("attention.sliding_window")?;
        let pattern = if md.has("attention.sliding_window_type") {
            md.usize("attention.sliding_window_type")?
        } else {
            6
        };
        if n_head == 0 || n_kv_head == 0 || n_head % n_kv_head != 0 || pattern == 0 {
            return Err(EngineError::Model(format!(
                "inconsistent gemma3 shape: {n_head} heads, {n_kv_head} KV heads, \
                 window pattern {pattern}"
            )));
        }
        if md.usize("attention.value_length")? != head_dim {
            return Err(EngineError::Model(
                "gemma3 with values and keys of different sizes is not served".into(),
            ));
        }
        let base_global = md.f32_or("rope.freq_base", 1_000_000.0)?;
        let base_local = md.f32_or("rope.local_freq_base", 10_000.0)?;
        // Linear rope scaling (the larger Gemma 3 models) stretches the global layers'
        // positions only, as llama.cpp applies it.
        let scale = match md.string("rope.scaling.type").as_deref() {
            Some("linear") => 1.0 / md.f32_or("rope.scaling.factor", 1.0)?,
            _ => 1.0,
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
            let mut t = |part: &str| tensor(&format!("blk.{i}.{part}.weight"));
            let mut lin =
                |part: &str| -> Result<Linear, EngineError> { Linear::from_qtensor(t(part)?) };
            let (wq, wk, wv, wo) = (
                lin("attn_q")?,
                lin("attn_k")?,
                lin("attn_v")?,
                lin("attn_output")?,
            );
            let (gate, up, down) = (lin("ffn_gate")?, lin("ffn_up")?, lin("ffn_down")?);
            let mut t = |part: &str| tensor(&format!("blk.{i}.{part}.weight"));
            let mut norm = |part: &str| -> Result<RmsNorm, EngineError> {
                Ok(RmsNorm::from_qtensor(t(part)?, eps)?)
            };
            layers.push(Layer {
                wq,
                wk,
                wv,
                wo,
                q_norm: norm("attn_q_norm")?,
                k_norm: norm("attn_k_norm")?,
                attn_norm: norm("attn_norm")?,
                post_attn_norm: norm("post_attention_norm")?,
                ffn_norm: norm("ffn_norm")?,
                post_ffn_norm: norm("post_ffw_norm")?,
                gate,
                up,
                down,
                window: ((i + 1) % pattern != 0).then_some(window),
            });
        }
        Ok(Self {
            embed,
            hidden,
            layers,
            norm,
            output: Linear::from_qtensor(output)?,
            rope_local: Rope::new((head_dim, base_local), max_positions, None, 1.0, true)?,
            rope_global: Rope::new((head_dim, base_global), max_positions, None, scale, true)?,
            n_head,
            n_kv_head,
            head_dim,
            max_positions,
            silu_gate: false,
        })
    }

    /// Gates the MLP with SiLU, as candle 0.11's `quantized_gemma3` does, instead of
    /// Gemma 3's GELU: only for holding everything else to candle's reference.
    pub fn with_silu_gate(mut self) -> Self {
        self.silu_gate = true;
        self
    }
}

impl Architecture for Gemma3 {
    fn name(&self) -> &'static str {
        "gemma3"
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
        let mut x = self.embed.forward(&arch::step_ids(entries)?)?;
        x = (x * (self.hidden as f64).sqrt())?;
        for (li, layer) in self.layers.iter().enumerate() {
            let shape = AttnShape {
                n_head: self.n_head,
                n_kv_head: self.n_kv_head,
                head_dim: self.head_dim,
                rope: if layer.window.is_some() {
                    &self.rope_local
                } else {
                    &self.rope_global
                },
                window: layer.window,
                qk_norm: Some((&layer.q_norm, &layer.k_norm)),
            };
            let residual = &x;
            let h = layer.attn_norm.forward(&x)?;
            let [q, k, v] = Linear::forward_all([&layer.wq, &layer.wk, &layer.wv], &h, &spans)?;
            let attn = arch::attention(cache, li, entries, &shape, (q, k, v))?;
            let attn = layer
                .post_attn_norm
                .forward(&layer.wo.forward(&attn, &spans)?)?;
            let x1 = (attn + residual)?;
            let h = layer.ffn_norm.forward(&x1)?;
            let [gate, up] = Linear::forward_all([&layer.gate, &layer.up], &h, &spans)?;
            let gate = if self.silu_gate {
                candle_nn::ops::silu(&gate)?
            } else {
                gate.gelu()?
            };
            let mlp = layer.down.forward(&(gate * up)?, &spans)?;
            x = (layer.post_ffn_norm.forward(&mlp)? + x1)?;
        }
        let x = self.norm.forward(&x)?.squeeze(0)?;
        arch::logits(&self.output, &x, entries)
    }
}
