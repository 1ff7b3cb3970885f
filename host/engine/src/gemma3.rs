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
use candle_core::{Module, Tensor};
use candle_transformers::quantized_nn::RmsNorm;

use super::activation::{self, Gate};
use super::arch::{self, Architecture, Entry, Meta, Rope, Trunk};
use super::kv_cache::KvCache;
use super::qmatmul::{Joined, Linear};
use super::EngineError;

struct Layer {
    /// q, k and v.
    qkv: Joined<3>,
    wo: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    attn_norm: RmsNorm,
    post_attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    post_ffn_norm: RmsNorm,
    /// The MLP's gate and up projections.
    gate_up: Joined<2>,
    down: Linear,
    /// Sliding-window layers see this many positions back; global layers everything.
    window: Option<usize>,
}

pub struct Gemma3 {
    trunk: Trunk,
    layers: Vec<Layer>,
    rope_local: Rope,
    rope_global: Rope,
    silu_gate: bool,
}

impl Gemma3 {
    pub fn from_gguf<R: std::io::Seek + std::io::Read>(
        ct: &gguf_file::Content,
        reader: &mut R,
        max_positions: usize,
    ) -> Result<Self, EngineError> {
        let md = Meta {
            ct,
            prefix: "gemma3",
        };
        let window = md.usize("attention.sliding_window")?;
        let pattern = if md.has("attention.sliding_window_type") {
            md.usize("attention.sliding_window_type")?
        } else {
            6
        };
        if pattern == 0 {
            return Err(EngineError::Model(
                "gemma3 with a sliding-window pattern of 0".into(),
            ));
        }
        let trunk = Trunk::load(&md, reader, Some("attention.key_length"), max_positions)?;
        if md.usize("attention.value_length")? != trunk.head_dim {
            return Err(EngineError::Model(
                "gemma3 with values and keys of different sizes is not served".into(),
            ));
        }
        let base_global = md.f32_or("rope.freq_base", 1_000_000.0)?;
        let base_local = md.f32_or("rope.local_freq_base", 10_000.0)?;
        // Linear rope scaling (the larger Gemma 3 models) stretches the global layers'
        // positions only, as llama.cpp applies it.
        let scale = md.rope_scale()?;
        let eps = trunk.eps;
        let layers = md.layers(reader, &trunk, |t| {
            Ok(Layer {
                qkv: Joined::new([
                    t.linear("attn_q")?,
                    t.linear("attn_k")?,
                    t.linear("attn_v")?,
                ]),
                wo: t.linear("attn_output")?,
                q_norm: t.norm("attn_q_norm", eps)?,
                k_norm: t.norm("attn_k_norm", eps)?,
                attn_norm: t.norm("attn_norm", eps)?,
                post_attn_norm: t.norm("post_attention_norm", eps)?,
                ffn_norm: t.norm("ffn_norm", eps)?,
                post_ffn_norm: t.norm("post_ffw_norm", eps)?,
                gate_up: Joined::new([t.linear("ffn_gate")?, t.linear("ffn_up")?]),
                down: t.linear("ffn_down")?,
                window: ((t.layer + 1) % pattern != 0).then_some(window),
            })
        })?;
        let hd = trunk.head_dim;
        Ok(Self {
            rope_local: Rope::new((hd, base_local), max_positions, None, 1.0, true)?,
            rope_global: Rope::new((hd, base_global), max_positions, None, scale, true)?,
            trunk,
            layers,
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
    fn trunk(&self) -> &Trunk {
        &self.trunk
    }

    fn forward(&self, cache: &KvCache, entries: &[Entry]) -> Result<Option<Tensor>, EngineError> {
        let (x, spans) = self.trunk.embed(cache, entries)?;
        let mut x = (x * (self.trunk.hidden as f64).sqrt())?;
        for (li, layer) in self.layers.iter().enumerate() {
            let rope = if layer.window.is_some() {
                &self.rope_local
            } else {
                &self.rope_global
            };
            let shape = self
                .trunk
                .attn(rope, layer.window, Some((&layer.q_norm, &layer.k_norm)));
            let residual = &x;
            let h = layer.attn_norm.forward(&x)?;
            let [q, k, v] = layer.qkv.forward(&h, &spans)?;
            let attn = arch::attention(cache, li, entries, &shape, (q, k, v))?;
            let attn = layer
                .post_attn_norm
                .forward(&layer.wo.forward(&attn, &spans)?)?;
            let x1 = (attn + residual)?;
            let h = layer.ffn_norm.forward(&x1)?;
            let [gate, up] = layer.gate_up.forward(&h, &spans)?;
            let act = if self.silu_gate {
                Gate::Silu
            } else {
                Gate::GeluTanh
            };
            let act = activation::gated(act, &gate, &up)?;
            let mlp = layer.down.forward(&act, &spans)?;
            x = (layer.post_ffn_norm.forward(&mlp)? + x1)?;
        }
        self.trunk.logits(&x, entries)
    }
}
