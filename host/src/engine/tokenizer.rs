//! The tokenizer: GPT-2 style byte-level BPE built from a GGUF file's own metadata
//! (`tokenizer.ggml.*`), so no tokenizer file or hub is ever needed.
//!
//! It owns encoding (special-token splitting, the `pre` pre-tokenizer, BPE merges) and
//! decoding. Incremental decoding of a stream is post-processing, so it lives in the
//! plugins (`lynx-plugin-core`'s `TextStream`), which read token bytes from the host.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value};
use fancy_regex::Regex;

/// The GPT-2 split regex (`'s|'t|… |\s+(?!\S)|\s+`), shared by the `gpt2` and `smollm`
/// pre-tokenizers; needs look-ahead, hence `fancy_regex`.
const GPT2_SPLIT: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// GGUF `tokenizer.ggml.token_type` values that mark tokens matched as whole strings in
/// text rather than built by merges.
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("GGUF metadata: {0}")]
    Metadata(String),
    #[error("unsupported tokenizer model {0:?} (only gpt2-style byte-level BPE is supported)")]
    UnsupportedModel(String),
    #[error("unsupported pre-tokenizer {0:?}")]
    UnsupportedPre(String),
    #[error("token id {0} is outside the vocabulary")]
    UnknownId(u32),
    #[error("byte sequence {0:?} has no token")]
    NoToken(String),
}

type Result<T> = std::result::Result<T, TokenizerError>;

pub struct Tokenizer {
    /// id → the bytes it stands for (special tokens: their text).
    pieces: Vec<Vec<u8>>,
    is_special: Vec<bool>,
    /// byte → the id of its single-byte token. Some vocabularies lack a few (SmolLM2 has
    /// no token for six C0 controls nor for bytes UTF-8 never uses): those bytes are
    /// dropped on encoding, as Hugging Face's BPE does without an unknown token.
    byte_ids: [Option<u32>; 256],
    /// (left id, right id) → (merge rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Special tokens as matched in text, longest first so that a prefix never wins.
    specials: Vec<(String, u32)>,
    split: Regex,
    split_digits: bool,
    pub bos_id: Option<u32>,
    pub eos_id: u32,
    pub add_bos: bool,
    /// Ids that end a generation: EOS plus the usual end-of-turn control tokens.
    end_ids: Vec<u32>,
}

fn md<'a>(ct: &'a Content, key: &str) -> Result<&'a Value> {
    ct.metadata
        .get(key)
        .ok_or_else(|| TokenizerError::Metadata(format!("missing {key}")))
}

fn bad(key: &str, e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Metadata(format!("{key}: {e}"))
}

fn strings(ct: &Content, key: &str) -> Result<Vec<String>> {
    let values = md(ct, key)?.to_vec().map_err(|e| bad(key, e))?;
    values
        .iter()
        .map(|v| v.to_string().cloned().map_err(|e| bad(key, e)))
        .collect()
}

/// GPT-2's reversible map from bytes to printable unicode characters.
fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let code = if printable {
            u32::from(b)
        } else {
            extra += 1;
            255 + extra
        };
        table[usize::from(b)] = char::from_u32(code).unwrap_or('\0');
    }
    table
}

impl Tokenizer {
    pub fn from_gguf(ct: &Content) -> Result<Self> {
        let model = md(ct, "tokenizer.ggml.model")?
            .to_string()
            .map_err(|e| bad("tokenizer.ggml.model", e))?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel(model.clone()));
        }
        let pre = match ct.metadata.get("tokenizer.ggml.pre") {
            Some(v) => v
                .to_string()
                .map_err(|e| bad("tokenizer.ggml.pre", e))?
                .clone(),
            None => "default".to_string(),
        };
        let split_digits = match pre.as_str() {
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" => true,
            "gpt2" | "default" | "gpt-2" => false,
            other => return Err(TokenizerError::UnsupportedPre(other.to_string())),
        };
        let tokens = strings(ct, "tokenizer.ggml.tokens")?;
        let types: Vec<i32> = match ct.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|e| bad("tokenizer.ggml.token_type", e))?
                .iter()
                .map(|t| t.to_i32().map_err(|e| bad("tokenizer.ggml.token_type", e)))
                .collect::<Result<_>>()?,
            None => vec![1; tokens.len()],
        };
        let merges_raw = strings(ct, "tokenizer.ggml.merges")?;
        let get_u32 = |key: &str| -> Result<Option<u32>> {
            ct.metadata
                .get(key)
                .map(|v| v.to_u32().map_err(|e| bad(key, e)))
                .transpose()
        };
        let eos_id = get_u32("tokenizer.ggml.eos_token_id")?
            .ok_or_else(|| TokenizerError::Metadata("missing eos_token_id".into()))?;
        let bos_id = get_u32("tokenizer.ggml.bos_token_id")?;
        let add_bos = match ct.metadata.get("tokenizer.ggml.add_bos_token") {
            Some(v) => v
                .to_bool()
                .map_err(|e| bad("tokenizer.ggml.add_bos_token", e))?,
            None => false,
        };
        Self::new(TokenizerParts {
            tokens,
            types,
            merges: merges_raw,
            split_digits,
            bos_id,
            eos_id,
            add_bos,
        })
    }

    fn new(p: TokenizerParts) -> Result<Self> {
        let b2c = byte_to_char();
        let mut c2b = HashMap::with_capacity(256);
        for (b, c) in b2c.iter().enumerate() {
            c2b.insert(*c, b as u8);
        }
        let mut by_text = HashMap::with_capacity(p.tokens.len());
        let mut pieces = Vec::with_capacity(p.tokens.len());
        let mut is_special = Vec::with_capacity(p.tokens.len());
        let mut specials = Vec::new();
        for (id, text) in p.tokens.iter().enumerate() {
            let id = id as u32;
            let ty = p.types.get(id as usize).copied().unwrap_or(1);
            let special = ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED;
            if special {
                specials.push((text.clone(), id));
                pieces.push(text.as_bytes().to_vec());
            } else {
                // A char outside the byte map only appears in malformed vocabularies;
                // keep its UTF-8 so decoding stays total.
                let mut bytes = Vec::with_capacity(text.len());
                for c in text.chars() {
                    match c2b.get(&c) {
                        Some(b) => bytes.push(*b),
                        None => bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                    }
                }
                pieces.push(bytes);
                by_text.entry(text.clone()).or_insert(id);
            }
            is_special.push(special);
        }
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));

        let mut byte_ids = [None; 256];
        for (b, c) in b2c.iter().enumerate() {
            byte_ids[b] = by_text.get(&c.to_string()).copied();
        }
        let mut merges = HashMap::with_capacity(p.merges.len());
        for (rank, line) in p.merges.iter().enumerate() {
            let Some((a, b)) = line.split_once(' ') else {
                continue;
            };
            let (Some(&ia), Some(&ib), Some(&im)) = (
                by_text.get(a),
                by_text.get(b),
                by_text.get(&format!("{a}{b}")),
            ) else {
                continue;
            };
            merges.entry((ia, ib)).or_insert((rank as u32, im));
        }
        let split =
            Regex::new(GPT2_SPLIT).map_err(|e| TokenizerError::Metadata(format!("regex: {e}")))?;
        let mut end_ids = vec![p.eos_id];
        for name in [
            "<|endoftext|>",
            "<|im_end|>",
            "<|eot_id|>",
            "<|end_of_text|>",
        ] {
            if let Some((_, id)) = specials.iter().find(|(t, _)| t == name) {
                if !end_ids.contains(id) {
                    end_ids.push(*id);
                }
            }
        }
        Ok(Self {
            pieces,
            is_special,
            byte_ids,
            merges,
            specials,
            split,
            split_digits: p.split_digits,
            bos_id: p.bos_id,
            eos_id: p.eos_id,
            add_bos: p.add_bos,
            end_ids,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// Whether `id` ends a generation (EOS or an end-of-turn control token).
    pub fn is_end(&self, id: u32) -> bool {
        self.end_ids.contains(&id)
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.is_special.get(id as usize).copied().unwrap_or(false)
    }

    /// Encodes `text`. With `parse_special`, special-token strings in the text (such as
    /// `<|im_start|>`) become their ids; without, they are encoded as plain text.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 1);
        let mut rest = text;
        while !rest.is_empty() {
            let next = if parse_special {
                self.next_special(rest)
            } else {
                None
            };
            match next {
                Some((at, len, id)) => {
                    self.encode_plain(&rest[..at], &mut ids)?;
                    ids.push(id);
                    rest = &rest[at + len..];
                }
                None => {
                    self.encode_plain(rest, &mut ids)?;
                    break;
                }
            }
        }
        Ok(ids)
    }

    /// The earliest special token in `text`: (byte offset, byte length, id).
    fn next_special(&self, text: &str) -> Option<(usize, usize, u32)> {
        let mut best: Option<(usize, usize, u32)> = None;
        for (s, id) in &self.specials {
            if let Some(at) = text.find(s.as_str()) {
                // `specials` is longest first, so on a tie in position the longer stays.
                if best.is_none_or(|(b, _, _)| at < b) {
                    best = Some((at, s.len(), *id));
                }
            }
        }
        best
    }

    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        if !self.split_digits {
            return self.encode_words(text, out);
        }
        let mut start = 0;
        for (i, c) in text.char_indices() {
            if c.is_numeric() {
                self.encode_words(&text[start..i], out)?;
                self.bpe(&text.as_bytes()[i..i + c.len_utf8()], out);
                start = i + c.len_utf8();
            }
        }
        self.encode_words(&text[start..], out)
    }

    fn encode_words(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        for m in self.split.find_iter(text) {
            let m = m.map_err(|e| TokenizerError::NoToken(format!("split: {e}")))?;
            self.bpe(m.as_str().as_bytes(), out);
        }
        Ok(())
    }

    /// Byte-pair merges over one pre-token, lowest rank first.
    fn bpe(&self, word: &[u8], out: &mut Vec<u32>) {
        let mut syms: Vec<u32> = word
            .iter()
            .filter_map(|b| self.byte_ids[usize::from(*b)])
            .collect();
        while syms.len() > 1 {
            let mut best: Option<(u32, usize, u32)> = None;
            for i in 0..syms.len() - 1 {
                if let Some(&(rank, merged)) = self.merges.get(&(syms[i], syms[i + 1])) {
                    if best.is_none_or(|(r, _, _)| rank < r) {
                        best = Some((rank, i, merged));
                    }
                }
            }
            let Some((_, i, merged)) = best else { break };
            syms[i] = merged;
            syms.remove(i + 1);
        }
        out.extend_from_slice(&syms);
    }

    /// Whether the vocabulary holds byte `b` (SmolLM2's lacks 21 of the 256, all lead
    /// bytes of code points past U+3FFFF or never valid in UTF-8; text using them cannot
    /// round-trip and loses those bytes, as with Hugging Face's tokenizer).
    pub fn encodes_byte(&self, b: u8) -> bool {
        self.byte_ids[usize::from(b)].is_some()
    }

    /// The bytes one token stands for.
    pub fn piece(&self, id: u32) -> Result<&[u8]> {
        self.pieces
            .get(id as usize)
            .map(Vec::as_slice)
            .ok_or(TokenizerError::UnknownId(id))
    }

    /// Decodes ids to text; invalid UTF-8 (a cut multi-byte character) is replaced.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let mut bytes = Vec::new();
        for &id in ids {
            if skip_special && self.is_special(id) {
                continue;
            }
            bytes.extend_from_slice(self.piece(id)?);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

struct TokenizerParts {
    tokens: Vec<String>,
    types: Vec<i32>,
    merges: Vec<String>,
    split_digits: bool,
    bos_id: Option<u32>,
    eos_id: u32,
    add_bos: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny vocabulary: every byte, a few merges and two control tokens.
    fn tiny() -> Tokenizer {
        let b2c = byte_to_char();
        let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_end|>".into()];
        tokens.extend(b2c.iter().map(|c| c.to_string()));
        let merges: Vec<String> = vec!["h e".into(), "l l".into(), "he ll".into(), "Ġ w".into()];
        tokens.extend(["he", "ll", "hell", "Ġw"].map(String::from));
        let mut types = vec![TOKEN_TYPE_CONTROL; 2];
        types.resize(tokens.len(), 1);
        Tokenizer::new(TokenizerParts {
            tokens,
            types,
            merges,
            split_digits: true,
            bos_id: None,
            eos_id: 1,
            add_bos: false,
        })
        .expect("tiny vocabulary is well formed")
    }

    #[test]
    fn merges_apply_by_rank_and_round_trip() {
        let t = tiny();
        let ids = t.encode("hello world", false).unwrap();
        let hell = t.specials.len() as u32 + 256 + 2;
        assert_eq!(ids[0], hell);
        assert_eq!(t.decode(&ids, false).unwrap(), "hello world");
    }

    #[test]
    fn specials_are_parsed_only_when_asked() {
        let t = tiny();
        assert_eq!(t.encode("a<|im_end|>", true).unwrap().last(), Some(&1));
        let plain = t.encode("a<|im_end|>", false).unwrap();
        assert!(!plain.contains(&1));
        assert_eq!(t.decode(&plain, false).unwrap(), "a<|im_end|>");
        assert!(t.is_end(1) && t.is_end(0));
    }
}
