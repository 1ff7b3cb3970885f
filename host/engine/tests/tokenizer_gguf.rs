//! The tokenizer built from the real SmolLM2 GGUF, against encodings made by Hugging
//! Face's `tokenizers` from the same vocabulary and merges
//! (`tests/data/tokenizer_reference.jsonl`), and round trips.

#![allow(clippy::expect_used)] // test helpers: a failure here is a test failure

use std::path::PathBuf;

use candle_core::quantized::gguf_file;
use lynx_engine::files::{model_path_from_env, DEFAULT_MODEL_FILE};
use lynx_engine::tokenizer::Tokenizer;
use lynx_plugin_core::stream::TextStream;

fn model_path() -> PathBuf {
    let path = model_path_from_env();
    assert!(
        path.exists(),
        "the default model {DEFAULT_MODEL_FILE} is missing at {}: run scripts/fetch-model.sh",
        path.display()
    );
    path
}

fn tokenizer() -> Tokenizer {
    let mut file = std::fs::File::open(model_path()).expect("open model");
    let content = gguf_file::Content::read(&mut file).expect("read gguf");
    Tokenizer::from_gguf(&content).expect("tokenizer from gguf")
}

#[test]
fn matches_reference_encodings() {
    let t = tokenizer();
    let reference = include_str!("data/tokenizer_reference.jsonl");
    let mut cases = 0;
    for line in reference.lines() {
        let case: serde_json::Value = serde_json::from_str(line).expect("reference line");
        let text = case["text"].as_str().expect("text");
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).expect("ids");
        assert_eq!(
            t.encode(text, true).expect("encode"),
            want,
            "encoding {text:?}"
        );
        cases += 1;
    }
    assert!(cases >= 8);
    assert_eq!(
        t.encode("Once upon a time", true).unwrap(),
        [6403, 1980, 253, 655]
    );
}

#[test]
fn round_trips_text_exactly() {
    let t = tokenizer();
    for text in [
        "Once upon a time",
        "digits 0123456789 and 3.14159 and ١٢٣",
        "whitespace  runs\t\t\n\n\n   and trailing   ",
        "unicode: héllo wörld — 日本語 🦀 👩‍👩‍👧 \u{0301}e",
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "",
    ] {
        let ids = t.encode(text, true).unwrap();
        assert_eq!(t.decode(&ids, false).unwrap(), text);
        // Streaming the same ids one at a time through the plugins' post-processing
        // gives the same text.
        let mut stream = TextStream::new(Vec::new());
        let mut streamed: String = ids
            .iter()
            .map(|&id| stream.push(t.piece(id).unwrap()).text)
            .collect();
        streamed.push_str(&stream.finish());
        assert_eq!(streamed, text);
    }
}

#[test]
fn special_tokens_are_literal_text_when_not_parsed() {
    let t = tokenizer();
    let ids = t.encode("<|im_end|>", false).unwrap();
    assert!(ids.len() > 1 && !ids.contains(&2));
    assert_eq!(t.decode(&ids, false).unwrap(), "<|im_end|>");
    assert_eq!(t.encode("<|im_end|>", true).unwrap(), [2]);
    assert!(t.is_end(2) && t.is_end(0));
}
