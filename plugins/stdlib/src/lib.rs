//! A plugin written as ordinary Rust, for the WASI tests. Every request goes through
//! std's `HashMap` (a randomly seeded hasher), `Instant`, `SystemTime` and `println!`,
//! which need WASI's random, clocks and stdout; then it behaves as the default plugin.
//!
//! The prompt `lynx:probe ADDR` instead tries what the host denies (reading
//! `/etc/passwd`, the environment, a TCP connection to `ADDR`) and refuses the request
//! with the code `probe` and a message saying what each attempt got.

use std::collections::HashMap;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use lynx_plugin_sdk::{defaults, Plugin, PolicyRequest, Prompt, Rejection};

struct StdlibPlugin;

fn words(prompt: &Prompt) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    let mut add = |text: &str| {
        for word in text.split_whitespace() {
            *counts.entry(word.to_string()).or_insert(0) += 1;
        }
    };
    match prompt {
        Prompt::Text(t) => add(t),
        Prompt::Chat(messages) => messages.iter().for_each(|m| add(&m.content)),
        Prompt::Tokens(_) => {}
    }
    counts
}

fn probe(addr: &str) -> String {
    let fs = match std::fs::read("/etc/passwd") {
        Ok(bytes) => format!("DATA({} bytes)", bytes.len()),
        Err(e) => format!("error({e})"),
    };
    let env = match std::env::var("HOME") {
        Ok(v) => format!("DATA({v})"),
        Err(e) => format!("error({e})"),
    };
    let vars = std::env::vars().count();
    let args = std::env::args().count();
    let net = match std::net::TcpStream::connect(addr) {
        Ok(_) => "DATA(connected)".to_string(),
        Err(e) => format!("error({e})"),
    };
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let clock = if since_epoch > 1_700_000_000 {
        "ok"
    } else {
        "wrong"
    };
    format!("fs={fs} env={env} vars={vars} args={args} net={net} clock={clock}")
}

impl Plugin for StdlibPlugin {
    fn tokenize(request: PolicyRequest) -> Result<Vec<u32>, Rejection> {
        let started = Instant::now();
        if let Prompt::Text(t) = &request.prompt {
            if let Some(addr) = t.strip_prefix("lynx:probe ") {
                return Err(Rejection {
                    code: "probe".into(),
                    message: probe(addr.trim()),
                });
            }
        }
        let distinct = words(&request.prompt).len();
        let result = defaults::tokenize(request);
        println!(
            "stdlib plugin: {distinct} distinct words, policy took {} us",
            started.elapsed().as_micros()
        );
        eprintln!("stdlib plugin: stderr works too");
        result
    }
}

lynx_plugin_sdk::plugin!(StdlibPlugin);
