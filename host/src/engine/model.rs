//! The model: a llama-family GGUF loaded with candle's quantized llama, its tokenizer,
//! and the context limit that serving enforces.

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::{ModelWeights, MAX_SEQ_LEN};

use super::tokenizer::Tokenizer;
use super::EngineError;

pub struct Model {
    /// Never run: each sequence runs on its own clone. Clones share the weights (they are
    /// reference counted) but not the KV cache nor candle's per-shape mask cache, which
    /// would otherwise grow for the life of the process.
    pristine: ModelWeights,
    pub tokenizer: Arc<Tokenizer>,
    /// The longest sequence (prompt + completion) served, in tokens.
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
        let pristine = ModelWeights::from_gguf(content, &mut file, &device)?;
        Ok(Self {
            pristine,
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

    /// A fresh sequence state: shared weights, empty KV cache.
    pub fn new_sequence(&self) -> ModelWeights {
        self.pristine.clone()
    }

    /// Runs `tokens` at positions `pos..` through `weights`; the last position's logits.
    pub fn forward(
        &self,
        weights: &mut ModelWeights,
        tokens: &[u32],
        pos: usize,
    ) -> Result<Tensor, EngineError> {
        let input = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        Ok(weights.forward(&input, pos)?.squeeze(0)?)
    }
}

/// The context served: the model's trained context, capped where candle's rotary
/// tables stop (MAX_SEQ_LEN positions).
fn context_len(content: &gguf_file::Content) -> usize {
    content
        .metadata
        .get("llama.context_length")
        .and_then(|v| v.to_u32().ok())
        .map_or(MAX_SEQ_LEN, |n| n as usize)
        .min(MAX_SEQ_LEN)
}
