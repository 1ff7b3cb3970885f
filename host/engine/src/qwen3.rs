//! Qwen3 (dense): llama's block with no biases, per-head RMS norms of the queries and
//! keys before a NeoX-style rotation, and a head size of its own
//! (`attention.key_length`: 128 at 0.6B, where 1,024 wide over 16 heads would be 64),
//! run by the llama pass. Follows candle's `quantized_qwen3` op for op, which the tests
//! hold it to.

use candle_core::quantized::gguf_file;

use super::llama::{Extras, Llama};
use super::EngineError;

pub fn from_gguf<R: std::io::Seek + std::io::Read>(
    ct: &gguf_file::Content,
    reader: &mut R,
    max_positions: usize,
) -> Result<Llama, EngineError> {
    let extras = Extras {
        biases: false,
        qk_norm: true,
    };
    Llama::neox(ct, reader, max_positions, ("qwen3", 1_000_000.0), extras)
}
