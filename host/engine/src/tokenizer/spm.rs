//! SentencePiece vocabularies (`tokenizer.ggml.model = llama`: Llama 2, Gemma, Phi-3)
//! as a `tokenizers` BPE with byte fallback, the way Hugging Face converts them: spaces
//! become `▁` (with one in front of the text when the model adds a space prefix), and
//! the merges are read off the vocabulary: every way to split a piece into two pieces
//! of the vocabulary is a merge, ranked by the piece's score, so the highest-scoring
//! pair merges first, as SentencePiece and llama.cpp merge.

use std::collections::HashMap;

use tokenizers::normalizers::{Prepend, Replace, Sequence};
use tokenizers::NormalizerWrapper;

use super::TokenizerError;

/// SentencePiece's stand-in for a space.
pub(super) const SPACE: char = '▁';

/// The merges of a vocabulary whose pieces carry scores, best first. Among equal
/// scores, pieces keep vocabulary order and a piece's splits go by their parts' ids,
/// as Hugging Face's `SentencePieceExtractor` orders them.
pub(super) fn merges(
    tokens: &[String],
    scores: &[f32],
    mergeable: impl Fn(usize) -> bool,
) -> Vec<(String, String)> {
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .rev()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut found: Vec<(f32, usize, usize, usize, usize)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if !mergeable(id) {
            continue;
        }
        for (cut, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(cut);
            if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                found.push((scores.get(id).copied().unwrap_or(0.0), id, li, ri, cut));
            }
        }
    }
    found.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    found
        .into_iter()
        .map(|(_, id, _, _, cut)| {
            let (l, r) = tokens[id].split_at(cut);
            (l.to_string(), r.to_string())
        })
        .collect()
}

/// Spaces to `▁`, after a leading one when the model adds a space prefix.
pub(super) fn normalizer(add_space_prefix: bool) -> Result<NormalizerWrapper, TokenizerError> {
    let replace = Replace::new(" ", SPACE.to_string())
        .map_err(|e| TokenizerError::Metadata(format!("normalizer: {e}")))?;
    let mut parts: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        parts.push(Prepend::new(SPACE.to_string()).into());
    }
    parts.push(replace.into());
    Ok(Sequence::new(parts).into())
}

/// The byte a byte-fallback piece (`<0x41>`) stands for.
pub(super) fn byte_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}
