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
use candle_transformers::quantized_nn::RmsNorm;

use super::activation::{self, Gate};
use super::arch::{self, Architecture, Entry, LayerTensors, Meta, Rope, Trunk};
use super::kv_cache::KvCache;
use super::qmatmul::{Joined, Linear};
use super::EngineError;

struct Layer {
    /// q, k and v.
    qkv: Joined<3>,
    /// Biases of q, k and v (qwen2).
    bias: Option<[Tensor; 3]>,
    /// Per-head RMS norms of queries and keys, before rotation (qwen3).
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    wo: Linear,
    attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    /// The MLP's gate and up projections.
    gate_up: Joined<2>,
    down: Linear,
}

/// What a llama-family layer has beyond llama's own.
#[derive(Clone, Copy, Default)]
pub(super) struct Extras {
    /// Biases on q, k and v (qwen2).
    pub biases: bool,
    /// Per-head q and k norms (qwen3).
    pub qk_norm: bool,
}

/// The weights and shape of a llama-family model.
pub struct Llama {
    trunk: Trunk,
    layers: Vec<Layer>,
    rope: Rope,
}

impl Layer {
    /// Layer `layer`'s weights, with the `extras` its family has.
    fn load<R: std::io::Seek + std::io::Read>(
        t: &mut LayerTensors<'_, R>,
        eps: f64,
        extras: Extras,
    ) -> Result<Self, EngineError> {
        let bias = if extras.biases {
            Some([
                t.f32("attn_q.bias")?,
                t.f32("attn_k.bias")?,
                t.f32("attn_v.bias")?,
            ])
        } else {
            None
        };
        let qk_norm = if extras.qk_norm {
            Some((t.norm("attn_q_norm", eps)?, t.norm("attn_k_norm", eps)?))
        } else {
            None
        };
        Ok(Self {
            qkv: Joined::new([
                t.linear("attn_q")?,
                t.linear("attn_k")?,
                t.linear("attn_v")?,
            ]),
            bias,
            qk_norm,
            wo: t.linear("attn_output")?,
            attn_norm: t.norm("attn_norm", eps)?,
            ffn_norm: t.norm("ffn_norm", eps)?,
            gate_up: Joined::new([t.linear("ffn_gate")?, t.linear("ffn_up")?]),
            down: t.linear("ffn_down")?,
        })
    }
}

impl Llama {
    /// A member of the family with NeoX-style rotation over the whole head (qwen2,
    /// qwen3): its metadata under `prefix`, its rope base defaulting to `base`, the head
    /// size `attention.key_length` where the file gives it (as llama.cpp reads it),
    /// else width / heads, and the layer `extras` it has.
    pub(super) fn neox<R: std::io::Seek + std::io::Read>(
        ct: &gguf_file::Content,
        reader: &mut R,
        max_positions: usize,
        (prefix, base): (&'static str, f32),
        extras: Extras,
    ) -> Result<Self, EngineError> {
        let md = Meta { ct, prefix };
        refuse_experts(&md)?;
        let key = md
            .has("attention.key_length")
            .then_some("attention.key_length");
        let trunk = Trunk::load(&md, reader, key, max_positions)?;
        let freq_base = md.f32_or("rope.freq_base", base)?;
        let layers = md.layers(reader, &trunk, |t| Layer::load(t, trunk.eps, extras))?;
        let rope = Rope::new((trunk.head_dim, freq_base), max_positions, None, 1.0, true)?;
        Ok(Self {
            trunk,
            layers,
            rope,
        })
    }
}

/// Mixture-of-experts files share the dense architectures' names; their expert layers
/// are not served.
fn refuse_experts(md: &Meta) -> Result<(), EngineError> {
    if md.has("expert_count") {
        return Err(EngineError::Model(format!(
            "mixture-of-experts {} models are not served",
            md.prefix
        )));
    }
    Ok(())
}

impl Llama {
    pub fn from_gguf<R: std::io::Seek + std::io::Read>(
        ct: &gguf_file::Content,
        reader: &mut R,
        max_positions: usize,
    ) -> Result<Self, EngineError> {
        let md = Meta {
            ct,
            prefix: "llama",
        };
        refuse_experts(&md)?;
        let trunk = Trunk::load(&md, reader, None, max_positions)?;
        // llama.cpp takes the head size when the file does not say (`llama.cpp`'s
        // `n_rot = n_embd_head_k` default); many converted files leave the key out.
        let rope_dim = md.usize_or("rope.dimension_count", trunk.head_dim)?;
        let freq_base = md.f32_or("rope.freq_base", 10_000.0)?;
        // Linear rope scaling stretches positions; llama 3.1's scaling comes as per-pair
        // frequency divisors (`rope_freqs.weight`), as llama.cpp applies them.
        let scale = md.rope_scale()?;
        let freq_factors: Option<Vec<f32>> =
            match ct.tensor(reader, "rope_freqs.weight", &Device::Cpu) {
                Ok(t) => Some(t.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?),
                Err(_) => None,
            };
        let layers = md.layers(reader, &trunk, |t| {
            Layer::load(t, trunk.eps, Extras::default())
        })?;
        let rope = Rope::new(
            (rope_dim, freq_base),
            max_positions,
            freq_factors.as_deref(),
            scale,
            false,
        )?;
        Ok(Self {
            trunk,
            layers,
            rope,
        })
    }
}

impl Architecture for Llama {
    fn trunk(&self) -> &Trunk {
        &self.trunk
    }

    fn forward(&self, cache: &KvCache, entries: &[Entry]) -> Result<Option<Tensor>, EngineError> {
        let (mut x, spans) = self.trunk.embed(cache, entries)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let qk_norm = layer.qk_norm.as_ref().map(|(q, k)| (q, k));
            let shape = self.trunk.attn(&self.rope, None, qk_norm);
            let residual = &x;
            let h = layer.attn_norm.forward(&x)?;
            let [q, k, v] = layer.qkv.forward(&h, &spans)?;
            let (q, k, v) = match &layer.bias {
                Some([bq, bk, bv]) => (
                    q.broadcast_add(bq)?,
                    k.broadcast_add(bk)?,
                    v.broadcast_add(bv)?,
                ),
                None => (q, k, v),
            };
            let attn = arch::attention(cache, li, entries, &shape, (q, k, v))?;
            let attn = layer.wo.forward(&attn, &spans)?;
            let x1 = (attn + residual)?;
            let h = layer.ffn_norm.forward(&x1)?;
            let [gate, up] = layer.gate_up.forward(&h, &spans)?;
            let mlp = layer
                .down
                .forward(&activation::gated(Gate::Silu, &gate, &up)?, &spans)?;
            x = (mlp + x1)?;
        }
        self.trunk.logits(&x, entries)
    }
}
