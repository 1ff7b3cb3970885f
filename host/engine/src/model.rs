//! The model: a GGUF's weights (run batched by the [`Architecture`] its
//! `general.architecture` names), its tokenizer, and its context length.

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file;
use candle_core::Device;

use super::arch::{self, Architecture};
use super::tokenizer::Tokenizer;
use super::EngineError;

/// Positions a slot holds by default at most, whatever the model's context: 4096
/// positions are 180 MiB of f32 KV cache per slot for SmolLM2-135M (1.4 GiB at 8 slots).
pub const DEFAULT_MAX_SEQ_LEN: usize = 4096;

pub struct Model {
    pub arch: Box<dyn Architecture>,
    pub tokenizer: Arc<Tokenizer>,
    /// The GGUF's `general.architecture`.
    pub architecture: String,
    /// The GGUF's `tokenizer.chat_template` (Jinja), when it has one.
    pub chat_template: Option<String>,
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
        // Refused before the tokenizer is built: the message names what is served.
        let name = arch::architecture(&content);
        if !arch::SUPPORTED.contains(&name.as_str()) {
            return Err(EngineError::Model(format!(
                "{}: architecture {name:?} is not served (lynx serves {})",
                path.display(),
                arch::SUPPORTED.join(", ")
            )));
        }
        let tokenizer = Tokenizer::from_gguf(&content)?;
        let context_len = arch::context_len(&content);
        let device = Device::Cpu;
        let arch = arch::load(&content, &mut file, context_len)?;
        let chat_template = content
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned();
        Ok(Self {
            arch,
            architecture: name,
            chat_template,
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
        Ok((Tokenizer::from_gguf(&content)?, arch::context_len(&content)))
    }
}
