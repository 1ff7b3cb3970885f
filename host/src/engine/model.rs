//! The model: a llama-family GGUF's weights (run by [`Llama`], batched), its tokenizer,
//! and its context length.

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file;
use candle_core::Device;

use super::llama::Llama;
use super::tokenizer::Tokenizer;
use super::EngineError;

/// Positions a slot holds by default at most, whatever the model's context: 4096
/// positions are 180 MiB of f32 KV cache per slot for SmolLM2-135M (1.4 GiB at 8 slots).
pub const DEFAULT_MAX_SEQ_LEN: usize = 4096;

pub struct Model {
    pub llama: Llama,
    pub tokenizer: Arc<Tokenizer>,
    /// The model's trained context, in tokens.
    pub context_len: usize,
    pub device: Device,
}

impl Model {
    pub fn load(path: &Path) -> Result<Self, EngineError> {
        let mut file = std::fs::File::open(path)
            .map_err(|e| EngineError::Model(format!("opening {}: {e}", path.display())))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| EngineError::Model(format!("reading {}: {e}", path.display())))?;
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if arch != "llama" {
            return Err(EngineError::Model(format!(
                "{}: architecture {arch:?} is not llama-family",
                path.display()
            )));
        }
        let tokenizer = Tokenizer::from_gguf(&content)?;
        let context_len = context_len(&content);
        let device = Device::Cpu;
        let llama = Llama::from_gguf(&content, &mut file, &device, context_len)?;
        Ok(Self {
            llama,
            tokenizer: Arc::new(tokenizer),
            context_len,
            device,
        })
    }

    /// Only the tokenizer and context length of a GGUF, without loading its weights.
    pub fn read_tokenizer(path: &Path) -> Result<(Tokenizer, usize), EngineError> {
        let mut file = std::fs::File::open(path)
            .map_err(|e| EngineError::Model(format!("opening {}: {e}", path.display())))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| EngineError::Model(format!("reading {}: {e}", path.display())))?;
        Ok((Tokenizer::from_gguf(&content)?, context_len(&content)))
    }
}

/// The model's trained context (2048 when the GGUF does not say).
fn context_len(content: &gguf_file::Content) -> usize {
    content
        .metadata
        .get("llama.context_length")
        .and_then(|v| v.to_u32().ok())
        .map_or(2048, |n| n as usize)
}
