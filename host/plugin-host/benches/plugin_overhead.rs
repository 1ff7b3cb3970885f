//! What running pre/post-processing in a wasm sandbox costs: the default plugin against
//! the same work done natively (`lynx-plugin-core`, the code the plugin is built from),
//! side by side, on the real SmolLM2 tokenizer.
//!
//! - `request/*`: one request's fixed work: a fresh sandbox (wasm only), route
//!   normalization, the chat-template policy (ChatML) on a three-message chat, and post-processing
//!   start and finish.
//! - `token/*`: post-processing of 128 generated tokens (UTF-8 assembly, two stop
//!   sequences held back), reported per token.
//!
//! `cargo bench -p lynx-plugin-host --bench plugin_overhead` (needs the model and
//! `scripts/build-plugins.sh`).

#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark's set-up may panic

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use candle_core::quantized::gguf_file;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use lynx_engine::tokenizer::Tokenizer;
use lynx_plugin_core::chat::{prompt_budget, Message};
use lynx_plugin_core::routes;
use lynx_plugin_core::stream::TextStream;
use lynx_plugin_core::template::{self, Specials};
use lynx_plugin_host::cache::ComponentCache;
use lynx_plugin_host::types::{ChatMessage, ModelInfo, PolicyRequest, PostConfig, Prompt};
use lynx_plugin_host::{PluginLimits, PluginRuntime};

const CONTEXT: u32 = 4096;
const TOKENS: usize = 128;

fn tokenizer() -> Arc<Tokenizer> {
    let path = lynx_engine::files::model_path_from_env();
    let mut file = std::fs::File::open(&path).expect("the default model (scripts/fetch-model.sh)");
    let content = gguf_file::Content::read(&mut file).expect("gguf");
    Arc::new(Tokenizer::from_gguf(&content).expect("tokenizer"))
}

fn chat() -> Vec<(String, String)> {
    vec![
        ("system".into(), "You are a concise assistant.".into()),
        ("user".into(), "What is the capital of France?".into()),
        (
            "user".into(),
            "And tell me one fact about its history, in a sentence.".into(),
        ),
    ]
}

fn stops() -> Vec<String> {
    vec!["\n\nUser:".into(), "<|im_end|>".into()]
}

/// Realistic generated tokens: an answer's worth of text, encoded.
fn generated(tokenizer: &Tokenizer) -> Vec<u32> {
    let text = "Paris is the capital of France. In 1789 the storming of the Bastille began \
        the French Revolution, which ended the monarchy — « liberté, égalité, fraternité » \
        became its motto. Today the city has about 2.1 million inhabitants 🇫🇷 and is known \
        for the Louvre, the Eiffel Tower and its cafés. ";
    let ids = tokenizer.encode(&text.repeat(4), false).unwrap();
    ids[..TOKENS].to_vec()
}

/// The chat template both sides render (SmolLM2's turns, without its default system
/// prompt).
const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

fn bench(c: &mut Criterion) {
    let tokenizer = tokenizer();
    let plugin_path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../plugins/dist/default.wasm");
    let runtime = PluginRuntime::new(
        tokenizer.clone(),
        CONTEXT,
        PluginLimits {
            call_timeout: Duration::from_millis(250),
            request_budget: Duration::from_secs(2),
            memory_bytes: 64 << 20,
            instances: 16,
            constraint_memory_bytes: 256 << 20,
            warm_constraints: 2,
            constraint_budget: Duration::from_secs(5),
            max_file_bytes: 32 << 20,
            rollback_window: 0,
            rollback_share: 0.2,
        },
        ComponentCache::in_memory(),
    )
    .expect("runtime")
    .with_model_info(ModelInfo {
        architecture: "llama".into(),
        chat_template: Some(CHATML.into()),
        bos_token: None,
        eos_token: None,
    });
    let plugin = runtime
        .load(&plugin_path)
        .expect("scripts/build-plugins.sh builds default.wasm");
    let wit_chat: Vec<ChatMessage> = chat()
        .into_iter()
        .map(|(role, content)| ChatMessage { role, content })
        .collect();
    let native_chat: Vec<Message> = chat()
        .into_iter()
        .map(|(role, content)| Message { role, content })
        .collect();
    let tokens = generated(&tokenizer);

    let mut group = c.benchmark_group("request");
    group.bench_function("native", |b| {
        b.iter(|| {
            let label = routes::normalize(black_box("/v1/chat/completions"));
            let encode = |t: &str, special: bool| tokenizer.encode(t, special).unwrap_or_default();
            let ids = template::encode(CHATML, &native_chat, &Specials::default(), None, &encode)
                .unwrap_or_default();
            black_box(prompt_budget(CONTEXT, Some(64)));
            let mut stream = TextStream::new(stops());
            let tail = stream.finish();
            black_box((label, ids, tail))
        })
    });
    group.bench_function("wasm", |b| {
        b.iter(|| {
            let mut session = runtime.session(&plugin).unwrap();
            let label = session
                .normalize("POST", black_box("/v1/chat/completions"))
                .unwrap();
            let ids = session
                .tokenize(&PolicyRequest {
                    prompt: Prompt::Chat(wit_chat.clone()),
                    context_length: CONTEXT,
                    max_tokens: Some(64),
                })
                .unwrap()
                .unwrap();
            session.start(&PostConfig { stops: stops() }).unwrap();
            let tail = session.finish().unwrap();
            black_box((label, ids, tail))
        })
    });
    group.finish();

    let mut group = c.benchmark_group("token");
    group.throughput(Throughput::Elements(TOKENS as u64));
    group.bench_function("native", |b| {
        b.iter_batched(
            || TextStream::new(stops()),
            |mut stream| {
                for &id in &tokens {
                    let bytes = tokenizer.piece(id).unwrap_or_default();
                    black_box(stream.push(bytes));
                }
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("wasm", |b| {
        b.iter_batched(
            || {
                let mut session = runtime.session(&plugin).unwrap();
                session.start(&PostConfig { stops: stops() }).unwrap();
                session
            },
            |mut session| {
                for &id in &tokens {
                    black_box(session.push(id).unwrap());
                }
                session
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
