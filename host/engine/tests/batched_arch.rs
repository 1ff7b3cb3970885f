//! The other architectures against candle's reference models, alone and batched:
//! gemma3 on the real gemma-3-270m GGUF (scripts/fetch-model.sh gemma3), qwen2, qwen3
//! and llama 3 on GGUFs with random weights written here in their real shapes, with the
//! real tokenizer metadata of llama.cpp's Qwen2 and Llama 3 vocabularies
//! (scripts/fetch-conformance.sh), so the files also load as whole models.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failure is a test failure

#[path = "support/batched.rs"]
mod batched;

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use candle_transformers::models::{
    quantized_gemma3, quantized_llama, quantized_qwen2, quantized_qwen3,
};
use lynx_engine::arch::{self, Architecture, Entry, Logits};
use lynx_engine::gemma3::Gemma3;
use lynx_engine::{tokenizer::Tokenizer, Model};

fn cache() -> PathBuf {
    std::env::var_os("LYNX_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|x| PathBuf::from(x).join("lynx")))
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/lynx"))
}

fn existing(path: PathBuf, fetch: &str) -> PathBuf {
    assert!(path.is_file(), "{} is missing: run {fetch}", path.display());
    path
}

fn content(path: &Path) -> (gguf_file::Content, std::fs::File) {
    let mut file = std::fs::File::open(path).unwrap();
    (gguf_file::Content::read(&mut file).unwrap(), file)
}

const PROMPTS: [&str; 4] = [
    "What is the capital of France?",
    "Once upon a time",
    "The quick brown fox jumps over the lazy dog. Then the dog",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
];

fn prompts(tokenizer: &Tokenizer) -> Vec<Vec<u32>> {
    PROMPTS
        .iter()
        .map(|p| {
            let mut ids: Vec<u32> = tokenizer.bos_id.into_iter().collect();
            ids.extend(tokenizer.encode(p, false).unwrap());
            ids
        })
        .collect()
}

#[test]
fn gemma3_matches_the_reference_alone_and_in_a_batch() {
    let path = existing(
        cache().join("models/gemma-3-270m-q4_k_m.gguf"),
        "scripts/fetch-model.sh gemma3",
    );
    let (ct, mut file) = content(&path);
    let tokenizer = Tokenizer::from_gguf(&ct).unwrap();
    // candle's reference gates its MLP with SiLU where Gemma 3 uses GELU: everything
    // else is compared with the same gate (see the gemma3 module).
    let ours = Gemma3::from_gguf(&ct, &mut file, 512)
        .unwrap()
        .with_silu_gate();
    let reference = || -> batched::Reference {
        let (ct, mut file) = content(&path);
        let mut m = quantized_gemma3::ModelWeights::from_gguf(ct, &mut file, &Device::Cpu).unwrap();
        Box::new(move |x, pos| m.forward(x, pos))
    };
    // candle's gemma3 cannot continue a prompt chunk after the first (its mask mixes
    // dtypes), so prompts are prefilled whole; the batch still mixes prefill and decode.
    batched::alone_and_batched(
        &ours,
        &reference,
        &prompts(&tokenizer),
        4,
        (&[1024], 1024),
        batched::KQUANT_TOLERANCE,
    );
}

/// Mean negative log-likelihood of `text`'s tokens, each predicted from those before.
fn nll(model: &dyn Architecture, tokenizer: &Tokenizer, text: &str) -> f32 {
    let mut ids: Vec<u32> = tokenizer.bos_id.into_iter().collect();
    ids.extend(tokenizer.encode(text, false).unwrap());
    let cache = model.kv_cache(1, 128).unwrap();
    let mut total = 0.0;
    for (pos, pair) in ids.windows(2).enumerate() {
        let entry = [arch::Entry {
            slot: 0,
            pos,
            tokens: &pair[..1],
            logits: Logits::Last,
        }];
        let logits = model.forward(&cache, &entry).unwrap().unwrap();
        let row: Vec<f32> = logits.get(0).unwrap().to_vec1().unwrap();
        let max = row.iter().fold(f32::MIN, |m, &x| m.max(x));
        let log_sum = row.iter().map(|x| (x - max).exp()).sum::<f32>().ln() + max;
        total += log_sum - row[pair[1] as usize];
    }
    total / (ids.len() - 1) as f32
}

#[test]
fn gemma3_gelu_gate_predicts_real_text_better_than_candles_silu() {
    // Gemma 3 gates its MLP with GELU; candle 0.11 uses SiLU. The served (GELU) model
    // must predict ordinary English better than the SiLU one, or the gate is wrong.
    let path = existing(
        cache().join("models/gemma-3-270m-q4_k_m.gguf"),
        "scripts/fetch-model.sh gemma3",
    );
    let model = Model::load(&path).unwrap();
    assert_eq!(model.arch.name(), "gemma3");
    let (ct, mut file) = content(&path);
    let silu = Gemma3::from_gguf(&ct, &mut file, 128)
        .unwrap()
        .with_silu_gate();
    let text = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in \
                Paris, France. It is named after the engineer Gustave Eiffel, whose company \
                designed and built the tower from 1887 to 1889.";
    let (gelu_nll, silu_nll) = (
        nll(model.arch.as_ref(), &model.tokenizer, text),
        nll(&silu, &model.tokenizer, text),
    );
    eprintln!("gemma3 mean NLL: GELU {gelu_nll:.3}, SiLU {silu_nll:.3}");
    assert!(gelu_nll < 3.0, "GELU mean NLL {gelu_nll}");
    assert!(gelu_nll < silu_nll, "GELU {gelu_nll} vs SiLU {silu_nll}");
}

/// Deterministic uniform values in `[-scale, scale)`.
fn random(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let values: Vec<f32> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

struct Shape {
    arch: &'static str,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    ffn: usize,
    layers: usize,
    rope_base: f32,
    biases: bool,
    /// Weight formats: attention, MLP, embeddings.
    formats: [GgmlDType; 3],
    /// Whether the file says `rope.dimension_count` (llama.cpp defaults it).
    rope_dim_key: bool,
    /// A head size of its own (`attention.key_length`), else width / heads.
    head_dim: Option<usize>,
    /// Per-head q and k norms (qwen3).
    qk_norm: bool,
}

/// A GGUF of `shape` with random weights and the tokenizer of `vocab_file`.
fn write_random(path: &Path, shape: &Shape, vocab_file: &Path) {
    let (vocab_ct, _) = content(vocab_file);
    let vocab = match vocab_ct.metadata.get("tokenizer.ggml.tokens") {
        Some(Value::Array(tokens)) => tokens.len(),
        _ => panic!("no vocabulary"),
    };
    let a = shape.arch;
    let u32v = |n: usize| Value::U32(n as u32);
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        (format!("{a}.block_count"), u32v(shape.layers)),
        (format!("{a}.context_length"), u32v(4096)),
        (format!("{a}.embedding_length"), u32v(shape.hidden)),
        (format!("{a}.feed_forward_length"), u32v(shape.ffn)),
        (format!("{a}.attention.head_count"), u32v(shape.heads)),
        (format!("{a}.attention.head_count_kv"), u32v(shape.kv_heads)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        ),
        (format!("{a}.rope.freq_base"), Value::F32(shape.rope_base)),
    ];
    let hd = shape.head_dim.unwrap_or(shape.hidden / shape.heads);
    if shape.rope_dim_key {
        meta.push((format!("{a}.rope.dimension_count"), u32v(hd)));
    }
    if let Some(hd) = shape.head_dim {
        meta.push((format!("{a}.attention.key_length"), u32v(hd)));
        meta.push((format!("{a}.attention.value_length"), u32v(hd)));
    }
    // candle's qwen3 keeps its rotary tables in f16 unless the file says f32.
    meta.push(("general.dtype".into(), Value::U32(0)));
    for (k, v) in &vocab_ct.metadata {
        if k.starts_with("tokenizer.") {
            meta.push((k.clone(), v.clone()));
        }
    }
    let (q_dim, kv_dim) = (shape.heads * hd, shape.kv_heads * hd);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut seed = 1;
    let mut add = |name: String, dims: &[usize], format: GgmlDType, scale: f32, offset: f32| {
        seed += 1;
        let t = (random(dims, seed, scale) + f64::from(offset)).unwrap();
        tensors.push((name, QTensor::quantize(&t, format).unwrap()));
    };
    let [attn, mlp, embed] = shape.formats;
    add(
        "token_embd.weight".into(),
        &[vocab, shape.hidden],
        embed,
        0.5,
        0.0,
    );
    add(
        "output_norm.weight".into(),
        &[shape.hidden],
        GgmlDType::F32,
        0.1,
        1.0,
    );
    for i in 0..shape.layers {
        let b = |p: &str| format!("blk.{i}.{p}");
        add(
            b("attn_norm.weight"),
            &[shape.hidden],
            GgmlDType::F32,
            0.1,
            1.0,
        );
        add(
            b("ffn_norm.weight"),
            &[shape.hidden],
            GgmlDType::F32,
            0.1,
            1.0,
        );
        add(b("attn_q.weight"), &[q_dim, shape.hidden], attn, 0.05, 0.0);
        add(b("attn_k.weight"), &[kv_dim, shape.hidden], attn, 0.05, 0.0);
        add(b("attn_v.weight"), &[kv_dim, shape.hidden], attn, 0.05, 0.0);
        add(
            b("attn_output.weight"),
            &[shape.hidden, q_dim],
            attn,
            0.05,
            0.0,
        );
        if shape.qk_norm {
            add(b("attn_q_norm.weight"), &[hd], GgmlDType::F32, 0.1, 1.0);
            add(b("attn_k_norm.weight"), &[hd], GgmlDType::F32, 0.1, 1.0);
        }
        if shape.biases {
            add(b("attn_q.bias"), &[q_dim], GgmlDType::F32, 0.1, 0.0);
            add(b("attn_k.bias"), &[kv_dim], GgmlDType::F32, 0.1, 0.0);
            add(b("attn_v.bias"), &[kv_dim], GgmlDType::F32, 0.1, 0.0);
        }
        add(
            b("ffn_gate.weight"),
            &[shape.ffn, shape.hidden],
            mlp,
            0.05,
            0.0,
        );
        add(
            b("ffn_up.weight"),
            &[shape.ffn, shape.hidden],
            mlp,
            0.05,
            0.0,
        );
        add(
            b("ffn_down.weight"),
            &[shape.hidden, shape.ffn],
            mlp,
            0.05,
            0.0,
        );
    }
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut out = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut out, &meta_refs, &tensor_refs).unwrap();
}

fn random_model_test(
    shape: Shape,
    vocab: &str,
    reference: fn(&Path) -> batched::Reference,
    batch_tolerance: f32,
) {
    let vocab_file = existing(
        cache().join(format!(
            "conformance/llama.cpp-0.3.36/models/ggml-vocab-{vocab}.gguf"
        )),
        "scripts/fetch-conformance.sh",
    );
    let dir =
        std::env::temp_dir().join(format!("lynx-random-{}-{}", shape.arch, std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.gguf");
    write_random(&path, &shape, &vocab_file);
    // The whole model loads: architecture and tokenizer from one file.
    let model = Model::load(&path).unwrap();
    assert_eq!(model.arch.name(), shape.arch);
    let (ct, mut file) = content(&path);
    let ours = arch::load(&ct, &mut file, 512).unwrap();
    let prompts = prompts(&model.tokenizer);
    batched::alone_and_batched(
        ours.as_ref(),
        &|| reference(&path),
        &prompts,
        4,
        (&[1024, 5], 7),
        batched::tolerance(batch_tolerance),
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn qwen2_random_weights_match_the_reference() {
    // Qwen2.5-0.5B's geometry: 896 wide, 14 heads over 2 KV heads, biases on q/k/v.
    let shape = Shape {
        arch: "qwen2",
        hidden: 896,
        heads: 14,
        kv_heads: 2,
        ffn: 4864,
        layers: 2,
        rope_base: 1_000_000.0,
        biases: true,
        rope_dim_key: true,
        formats: [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q8_0],
        head_dim: None,
        qk_norm: false,
    };
    random_model_test(
        shape,
        "qwen2",
        |path| {
            let (ct, mut file) = content(path);
            let mut m =
                quantized_qwen2::ModelWeights::from_gguf(ct, &mut file, &Device::Cpu).unwrap();
            Box::new(move |x, pos| m.forward(x, pos))
        },
        batched::TOLERANCE,
    );
}

#[test]
fn qwen3_random_weights_match_the_reference() {
    // Qwen3-0.6B's geometry: 1024 wide, 16 heads of 128 (not 1024 / 16) over 8 KV
    // heads, per-head q/k norms, no biases, tied embeddings, in a Q4_K_M file's formats.
    let shape = Shape {
        arch: "qwen3",
        hidden: 1024,
        heads: 16,
        kv_heads: 8,
        ffn: 3072,
        layers: 2,
        rope_base: 1_000_000.0,
        biases: false,
        formats: [GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::Q8_0],
        rope_dim_key: false,
        head_dim: Some(128),
        qk_norm: true,
    };
    random_model_test(
        shape,
        "qwen2",
        |path| {
            let (ct, mut file) = content(path);
            let mut m =
                quantized_qwen3::ModelWeights::from_gguf(ct, &mut file, &Device::Cpu).unwrap();
            Box::new(move |x, pos| m.forward(x, pos))
        },
        batched::KQUANT_TOLERANCE,
    );
}

#[test]
fn llama3_random_weights_match_the_reference() {
    // Llama 3.2 1B's geometry: 2048 wide, 32 heads over 8 KV heads, rope base 500000,
    // in the formats of a Q4_K_M file.
    let shape = Shape {
        arch: "llama",
        hidden: 2048,
        heads: 32,
        kv_heads: 8,
        ffn: 8192,
        layers: 2,
        rope_base: 500_000.0,
        biases: false,
        formats: [GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::Q4_0],
        rope_dim_key: true,
        head_dim: None,
        qk_norm: false,
    };
    random_model_test(
        shape,
        "llama-bpe",
        |path| {
            let (ct, mut file) = content(path);
            let mut m =
                quantized_llama::ModelWeights::from_gguf(ct, &mut file, &Device::Cpu).unwrap();
            Box::new(move |x, pos| m.forward(x, pos))
        },
        batched::KQUANT_TOLERANCE,
    );
}

/// A llama file without `rope.dimension_count` loads (llama.cpp takes the head size)
/// and runs exactly as the same file that says it.
#[test]
fn llama_without_rope_dimension_count_rotates_the_whole_head() {
    let vocab_file = existing(
        cache().join("conformance/llama.cpp-0.3.36/models/ggml-vocab-llama-bpe.gguf"),
        "scripts/fetch-conformance.sh",
    );
    let dir = std::env::temp_dir().join(format!("lynx-rope-dim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let logits = |rope_dim_key: bool| {
        let shape = Shape {
            arch: "llama",
            hidden: 256,
            heads: 4,
            kv_heads: 2,
            ffn: 512,
            layers: 1,
            rope_base: 500_000.0,
            biases: false,
            formats: [GgmlDType::Q8_0, GgmlDType::Q8_0, GgmlDType::Q8_0],
            rope_dim_key,
            head_dim: None,
            qk_norm: false,
        };
        let path = dir.join(format!("model-{rope_dim_key}.gguf"));
        write_random(&path, &shape, &vocab_file);
        let (ct, mut file) = content(&path);
        let ours = arch::load(&ct, &mut file, 64).unwrap();
        let cache = ours.kv_cache(1, 64).unwrap();
        let tokens = [1u32, 500, 7000, 42, 99];
        let out = ours
            .forward(
                &cache,
                &[Entry {
                    slot: 0,
                    pos: 0,
                    tokens: &tokens,
                    logits: Logits::Last,
                }],
            )
            .unwrap()
            .unwrap();
        out.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let (with, without) = (logits(true), logits(false));
    assert!(with.iter().all(|x| x.is_finite()));
    assert_eq!(with, without);
    std::fs::remove_dir_all(&dir).unwrap();
}
