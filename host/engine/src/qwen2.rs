//! Qwen2 (and Qwen2.5): llama's block with biases on the query, key and value
//! projections and NeoX-style rotation, run by the llama pass. Follows candle's
//! `quantized_qwen2` op for op, which the tests hold it to.

use candle_core::quantized::gguf_file;
use candle_core::Tensor;

use super::arch::{Architecture, Entry, Meta, Rope, Trunk};
use super::kv_cache::KvCache;
use super::llama::{Extras, Layer, Llama};
use super::EngineError;

pub struct Qwen2(Llama);

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
        let layers = md.layers(reader, &trunk, |t| {
            Layer::load(
                t,
                trunk.eps,
                Extras {
                    biases: true,
                    qk_norm: false,
                },
            )
        })?;
        let rope = Rope::new((trunk.head_dim, freq_base), max_positions, None, 1.0, true)?;
        Ok(Self(Llama::from_parts(trunk, layers, rope)))
    }
}

impl Architecture for Qwen2 {
    fn trunk(&self) -> &Trunk {
        self.0.trunk()
    }

    fn forward(&self, cache: &KvCache, entries: &[Entry]) -> Result<Option<Tensor>, EngineError> {
        self.0.forward(cache, entries)
    }
}
