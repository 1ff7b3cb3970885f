//! The tokenizer, built from a GGUF file's own metadata (`tokenizer.ggml.*`) with
//! Hugging Face's `tokenizers`, so no tokenizer file or hub is ever needed, and encoding
//! runs in near-linear time whatever the input's shape: byte-level BPE (`gpt2`, with
//! the pre-tokenizer `tokenizer.ggml.pre` names, see `pre`) and SentencePiece with byte
//! fallback (`llama`, see `spm`). Control tokens are parsed from text only when asked;
//! user-defined tokens always are, as llama.cpp does.
//!
//! It owns encoding (special-token splitting, the `pre` pre-tokenizer, BPE merges, all in
//! `tokenizers`), decoding, and the cheap lower bound on a text's token count that lets
//! the host refuse a prompt that cannot fit the context without encoding it. Incremental
//! decoding of a stream is post-processing, so it lives in the plugins
//! (`lynx-plugin-core`'s `TextStream`), which read token bytes from the host.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::AddedToken;

mod pre;
mod spm;

/// GGUF `tokenizer.ggml.token_type` values that mark tokens matched as whole strings in
/// text rather than built by merges.
const TOKEN_TYPE_NORMAL: i32 = 1;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;
const TOKEN_TYPE_BYTE: i32 = 6;

/// Control tokens that end a turn in the chat formats of the served families, besides
/// the metadata's own EOS/EOT/EOM ids (llama.cpp keeps the same list).
const END_OF_TURN: [&str; 8] = [
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<end_of_turn>",
    "<|end|>",
    "<EOT>",
];

/// Byte classes of the token-count lower bound: ASCII letters, ASCII digits, ASCII
/// whitespace, other ASCII, and every byte of a multi-byte character.
const CLASSES: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("GGUF metadata: {0}")]
    Metadata(String),
    #[error("unsupported tokenizer model {0:?} (lynx reads gpt2 byte-level BPE and llama SentencePiece)")]
    UnsupportedModel(String),
    #[error("unsupported pre-tokenizer {0:?}")]
    UnsupportedPre(String),
    #[error("token id {0} is outside the vocabulary")]
    UnknownId(u32),
    #[error("encoding: {0}")]
    Encode(String),
    #[error("the text is at least {at_least} tokens long, over the limit of {limit}")]
    TooLong { at_least: usize, limit: usize },
}

type Result<T> = std::result::Result<T, TokenizerError>;

pub struct Tokenizer {
    /// Special-token text in the input is plain text.
    plain: tokenizers::Tokenizer,
    /// Special-token text in the input becomes the special token.
    special: tokenizers::Tokenizer,
    /// id → the bytes it stands for (control tokens: their text).
    pieces: Vec<Vec<u8>>,
    /// Control tokens: skipped when decoding without specials.
    is_special: Vec<bool>,
    /// byte → its class for the lower bound; `None` for a byte the vocabulary cannot
    /// encode (SmolLM2 lacks 21): it is dropped on encoding, as Hugging Face's BPE does
    /// without an unknown token, so it costs no token.
    byte_class: [Option<u8>; 256],
    /// class → the most bytes of that class one token can cover: ordinary tokens only,
    /// and with special tokens (when their text in the input is parsed).
    class_cap: [[usize; CLASSES]; 2],
    /// The most of all classes' caps one token covers together (see [`Self::min_tokens`]).
    class_spread: [f64; 2],
    pub bos_id: Option<u32>,
    pub eos_id: u32,
    pub add_bos: bool,
    /// Ids that end a generation: EOS plus the usual end-of-turn control tokens.
    end_ids: Vec<u32>,
}

/// How pieces combine: by ranked merges of byte-level pieces, or SentencePiece.
enum Kind {
    Bpe {
        merges: Vec<String>,
        pre: String,
    },
    Spm {
        scores: Vec<f32>,
        add_space_prefix: bool,
    },
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

/// GPT-2's reversible map from bytes to printable unicode characters, as byte-level
/// vocabularies spell their tokens.
pub fn byte_to_char() -> [char; 256] {
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

fn class_of(b: u8) -> usize {
    match b {
        b'a'..=b'z' | b'A'..=b'Z' => 0,
        b'0'..=b'9' => 1,
        b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c => 2,
        0..=0x7f => 3,
        _ => 4,
    }
}

impl Tokenizer {
    pub fn from_gguf(ct: &Content) -> Result<Self> {
        let model = md(ct, "tokenizer.ggml.model")?
            .to_string()
            .map_err(|e| bad("tokenizer.ggml.model", e))?;
        let get_bool = |key: &str| -> Result<Option<bool>> {
            ct.metadata
                .get(key)
                .map(|v| v.to_bool().map_err(|e| bad(key, e)))
                .transpose()
        };
        let kind = match model.as_str() {
            "gpt2" => Kind::Bpe {
                merges: strings(ct, "tokenizer.ggml.merges")?,
                pre: match ct.metadata.get("tokenizer.ggml.pre") {
                    Some(v) => v
                        .to_string()
                        .map_err(|e| bad("tokenizer.ggml.pre", e))?
                        .clone(),
                    None => "default".to_string(),
                },
            },
            "llama" => Kind::Spm {
                scores: md(ct, "tokenizer.ggml.scores")?
                    .to_vec()
                    .map_err(|e| bad("tokenizer.ggml.scores", e))?
                    .iter()
                    .map(|v| v.to_f32().map_err(|e| bad("tokenizer.ggml.scores", e)))
                    .collect::<Result<_>>()?,
                add_space_prefix: get_bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true),
            },
            other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
        };
        let tokens = strings(ct, "tokenizer.ggml.tokens")?;
        let types: Vec<i32> = match ct.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|e| bad("tokenizer.ggml.token_type", e))?
                .iter()
                .map(|t| t.to_i32().map_err(|e| bad("tokenizer.ggml.token_type", e)))
                .collect::<Result<_>>()?,
            None => vec![TOKEN_TYPE_NORMAL; tokens.len()],
        };
        let get_u32 = |key: &str| -> Result<Option<u32>> {
            ct.metadata
                .get(key)
                .map(|v| v.to_u32().map_err(|e| bad(key, e)))
                .transpose()
        };
        let eos_id = get_u32("tokenizer.ggml.eos_token_id")?
            .ok_or_else(|| TokenizerError::Metadata("missing eos_token_id".into()))?;
        let mut stop_ids = vec![eos_id];
        for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            stop_ids.extend(get_u32(key)?);
        }
        let bos_id = get_u32("tokenizer.ggml.bos_token_id")?;
        let add_bos = get_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
        Self::new(TokenizerParts {
            tokens,
            types,
            kind,
            bos_id,
            eos_id,
            stop_ids,
            add_bos,
        })
    }

    fn new(p: TokenizerParts) -> Result<Self> {
        let spm = matches!(p.kind, Kind::Spm { .. });
        let b2c = byte_to_char();
        let c2b: HashMap<char, u8> = b2c.iter().enumerate().map(|(b, c)| (*c, b as u8)).collect();
        let mut vocab = Vocab::with_capacity(p.tokens.len());
        let mut pieces = Vec::with_capacity(p.tokens.len());
        let mut is_special = Vec::with_capacity(p.tokens.len());
        // Per token: 0 matched by the model, 1 always matched as a whole (user-defined),
        // 2 matched as a whole only when specials are parsed (control).
        let mut whole = Vec::with_capacity(p.tokens.len());
        let (mut specials, mut user) = (Vec::new(), Vec::new());
        for (id, text) in p.tokens.iter().enumerate() {
            let id = u32::try_from(id)
                .map_err(|_| TokenizerError::Metadata("vocabulary too large".into()))?;
            let ty = p
                .types
                .get(id as usize)
                .copied()
                .unwrap_or(TOKEN_TYPE_NORMAL);
            let control = ty == TOKEN_TYPE_CONTROL;
            let piece = if control {
                specials.push(AddedToken::from(text.clone(), true));
                whole.push(2u8);
                text.as_bytes().to_vec()
            } else if ty == TOKEN_TYPE_USER_DEFINED {
                user.push(AddedToken::from(text.clone(), false).normalized(false));
                whole.push(1);
                text.replace(spm::SPACE, " ").into_bytes()
            } else if spm {
                whole.push(0);
                match (ty, spm::byte_piece(text)) {
                    (TOKEN_TYPE_BYTE, Some(b)) => vec![b],
                    _ => text.replace(spm::SPACE, " ").into_bytes(),
                }
            } else {
                whole.push(0);
                // A char outside the byte map only appears in malformed vocabularies;
                // keep its UTF-8 so decoding stays total.
                let mut bytes = Vec::with_capacity(text.len());
                for c in text.chars() {
                    match c2b.get(&c) {
                        Some(b) => bytes.push(*b),
                        None => bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                    }
                }
                bytes
            };
            pieces.push(piece);
            vocab.entry(text.clone()).or_insert(id);
            is_special.push(control);
        }

        let mut byte_class = [None; 256];
        for (b, c) in b2c.iter().enumerate() {
            // SentencePiece falls back to byte pieces: every byte encodes.
            if spm || vocab.contains_key(&c.to_string()) {
                byte_class[b] = Some(class_of(b as u8) as u8);
            }
        }
        // The most bytes of each class one token covers: tokens the model builds,
        // user-defined tokens (always matched whole), control tokens (matched whole
        // only when specials are parsed).
        let mut caps = [[1usize; CLASSES]; 3];
        let mut piece_counts = Vec::with_capacity(pieces.len());
        for (piece, &w) in pieces.iter().zip(&whole) {
            let mut counts = [0usize; CLASSES];
            for &b in piece {
                counts[class_of(b)] += 1;
            }
            for (cap, n) in caps[usize::from(w)].iter_mut().zip(counts) {
                *cap = (*cap).max(n);
            }
            piece_counts.push((counts, w));
        }

        let (model, pre, normalizer) = match p.kind {
            Kind::Bpe { merges, pre } => {
                let merges: Vec<(String, String)> = merges
                    .iter()
                    .filter_map(|line| line.split_once(' '))
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .collect();
                let pre = pre::by_name(&pre)?;
                if let Some(cap) = pre.digit_cap {
                    // Digits are split into pre-tokens of at most `cap`.
                    caps[0][1] = caps[0][1].min(cap);
                }
                let bpe = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .ignore_merges(pre.ignore_merges)
                    .build();
                (bpe, Some(pre.pre_tokenizer), None)
            }
            Kind::Spm {
                scores,
                add_space_prefix,
            } => {
                let merges = spm::merges(&p.tokens, &scores, |id| {
                    p.types.get(id).copied().unwrap_or(TOKEN_TYPE_NORMAL) == TOKEN_TYPE_NORMAL
                });
                let mut builder = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .byte_fallback(true)
                    .fuse_unk(true);
                if let Some(unk) = p.tokens.iter().zip(&p.types).find(|(_, &t)| t == 2) {
                    builder = builder.unk_token(unk.0.clone());
                }
                (
                    builder.build(),
                    None,
                    Some(spm::normalizer(add_space_prefix)?),
                )
            }
        };
        let model = model.map_err(|e| TokenizerError::Metadata(format!("BPE: {e}")))?;
        let mut class_cap = [[1usize; CLASSES]; 2];
        for c in 0..CLASSES {
            class_cap[0][c] = caps[0][c].max(caps[1][c]);
            class_cap[1][c] = class_cap[0][c].max(caps[2][c]);
        }
        // The most one token can cover of all classes together, each class counted as
        // its share of that class's cap: a text needs at least (sum over classes of
        // bytes / cap) / spread tokens, however its classes mix.
        let mut class_spread = [1.0f64; 2];
        for (counts, w) in &piece_counts {
            for (parse, spread) in class_spread.iter_mut().enumerate() {
                if parse == 0 && *w == 2 {
                    continue;
                }
                let cover: f64 = counts
                    .iter()
                    .zip(class_cap[parse])
                    .map(|(&n, cap)| n as f64 / cap as f64)
                    .sum();
                *spread = spread.max(cover);
            }
        }
        let mut special = tokenizers::Tokenizer::new(model);
        special.with_pre_tokenizer(pre);
        if let Some(n) = normalizer {
            special
                .with_normalizer(Some(n))
                .map_err(|e| TokenizerError::Metadata(format!("normalizer: {e}")))?;
        }
        special
            .add_tokens(user)
            .map_err(|e| TokenizerError::Metadata(format!("user-defined tokens: {e}")))?;
        special
            .add_special_tokens(specials)
            .map_err(|e| TokenizerError::Metadata(format!("special tokens: {e}")))?;
        let mut plain = special.clone();
        plain.set_encode_special_tokens(true);

        let mut end_ids = p.stop_ids.clone();
        for name in END_OF_TURN {
            let found = pieces
                .iter()
                .zip(&is_special)
                .position(|(piece, &s)| s && piece.as_slice() == name.as_bytes());
            if let Some(id) = found.and_then(|i| u32::try_from(i).ok()) {
                if !end_ids.contains(&id) {
                    end_ids.push(id);
                }
            }
        }
        Ok(Self {
            plain,
            special,
            pieces,
            is_special,
            byte_class,
            class_cap,
            class_spread,
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
    /// The first of `ids` outside the vocabulary: the one check every id a client or a
    /// plugin names goes through before it reaches the model.
    pub fn first_unknown(&self, ids: impl IntoIterator<Item = u32>) -> Option<u32> {
        let vocab = self.vocab_size();
        ids.into_iter().find(|&id| id as usize >= vocab)
    }

    pub fn is_end(&self, id: u32) -> bool {
        self.end_ids.contains(&id)
    }

    /// The tokens that end a generation: EOS first, then end-of-turn tokens.
    pub fn end_ids(&self) -> &[u32] {
        &self.end_ids
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.is_special.get(id as usize).copied().unwrap_or(false)
    }

    /// Encodes `text`. With `parse_special`, special-token strings in the text (such as
    /// `<|im_start|>`) become their ids; without, they are encoded as plain text.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let tokenizer = if parse_special {
            &self.special
        } else {
            &self.plain
        };
        let encoding = tokenizer
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Encodes `text` unless it provably holds more than `limit` tokens, which is told
    /// in one pass over its bytes ([`Self::min_tokens`]) without encoding it: a prompt
    /// that cannot fit the context costs a scan, not a tokenization.
    pub fn encode_bounded(
        &self,
        text: &str,
        parse_special: bool,
        limit: usize,
    ) -> Result<Vec<u32>> {
        let at_least = self.min_tokens(text, parse_special);
        if at_least > limit {
            return Err(TokenizerError::TooLong { at_least, limit });
        }
        self.encode(text, parse_special)
    }

    /// A lower bound on the tokens `text` encodes to: every token covers at most
    /// `cap[c]` bytes of class `c`, so a text with `n` encodable bytes of class `c` needs
    /// at least `n / cap[c]` tokens; and every token covers at most `spread` of the
    /// classes' caps together, so the text needs at least `sum(n / cap) / spread`. Special-token text counts as ordinary text unless
    /// `parse_special`, when it may become one (long) token.
    pub fn min_tokens(&self, text: &str, parse_special: bool) -> usize {
        let mut counts = [0usize; CLASSES];
        for &b in text.as_bytes() {
            if let Some(c) = self.byte_class[usize::from(b)] {
                counts[usize::from(c)] += 1;
            }
        }
        let caps = self.class_cap[usize::from(parse_special)];
        let by_class = counts
            .iter()
            .zip(caps)
            .map(|(&n, cap)| n.div_ceil(cap))
            .max()
            .unwrap_or(0);
        // Summed over the classes: a text mixing classes needs more tokens than its
        // largest class alone, and no token covers more than `class_spread` caps'
        // worth in all. Rounded down past float error, so the bound stays a bound.
        let covered: f64 = counts
            .iter()
            .zip(caps)
            .map(|(&n, cap)| n as f64 / cap as f64)
            .sum();
        let summed = (covered / self.class_spread[usize::from(parse_special)] * (1.0 - 1e-9))
            .floor() as usize;
        by_class.max(summed)
    }

    /// Whether the vocabulary holds byte `b` (SmolLM2's lacks 21 of the 256, all lead
    /// bytes of code points past U+3FFFF or never valid in UTF-8; text using them cannot
    /// round-trip and loses those bytes, as with Hugging Face's tokenizer).
    pub fn encodes_byte(&self, b: u8) -> bool {
        self.byte_class[usize::from(b)].is_some()
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
    kind: Kind,
    bos_id: Option<u32>,
    eos_id: u32,
    /// EOS and the metadata's end-of-turn and end-of-message ids.
    stop_ids: Vec<u32>,
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
        let merges: Vec<String> = vec![
            "h e".into(),
            "l l".into(),
            "he ll".into(),
            "Ġ w".into(),
            "a a".into(),
        ];
        tokens.extend(["he", "ll", "hell", "Ġw", "aa"].map(String::from));
        let mut types = vec![TOKEN_TYPE_CONTROL; 2];
        types.resize(tokens.len(), 1);
        Tokenizer::new(TokenizerParts {
            tokens,
            types,
            kind: Kind::Bpe {
                merges,
                pre: "smollm".into(),
            },
            bos_id: None,
            eos_id: 1,
            stop_ids: vec![1],
            add_bos: false,
        })
        .expect("tiny vocabulary is well formed")
    }

    #[test]
    fn merges_apply_by_rank_and_round_trip() {
        let t = tiny();
        let ids = t.encode("hello world", false).unwrap();
        let hell = 2 + 256 + 2;
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

    #[test]
    fn the_lower_bound_never_exceeds_the_encoding() {
        let t = tiny();
        // Classes mixed: the summed bound is the one that binds.
        let mixed = "hell1 ,\u{e9}x".repeat(50);
        for text in [
            "hello world",
            "aaaaaaaaaaaaaaaaaaaaa",
            "a<|im_end|>b 123 \n\n  x",
            "ünïcödé and 𝄞",
            "",
            mixed.as_str(),
        ] {
            for special in [false, true] {
                let n = t.encode(text, special).unwrap().len();
                assert!(t.min_tokens(text, special) <= n, "{text:?}: bound over {n}");
            }
        }
    }

    #[test]
    fn a_text_provably_over_the_limit_is_refused_unencoded() {
        let t = tiny();
        // "hell" is the longest ordinary letter token: 1000 letters need at least 250
        // tokens; parsed, "<|endoftext|>" covers 9 letters.
        let word = "a".repeat(1000);
        assert_eq!(t.min_tokens(&word, false), 250);
        assert_eq!(t.min_tokens(&word, true), 112);
        assert!(matches!(
            t.encode_bounded(&word, false, 249),
            Err(TokenizerError::TooLong {
                at_least: 250,
                limit: 249
            })
        ));
        assert_eq!(t.encode_bounded(&word, false, 500).unwrap().len(), 500);
    }
}
