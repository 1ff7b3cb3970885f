//! Property tests over what a client controls: the request parser (bytes and
//! JSON shapes) never panics and always answers a 4xx-shaped error or a request, and
//! the tokenizer built from the real GGUF never panics and round-trips any text.

#![allow(clippy::expect_used)] // test set-up: a failure here is a test failure

use std::sync::OnceLock;

use candle_core::quantized::gguf_file;
use clap::Parser;
use lynx_engine::tokenizer::Tokenizer;
use lynx_server::config::Cli;
use lynx_server::http::requests::{
    fields, parse_body, ChatRequest, CommonParams, CompletionRequest,
};
use proptest::prelude::*;
use serde_json::{Map, Value};

fn tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let path = Cli::parse_from(["lynx-host"]).config.model_path();
        let mut file = std::fs::File::open(&path).unwrap_or_else(|e| {
            panic!(
                "the default model at {}: {e} (run scripts/setup.sh)",
                path.display()
            )
        });
        let content = gguf_file::Content::read(&mut file).expect("read gguf");
        Tokenizer::from_gguf(&content).expect("tokenizer from gguf")
    })
}

/// Everything the two endpoints do with a body before the plugin sees it. Returns the
/// status of the error, if any: it must be a client error.
fn parse_request(body: &[u8]) -> Option<u16> {
    let limits = Cli::parse_from(["lynx-host"]).config.limits();
    let run = || -> Result<(), lynx_server::http::error::ApiError> {
        let value = parse_body(body)?;
        let completion = fields::<CompletionRequest>(&value);
        let chat = fields::<ChatRequest>(&value);
        let scoring = match (&completion, &chat) {
            (Ok(c), _) => c.scoring()?,
            (_, Ok(c)) => c.scoring()?,
            _ => Default::default(),
        };
        fields::<CommonParams>(&value)?.validate("smollm2-135m-instruct", &limits, scoring)?;
        if let Ok(chat) = chat {
            chat.chat_messages(limits.max_chat_messages)?;
        }
        completion.map(|_| ())
    };
    run().err().map(|e| e.status().as_u16())
}

/// JSON objects built from the fields the API reads, with values of any type.
fn request_like() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        any::<u32>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
        Just(Value::String("lynx-fault:handler".into())),
    ];
    let value = leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    });
    prop::collection::vec((key(), value), 0..8)
        .prop_map(|kv| Value::Object(kv.into_iter().collect()))
}

/// Text of any code points up to U+3FFFF, all of whose bytes the vocabulary holds.
fn text_below_plane_4() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::char::range('\0', '\u{3FFFF}'), 0..20)
        .prop_map(|cs| cs.into_iter().collect())
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "prompt",
            "messages",
            "role",
            "content",
            "type",
            "text",
            "model",
            "max_tokens",
            "max_completion_tokens",
            "temperature",
            "top_p",
            "seed",
            "stop",
            "stream",
            "stream_options",
            "include_usage",
            "n",
            "logprobs",
            "top_logprobs",
            "echo",
            "logit_bias",
            "presence_penalty",
            "top_k",
            "min_p",
            "min_tokens",
        ])
        .prop_map(str::to_string),
        "[a-z_]{1,8}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_bytes_never_panic_the_parser(body in prop::collection::vec(any::<u8>(), 0..300)) {
        if let Some(status) = parse_request(&body) {
            prop_assert!((400..500).contains(&status), "status {status}");
        }
    }

    #[test]
    fn arbitrary_request_shapes_get_a_request_or_a_client_error(v in request_like()) {
        let body = serde_json::to_vec(&v).expect("serialize");
        if let Some(status) = parse_request(&body) {
            prop_assert!((400..500).contains(&status), "status {status} for {v}");
        }
    }

    #[test]
    fn arbitrary_strings_never_panic_the_tokenizer(text in any::<String>()) {
        let t = tokenizer();
        let _ = t.encode(&text, true);
        let _ = t.encode(&text, false);
    }

    #[test]
    fn arbitrary_ids_never_panic_decoding(ids in prop::collection::vec(any::<u32>(), 0..64)) {
        let _ = tokenizer().decode(&ids, false);
        let _ = tokenizer().decode(&ids, true);
    }

    #[test]
    fn encode_then_decode_round_trips_any_utf8(text in any::<String>()) {
        let t = tokenizer();
        prop_assume!(text.bytes().all(|b| t.encodes_byte(b)));
        let ids = t.encode(&text, false).expect("valid UTF-8 always encodes");
        prop_assert_eq!(t.decode(&ids, false).expect("decode"), text);
    }

    #[test]
    fn round_trips_text_with_special_token_strings(a in text_below_plane_4(), b in text_below_plane_4()) {
        let t = tokenizer();
        let text = format!("{a}<|im_start|>{b}<|im_end|>");
        prop_assume!(text.bytes().all(|b| t.encodes_byte(b)));
        let ids = t.encode(&text, true).expect("encode");
        prop_assert_eq!(t.decode(&ids, false).expect("decode"), text);
    }
}
/// The bytes the vocabulary lacks are only ones no common text uses: lead bytes of
/// code points past U+3FFFF (unassigned planes, private use) and bytes never valid in
/// UTF-8. Every other code point round-trips (the property tests above).
#[test]
fn the_missing_bytes_are_only_rare_or_invalid_utf8_bytes() {
    let t = tokenizer();
    let missing: Vec<u8> = (0..=255u8).filter(|&b| !t.encodes_byte(b)).collect();
    assert!(
        missing
            .iter()
            .all(|&b| b >= 0xF1 || b == 0xC0 || b == 0xC1 || b < 0x20),
        "missing bytes: {missing:02x?}"
    );
    for c in ['\u{0}', 'é', '日', '🦀', '\u{3FFFF}', '\u{E0100}'] {
        let text = c.to_string();
        if text.bytes().all(|b| t.encodes_byte(b)) {
            let ids = t.encode(&text, false).expect("encode");
            assert_eq!(t.decode(&ids, false).expect("decode"), text);
        }
    }
}
