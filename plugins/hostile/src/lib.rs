//! A hostile plugin for the test suite. It behaves as the default plugin unless the
//! request holds a trigger word:
//! - `TRAP` in the prompt: panics (a trap) in the policy;
//! - `SPIN`: loops forever in the policy;
//! - `HOG`: allocates memory without bound in the policy;
//! - `SNOOP`: tries to read `/etc/passwd` and the environment, and refuses the request
//!   (code `snooped`) saying what it got;
//! - `LATE`: traps in post-processing, on the third generated token;
//! - `LIAR`: reports nonsense events (a wrong prompt length, every token three times,
//!   a first token on every token);
//! - `FLOOD`: releases 64 MiB of text for every generated token;
//! - `CRAWL`: spins about 0.3 s in every `push` (under a generous per-call deadline,
//!   so only the per-request budget can stop it);
//! - `CHATTY`: writes 10,000 log lines holding control characters;
//! - `HEAVY`: asks the host to encode 300 KB of whitespace again and again, so the
//!   time goes to host code, not its own;
//! - `SLEEP`: sleeps (`std::thread::sleep`, a blocking WASI poll) for 30 s in `push`;
//! - `WIDE`: releases 64 KiB of text (the most one `push` may) for every token;
//! - `/TRAP` in the path: traps in route normalization.
//!
//! Its constraint serves `guided_regex` requests whose regex is a trigger word, and
//! misbehaves from the third `next` on: `TRAP` traps, `SPIN` loops forever, `JUNK`
//! forces a token outside the vocabulary, `NOTHING` allows no token, `SLEEP` sleeps
//! 30 s; `SLOW` takes 100 ms over every `next` from the first (under the call deadline,
//! so only a per-request budget stops it); any other regex lets every token through.
//! Other formats it declines.

use std::cell::Cell;

use lynx_plugin_sdk::{
    defaults, events, host, LogLevel, NextToken, OutputFormat, Plugin, PolicyRequest, Prompt,
    Rejection, Released,
};

thread_local! {
    static TRAP_AT_TOKEN: Cell<Option<u32>> = const { Cell::new(None) };
    static LIAR: Cell<bool> = const { Cell::new(false) };
    static FLOOD: Cell<bool> = const { Cell::new(false) };
    static CRAWL: Cell<bool> = const { Cell::new(false) };
    static SLEEP: Cell<bool> = const { Cell::new(false) };
    static WIDE: Cell<bool> = const { Cell::new(false) };
    static TOKENS: Cell<u32> = const { Cell::new(0) };
    static CONSTRAINT: Cell<u8> = const { Cell::new(0) };
    static NEXT_CALLS: Cell<u32> = const { Cell::new(0) };
}

fn prompt_text(prompt: &Prompt) -> String {
    match prompt {
        Prompt::Text(t) => t.clone(),
        Prompt::Chat(messages) => messages.iter().map(|m| m.content.as_str()).collect(),
        Prompt::Tokens(_) => String::new(),
    }
}

struct HostilePlugin;

impl Plugin for HostilePlugin {
    fn normalize(method: &str, path: &str) -> String {
        if path.contains("/TRAP") {
            panic!("hostile plugin: trap in routing");
        }
        defaults::normalize(method, path)
    }

    fn tokenize(request: PolicyRequest) -> Result<Vec<u32>, Rejection> {
        let text = prompt_text(&request.prompt);
        if text.contains("TRAP") {
            panic!("hostile plugin: trap on request");
        }
        if text.contains("SPIN") {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        if text.contains("HOG") {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        if text.contains("SNOOP") {
            let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
            let home = std::env::var("HOME").unwrap_or_default();
            host::log(
                LogLevel::Warn,
                &format!("snooped {} bytes of /etc/passwd, HOME={home}", passwd.len()),
            );
            return Err(Rejection {
                code: "snooped".to_string(),
                message: format!("read {} bytes and HOME={home:?}", passwd.len()),
            });
        }
        if text.contains("LATE") {
            TRAP_AT_TOKEN.set(Some(3));
        }
        if text.contains("CHATTY") {
            for i in 0..10_000 {
                host::log(
                    LogLevel::Info,
                    &format!("chatty {i}\nforged line\u{1b}[31m"),
                );
            }
        }
        if text.contains("HEAVY") {
            let spaces = " ".repeat(300_000);
            let mut total = 0usize;
            loop {
                total = std::hint::black_box(total + host::encode(&spaces, false).len());
            }
        }
        FLOOD.set(text.contains("FLOOD"));
        CRAWL.set(text.contains("CRAWL"));
        SLEEP.set(text.contains("SLEEP"));
        WIDE.set(text.contains("WIDE"));
        if text.contains("LIAR") {
            LIAR.set(true);
            events::prompt_tokens(12345);
        }
        defaults::tokenize(request)
    }

    fn constrain(format: OutputFormat) -> Result<(), Rejection> {
        let OutputFormat::Regex(word) = &format else {
            return defaults::constrain(format);
        };
        let mode = match word.as_str() {
            "TRAP" => 1,
            "SPIN" => 2,
            "JUNK" => 3,
            "NOTHING" => 4,
            "SLEEP" => 5,
            "SLOW" => 6,
            _ => 0,
        };
        CONSTRAINT.set(mode);
        NEXT_CALLS.set(0);
        Ok(())
    }

    fn next_token() -> NextToken {
        NEXT_CALLS.set(NEXT_CALLS.get() + 1);
        if CONSTRAINT.get() == 6 {
            std::thread::sleep(std::time::Duration::from_millis(100));
            return NextToken::Any;
        }
        if NEXT_CALLS.get() < 3 {
            return NextToken::Any;
        }
        match CONSTRAINT.get() {
            1 => panic!("hostile plugin: trap in the constraint"),
            2 => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            3 => NextToken::Forced(vec![u32::MAX]),
            4 => NextToken::Allowed(Vec::new()),
            5 => {
                std::thread::sleep(std::time::Duration::from_secs(30));
                NextToken::Any
            }
            _ => NextToken::Any,
        }
    }

    fn push(token: u32) -> Released {
        let n = TOKENS.get() + 1;
        TOKENS.set(n);
        if TRAP_AT_TOKEN.get() == Some(n) {
            panic!("hostile plugin: trap mid-stream");
        }
        if SLEEP.get() {
            std::thread::sleep(std::time::Duration::from_secs(30));
        }
        if WIDE.get() {
            let _ = defaults::push(token);
            return Released {
                text: "w".repeat(64 << 10),
                stop: false,
            };
        }
        if FLOOD.get() {
            return Released {
                text: "x".repeat(64 << 20),
                stop: false,
            };
        }
        if CRAWL.get() {
            let mut n: u64 = 0;
            for i in 0..300_000_000u64 {
                n = std::hint::black_box(n.wrapping_add(i));
            }
            std::hint::black_box(n);
        }
        if LIAR.get() {
            events::first_token();
            events::completion_token();
            events::completion_token();
        }
        defaults::push(token)
    }
}

lynx_plugin_sdk::plugin!(HostilePlugin);
