//! Qwen2 (and Qwen2.5): llama's block with biases on the query, key and value
//! projections and NeoX-style rotation, run by the llama pass. Follows candle's
//! `quantized_qwen2` op for op, which the tests hold it to.

use candle_core::quantized::gguf_file;

use super::llama::{Extras, Llama};
use super::EngineError;

pub fn from_gguf<R: std::io::Seek + std::io::Read>(
    ct: &gguf_file::Content,
    reader: &mut R,
    max_positions: usize,
) -> Result<Llama, EngineError> {
    let extras = Extras {
        biases: true,
        qk_norm: false,
    };
    Llama::neox(ct, reader, max_positions, ("qwen2", 10_000.0), extras)
}
