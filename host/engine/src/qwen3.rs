//! Qwen3 (dense): llama's block with no biases, per-head RMS norms of the queries and
//! keys before a NeoX-style rotation, and a head size of its own
//! (`attention.key_length`: 128 at 0.6B, where 1,024 wide over 16 heads would be 64),
//! run by the llama pass. Follows candle's `quantized_qwen3` op for op, which the tests
//! hold it to.

use candle_core::quantized::gguf_file;
use candle_core::Tensor;

use super::arch::{Architecture, Entry, Meta, Rope, Trunk};
use super::kv_cache::KvCache;
use super::llama::{Extras, Layer, Llama};
use super::EngineError;

pub struct Qwen3(Llama);

impl Qwen3 {
    pub fn from_gguf<R: std::io::Seek + std::io::Read>(
        ct: &gguf_file::Content,
        reader: &mut R,
        max_positions: usize,
    ) -> Result<Self, EngineError> {
        let md = Meta {
            ct,
            prefix: "qwen3",
        };
        if md.has("expert_count") {
            return Err(EngineError::Model(
                "mixture-of-experts qwen3 models are not served".into(),
            ));
        }
        // llama.cpp reads the head size from `key_length` and defaults it to width /
        // heads; so does lynx.
        let key = md
            .has("attention.key_length")
            .then_some("attention.key_length");
        let trunk = Trunk::load(&md, reader, key, max_positions)?;
        let freq_base = md.f32_or("rope.freq_base", 1_000_000.0)?;
        let extras = Extras {
            biases: false,
            qk_norm: true,
        };
        let layers = md.layers(reader, &trunk, |t| Layer::load(t, trunk.eps, extras))?;
        let rope = Rope::new((trunk.head_dim, freq_base), max_positions, None, 1.0, true)?;
        Ok(Self(Llama::from_parts(trunk, layers, rope)))
    }
}

impl Architecture for Qwen3 {
    fn trunk(&self) -> &Trunk {
        self.0.trunk()
    }

    fn forward(&self, cache: &KvCache, entries: &[Entry]) -> Result<Option<Tensor>, EngineError> {
        self.0.forward(cache, entries)
    }
}
