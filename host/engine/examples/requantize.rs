//! Rewrites a GGUF in llama.cpp's Q4_K_M mix with candle's `QTensor::quantize`: the
//! benchmark's "SmolLM2 requantized to Q4_K_M" (issue 16), made from the Q4_1 file
//! already fetched, since no hub is reachable.
//!
//! ```text
//! cargo run --release -p lynx-engine --example requantize -- IN.gguf OUT.gguf
//! ```
//!
//! llama.cpp's rules for Q4_K_M, as far as a model this small meets them: Q4_K by
//! default; Q6_K for the output (or tied embeddings) and for `attn_v` and `ffn_down`
//! in the first and last eighth of the layers and every third layer between; 1-D
//! tensors (norms) as they are. A tensor whose rows are not whole 256-value
//! super-blocks takes llama.cpp's fallback: Q5_0 for Q4_K, Q8_0 for Q6_K.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a command-line tool may panic

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;

fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

fn target(name: &str, dims: &[usize], layers: usize, tied: bool) -> Option<GgmlDType> {
    if dims.len() < 2 {
        return None;
    }
    let more_bits = |l: usize| l < layers / 8 || l >= 7 * layers / 8 || (l - layers / 8) % 3 == 2;
    let six = name == "output.weight"
        || (tied && name == "token_embd.weight")
        || ((name.ends_with("attn_v.weight") || name.ends_with("ffn_down.weight"))
            && layer_of(name).is_some_and(more_bits));
    let k = dims.last().copied().unwrap_or(0);
    Some(match (six, k % 256 == 0) {
        (true, true) => GgmlDType::Q6K,
        (true, false) => GgmlDType::Q8_0,
        (false, true) => GgmlDType::Q4K,
        (false, false) => GgmlDType::Q5_0,
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (input, output) = match &args[..] {
        [_, i, o] => (i, o),
        _ => panic!("usage: requantize IN.gguf OUT.gguf"),
    };
    let mut file = std::fs::File::open(input).expect("input");
    let ct = gguf_file::Content::read(&mut file).expect("a GGUF file");
    let arch = match ct.metadata.get("general.architecture") {
        Some(gguf_file::Value::String(a)) => a.clone(),
        _ => panic!("no general.architecture"),
    };
    let layers = ct
        .metadata
        .get(&format!("{arch}.block_count"))
        .and_then(|v| v.to_u32().ok())
        .expect("block_count") as usize;
    let tied = !ct.tensor_infos.contains_key("output.weight");
    let mut names: Vec<&String> = ct.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = Vec::new();
    for name in names {
        let q = ct.tensor(&mut file, name, &Device::Cpu).expect("tensor");
        let dims = q.shape().dims().to_vec();
        let out = match target(name, &dims, layers, tied) {
            Some(dtype) if dtype != q.dtype() => {
                let f = q.dequantize(&Device::Cpu).expect("dequantize");
                println!("{name} {dims:?}: {:?} -> {dtype:?}", q.dtype());
                QTensor::quantize(&f, dtype).expect("quantize")
            }
            _ => q,
        };
        tensors.push((name.clone(), out));
    }
    let mut meta: Vec<(&str, &gguf_file::Value)> =
        ct.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    meta.sort_by_key(|(k, _)| *k);
    // Q4_K_M's file type, so tools that read it name the mix.
    let ftype = gguf_file::Value::U32(15);
    meta.retain(|(k, _)| *k != "general.file_type");
    meta.push(("general.file_type", &ftype));
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut out = std::fs::File::create(output).expect("output");
    gguf_file::write(&mut out, &meta, &refs).expect("write");
}
