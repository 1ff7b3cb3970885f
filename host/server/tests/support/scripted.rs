//! A scripted backend and the server around it, for in-process tests of the HTTP layer:
//! the real router, handlers, plugin host and default plugin, with generation replaced
//! by a script that answers each prompt by what it says. No model is loaded; the
//! tokenizer is a byte-level one built here (each byte one token, plus ChatML's control
//! tokens), so the texts a test expects are easy to spell.
//!
//! The script, by the prompt's text (decoded from the ids the backend receives):
//! - `[overloaded]`: the submission is refused as when the queue is full;
//! - `[fail]`: three tokens, then the engine fails the request;
//! - `[hang]`: two tokens, then nothing until the client goes (recorded in `cancelled`);
//! - anything else: the reply [`reply`] gives, one token per byte, ending `length` at
//!   `max_tokens`, else `stop`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};
use clap::Parser;
use lynx_engine::kv_cache::KvDtype;
use lynx_engine::logprobs::Logprob;
use lynx_engine::scheduler::SchedulerStats;
use lynx_engine::tokenizer::Tokenizer;
use lynx_engine::{EngineError, FinishReason, GenEvent, GenerateRequest, SchedulerConfig};
use lynx_plugin_host::types::ModelInfo;
use lynx_server::backend::Backend;
use lynx_server::config::Cli;
use lynx_server::server::Server;

pub const IM_END: u32 = 257;
pub const CONTEXT: usize = 512;

/// What the scripted model answers (choice `index` of `n`).
pub fn reply(index: usize) -> String {
    if index == 0 {
        "Hello, world!".to_string()
    } else {
        format!("Choice {index} speaks.")
    }
}

/// A byte-level vocabulary: ids 0..256 are the bytes, then ChatML's control tokens.
pub fn tokenizer() -> Tokenizer {
    let mut tokens: Vec<Value> = lynx_engine::tokenizer::byte_to_char()
        .into_iter()
        .map(|c| Value::String(c.to_string()))
        .collect();
    let mut types = vec![Value::I32(1); 256];
    for special in ["<|im_start|>", "<|im_end|>", "<|endoftext|>"] {
        tokens.push(Value::String(special.into()));
        types.push(Value::I32(3));
    }
    let metadata = HashMap::from([
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".to_string(), Value::Array(types)),
        ("tokenizer.ggml.merges".to_string(), Value::Array(vec![])),
        (
            "tokenizer.ggml.eos_token_id".to_string(),
            Value::U32(IM_END),
        ),
    ]);
    let content = Content {
        magic: VersionedMagic::GgufV3,
        metadata,
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    };
    Tokenizer::from_gguf(&content).unwrap()
}

pub const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// What the backend was asked, for the tests to read back.
#[derive(Debug, Clone)]
pub struct Submitted {
    pub prompt: String,
    pub max_tokens: usize,
    pub choice: Option<(u64, usize)>,
    pub logprobs: Option<usize>,
}

pub struct Scripted {
    tokenizer: Arc<Tokenizer>,
    stats: SchedulerStats,
    pub submitted: Mutex<Vec<Submitted>>,
    /// Prompts whose client went away before their script ended.
    pub cancelled: Mutex<Vec<String>>,
}

impl Scripted {
    fn text(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, false).unwrap()
    }

    fn script(self: &Arc<Self>, req: GenerateRequest, prompt: String) {
        let me = self.clone();
        tokio::spawn(async move {
            let events = req.events;
            let _ = events.send(GenEvent::Started { cached: 0 });
            if req.echo {
                let values = req.prompt[1..].iter().map(|&t| logprob(t, req.logprobs));
                let _ = events.send(GenEvent::Prompt(values.collect()));
            }
            let index = req.choice.map_or(0, |(_, i)| i);
            let (text, end) = if prompt.contains("[fail]") {
                ("abc".to_string(), None)
            } else if prompt.contains("[hang]") {
                ("ab".to_string(), None)
            } else {
                (reply(index), Some(()))
            };
            let bytes = text.into_bytes();
            let n = bytes.len().min(req.max_tokens);
            for &b in &bytes[..n] {
                let token = u32::from(b);
                let lp = req.logprobs.map(|k| logprob(token, Some(k)));
                if events.send(GenEvent::Token(token, lp)).is_err() {
                    me.cancelled.lock().unwrap().push(prompt);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if prompt.contains("[fail]") {
                let _ = events.send(GenEvent::Failed(EngineError::Model("scripted".into())));
            } else if prompt.contains("[hang]") {
                events.closed().await;
                me.cancelled.lock().unwrap().push(prompt);
            } else if end.is_some() {
                let reason = if n < bytes.len() {
                    FinishReason::Length
                } else {
                    FinishReason::Stop
                };
                let _ = events.send(GenEvent::Finished(reason));
            }
        });
    }
}

/// A log-probability the tests can predict: the token at -0.5, then `top` others.
pub fn logprob(token: u32, top: Option<usize>) -> Logprob {
    Logprob {
        token,
        logprob: -0.5,
        top: (0..top.unwrap_or(0) as u32)
            .map(|k| ((token + k) % 256, -0.5 - k as f32))
            .collect(),
    }
}

/// Shares `Scripted` with the server while the tests keep a handle.
struct Shared(Arc<Scripted>);

impl Backend for Shared {
    fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.0.tokenizer
    }

    fn submit_all(&self, requests: Vec<GenerateRequest>) -> Result<(), EngineError> {
        let prompts: Vec<String> = requests.iter().map(|r| self.0.text(&r.prompt)).collect();
        if prompts.iter().any(|p| p.contains("[overloaded]")) {
            return Err(EngineError::Overloaded(3));
        }
        for (req, prompt) in requests.into_iter().zip(prompts) {
            self.0.submitted.lock().unwrap().push(Submitted {
                prompt: prompt.clone(),
                max_tokens: req.max_tokens,
                choice: req.choice,
                logprobs: req.logprobs,
            });
            self.0.script(req, prompt);
        }
        Ok(())
    }

    fn config(&self) -> SchedulerConfig {
        SchedulerConfig {
            kv_slots: 4,
            max_queue: 8,
            max_seq_len: CONTEXT,
            kv_dtype: KvDtype::F16,
            prefix_cache: true,
        }
    }

    fn stats(&self) -> &SchedulerStats {
        &self.0.stats
    }

    fn cancel_all(&self) {}

    fn is_running(&self) -> bool {
        true
    }
}

/// The one server the tests of a binary share (plugin engines are costly to start).
pub struct Running {
    pub addr: SocketAddr,
    pub backend: Arc<Scripted>,
}

pub fn server() -> &'static Running {
    static SERVER: OnceLock<Running> = OnceLock::new();
    SERVER.get_or_init(|| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let plugins = root.join("plugins/dist");
        assert!(
            plugins.join("default.wasm").exists(),
            "{} is missing: run scripts/build-plugins.sh (scripts/test.sh does)",
            plugins.join("default.wasm").display()
        );
        let cache = std::env::temp_dir().join(format!("lynx-http-layer-{}", std::process::id()));
        let cli = Cli::try_parse_from([
            "lynx-host".as_ref(),
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--admin-listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--plugins-dir".as_ref(),
            plugins.as_os_str(),
            "--plugin-cache-dir".as_ref(),
            cache.as_os_str(),
            "--max-tokens".as_ref(),
            "64".as_ref(),
        ])
        .unwrap();
        let backend = Arc::new(Scripted {
            tokenizer: Arc::new(tokenizer()),
            stats: SchedulerStats::default(),
            submitted: Mutex::default(),
            cancelled: Mutex::default(),
        });
        let info = ModelInfo {
            architecture: "llama".into(),
            chat_template: Some(CHATML.into()),
            bos_token: None,
            eos_token: Some("<|im_end|>".into()),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let shared = Shared(backend.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async move {
                let server = Server::with_backend(cli.config, Arc::new(shared), info)
                    .await
                    .unwrap();
                tx.send(server.local_addr().unwrap()).unwrap();
                server.run(std::future::pending()).await.unwrap();
            });
        });
        let addr = rx.recv_timeout(Duration::from_secs(120)).unwrap();
        Running { addr, backend }
    })
}

impl Running {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// What the backend was asked for the prompt containing `marker`.
    pub fn submitted(&self, marker: &str) -> Vec<Submitted> {
        let all = self.backend.submitted.lock().unwrap();
        all.iter()
            .filter(|s| s.prompt.contains(marker))
            .cloned()
            .collect()
    }
}
