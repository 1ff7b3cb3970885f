//! Structured outputs with llguidance. `prepare` indexes the model's vocabulary once
//! per instance (a token trie, and llguidance's slices of it); `start` compiles a
//! request's format into a grammar and a matcher; `next` answers with the tokens the
//! grammar forces, or the mask of the tokens it allows; `taken` advances the matcher.
//!
//! JSON is compact with one space after `:` and `,` (`{"a": 1, "b": 2}`), as Python's
//! `json.dumps` writes it: a fixed layout makes the keys and punctuation forced tokens,
//! which the host appends without sampling, and leaves a small model no whitespace to
//! loop in. A schema's own `x-guidance` options take precedence.

use std::cell::RefCell;
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use lynx_plugin_sdk::{host, LogLevel, NextToken, OutputFormat, Rejection};
use serde_json::{json, Value};
use toktrie::{TokRxInfo, TokTrie, TokenId, TokenizerEnv};

thread_local! {
    // One component instance has one thread: these are the instance's.
    static FACTORY: RefCell<Option<Arc<ParserFactory>>> = const { RefCell::new(None) };
    static MATCHER: RefCell<Option<Matcher>> = const { RefCell::new(None) };
}

/// The model's vocabulary as llguidance sees it: the trie of every token's bytes
/// (control tokens marked, so no text ever matches them), and the model's own
/// tokenizer, through the host, for the forced text: its tokens are what the model
/// would have produced.
struct HostTokEnv {
    trie: TokTrie,
}

impl TokenizerEnv for HostTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(s) {
            Ok(text) => host::encode(text, false),
            // Part of a character: only the trie can cut it into tokens.
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

fn build_factory() -> Result<ParserFactory, String> {
    let vocab = host::vocabulary();
    let n = vocab.ends.len();
    let mut special = vec![false; n];
    for &t in &vocab.special {
        if let Some(s) = special.get_mut(t as usize) {
            *s = true;
        }
    }
    let mut words = Vec::with_capacity(n);
    let mut start = 0usize;
    for (t, &end) in vocab.ends.iter().enumerate() {
        let end = end as usize;
        let bytes = vocab.bytes.get(start..end).unwrap_or_default();
        start = end.max(start);
        let mut word = Vec::with_capacity(bytes.len() + 1);
        if special[t] {
            word.push(TokTrie::SPECIAL_TOKEN_MARKER);
        }
        word.extend_from_slice(bytes);
        words.push(word);
    }
    let eos = *vocab
        .end_tokens
        .first()
        .ok_or("the model has no end-of-sequence token")?;
    let mut info = TokRxInfo::new(n as u32, eos);
    info.tok_end_of_turn = vocab.end_tokens.get(1).copied();
    let trie = TokTrie::from(&info, &words);
    let env: toktrie::TokEnv = Arc::new(HostTokEnv { trie });
    let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
    factory.quiet();
    Ok(factory)
}

/// The instance's parser factory, built on first use.
fn factory() -> Result<Arc<ParserFactory>, String> {
    FACTORY.with_borrow_mut(|f| {
        if let Some(f) = f {
            return Ok(f.clone());
        }
        let built = Arc::new(build_factory()?);
        *f = Some(built.clone());
        Ok(built)
    })
}

pub fn prepare() {
    if let Err(e) = factory() {
        host::log(
            LogLevel::Error,
            &format!("structured outputs unavailable: {e}"),
        );
    }
}

fn rejection(code: &str, message: String) -> Rejection {
    // The host caps a rejection's message: keep the start, where the reason is.
    let message: String = message.chars().take(900).collect();
    Rejection {
        code: code.into(),
        message,
    }
}

/// The JSON layout this plugin writes, unless the schema sets its own.
fn with_layout(mut schema: Value) -> Value {
    if let Value::Object(map) = &mut schema {
        map.entry("x-guidance").or_insert_with(
            || json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
        );
    }
    schema
}

fn grammar(format: OutputFormat) -> Result<TopLevelGrammar, Rejection> {
    Ok(match format {
        OutputFormat::JsonObject => {
            TopLevelGrammar::from_json_schema(with_layout(json!({"type": "object"})))
        }
        OutputFormat::JsonSchema(s) => {
            let schema: Value = serde_json::from_str(&s.schema).map_err(|e| {
                rejection(
                    "invalid_schema",
                    format!("The JSON schema is not JSON: {e}"),
                )
            })?;
            let schema = match schema {
                Value::Bool(true) => json!({}),
                Value::Bool(false) => {
                    return Err(rejection(
                        "invalid_schema",
                        "The JSON schema `false` admits no output.".into(),
                    ))
                }
                other => other,
            };
            TopLevelGrammar::from_json_schema(with_layout(schema))
        }
        OutputFormat::Regex(rx) => TopLevelGrammar::from_regex(&rx),
        OutputFormat::Choice(choices) => {
            let alternatives: Vec<String> =
                choices.iter().map(|c| regex_syntax::escape(c)).collect();
            TopLevelGrammar::from_regex(&alternatives.join("|"))
        }
    })
}

pub fn start(format: OutputFormat) -> Result<(), Rejection> {
    MATCHER.with_borrow_mut(|m| *m = None);
    let factory = factory().map_err(|e| rejection("response_format_unavailable", e))?;
    let code = match &format {
        OutputFormat::Regex(_) => "invalid_regex",
        OutputFormat::Choice(_) => "invalid_choice",
        _ => "invalid_schema",
    };
    let grammar = grammar(format)?;
    let parser = factory
        .create_parser(grammar)
        .map_err(|e| rejection(code, format!("The format cannot be compiled: {e}")))?;
    let matcher = Matcher::new(Ok(parser));
    if let Some(e) = matcher.get_error() {
        return Err(rejection(
            code,
            format!("The format cannot be compiled: {e}"),
        ));
    }
    MATCHER.with_borrow_mut(|m| *m = Some(matcher));
    Ok(())
}

pub fn next() -> NextToken {
    MATCHER.with_borrow_mut(|m| {
        let Some(m) = m else {
            return NextToken::Any;
        };
        if m.is_stopped() {
            return NextToken::Stop;
        }
        let forced = m.compute_ff_tokens();
        if !forced.is_empty() {
            return NextToken::Forced(forced);
        }
        match m.compute_mask() {
            Ok(mask) => NextToken::Allowed(mask.as_slice().to_vec()),
            Err(e) => {
                host::log(LogLevel::Warn, &format!("no mask: {e}"));
                // An empty mask fails the request with the host's message.
                NextToken::Allowed(Vec::new())
            }
        }
    })
}

pub fn taken(tokens: &[u32]) -> Result<(), String> {
    MATCHER.with_borrow_mut(|m| match m {
        Some(m) => m.consume_tokens(tokens).map_err(|e| e.to_string()),
        None => Ok(()),
    })
}
