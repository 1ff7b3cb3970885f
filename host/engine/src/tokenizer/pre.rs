//! Byte-level BPE pre-tokenizers by the name GGUF gives them (`tokenizer.ggml.pre`),
//! built as the models' own `tokenizer.json` files build them: the regex splits of the
//! original tokenizer, then the byte-to-unicode map. llama.cpp's `llama-vocab.cpp` keeps
//! the same table (its regexes adapted to its own engine; these are the originals).

use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::SplitDelimiterBehavior;

use super::TokenizerError;

const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
// Written with escapes: these ranges name code points that Unicode normalization would
// silently change (U+1F7D, U+212A, ...) were they written as characters.
const DEEPSEEK_LLM: [&str; 5] = [
    "[\r\n]",
    "\\s?[A-Za-z\u{b5}\u{c0}-\u{d6}\u{d8}-\u{f6}\u{f8}-\u{1ba}\u{1bc}-\u{1bf}\u{1c4}-\u{293}\u{295}-\u{2af}\u{370}-\u{373}\u{376}\u{377}\u{37b}-\u{37d}\u{37f}\u{386}\u{388}-\u{38a}\u{38c}\u{38e}-\u{3a1}\u{3a3}-\u{3f5}\u{3f7}-\u{481}\u{48a}-\u{52f}\u{531}-\u{556}\u{10a0}-\u{10c5}\u{13a0}-\u{13f5}\u{13f8}-\u{13fd}\u{1c90}-\u{1cba}\u{1cbd}-\u{1cbf}\u{1d00}-\u{1d2b}\u{1d6b}-\u{1d77}\u{1d79}-\u{1d9a}\u{1e00}-\u{1f15}\u{1f18}-\u{1f1d}\u{1f20}-\u{1f45}\u{1f48}-\u{1f4d}\u{1f50}-\u{1f57}\u{1f59}\u{1f5b}\u{1f5d}\u{1f5f}-\u{1f7d}\u{1f80}-\u{1fb4}\u{1fb6}-\u{1fbc}\u{1fbe}\u{1fc2}-\u{1fc4}\u{1fc6}-\u{1fcc}\u{1fd0}-\u{1fd3}\u{1fd6}-\u{1fdb}\u{1fe0}-\u{1fec}\u{1ff2}-\u{1ff4}\u{1ff6}-\u{1ffc}\u{2102}\u{2107}\u{210a}-\u{2113}\u{2115}\u{2119}-\u{211d}\u{2124}\u{2126}\u{2128}\u{212a}-\u{212d}\u{212f}-\u{2134}\u{2139}\u{213c}-\u{213f}\u{2145}-\u{2149}\u{214e}\u{2183}\u{2184}\u{2c00}-\u{2c7b}\u{2c7e}-\u{2ce4}\u{2ceb}-\u{2cee}\u{2cf2}\u{2cf3}\u{a640}-\u{a66d}\u{a680}-\u{a69b}\u{a722}-\u{a76f}\u{a771}-\u{a787}\u{a78b}-\u{a78e}\u{ab70}-\u{abbf}\u{fb00}-\u{fb06}\u{fb13}-\u{fb17}\u{ff21}-\u{ff3a}\u{ff41}-\u{ff5a}\u{10400}-\u{1044f}\u{104b0}-\u{104d3}\u{104d8}-\u{104fb}\u{10c80}-\u{10cb2}\u{10cc0}-\u{10cf2}\u{118a0}-\u{118df}\u{1e900}-\u{1e943}]+",
    "\\s?[!-/:-~\u{ff01}-\u{ff0f}\u{ff1a}-\u{ff5e}\u{2018}-\u{201f}\u{3000}-\u{3002}]+",
    "\\s+$",
    "[\u{4e00}-\u{9fa5}\u{800}-\u{4e00}\u{ac00}-\u{d7ff}]+",
];

/// How a byte-level BPE vocabulary splits and merges.
pub(super) struct Pre {
    pub(super) pre_tokenizer: PreTokenizerWrapper,
    /// The most digits one pre-token (so one token) can hold, when the split bounds it.
    pub(super) digit_cap: Option<usize>,
    /// A pre-token that is itself in the vocabulary is taken whole, before any merge
    /// (Llama 3's `ignore_merges`).
    pub(super) ignore_merges: bool,
}

/// The pre-tokenizer `pre` names.
pub(super) fn by_name(pre: &str) -> Result<Pre, TokenizerError> {
    let bytes = |regex: bool| PreTokenizerWrapper::from(ByteLevel::new(false, false, regex));
    let split = |re: &str| -> Result<PreTokenizerWrapper, TokenizerError> {
        let pattern = SplitPattern::Regex(re.to_string());
        Split::new(pattern, SplitDelimiterBehavior::Isolated, false)
            .map(PreTokenizerWrapper::from)
            .map_err(|e| TokenizerError::Metadata(format!("pre-tokenizer {pre}: {e}")))
    };
    let seq = |parts: Vec<PreTokenizerWrapper>| PreTokenizerWrapper::from(Sequence::new(parts));
    let (pre_tokenizer, digit_cap) = match pre {
        "default" | "gpt2" | "gpt-2" | "mpt" | "olmo" => (bytes(true), None),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" => {
            (seq(vec![Digits::new(true).into(), bytes(true)]), Some(1))
        }
        "llama-bpe" | "llama3" | "dbrx" | "smaug-bpe" => {
            (seq(vec![split(LLAMA3)?, bytes(false)]), Some(3))
        }
        "qwen2" | "stablelm2" => (seq(vec![split(QWEN2)?, bytes(false)]), Some(1)),
        "deepseek-llm" => {
            let mut parts = DEEPSEEK_LLM
                .iter()
                .map(|re| split(re))
                .collect::<Result<Vec<_>, _>>()?;
            parts.push(Digits::new(true).into());
            parts.push(bytes(false));
            (seq(parts), Some(1))
        }
        other => return Err(TokenizerError::UnsupportedPre(other.to_string())),
    };
    Ok(Pre {
        pre_tokenizer,
        digit_cap,
        ignore_merges: matches!(pre, "llama-bpe" | "llama3" | "dbrx" | "smaug-bpe"),
    })
}
