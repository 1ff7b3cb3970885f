"""Writes an F16 GGUF of random weights at Llama-3.2-1B's geometry with the real
llama-bpe vocabulary (llama.cpp's `ggml-vocab-llama-bpe.gguf`): the file
scripts/make-1b.sh quantizes. Run by that script, with llama.cpp's gguf-py on the path.

    make-1b.py VOCAB_GGUF OUT_GGUF
"""

import sys

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 2048, 16, 32, 8, 8192
HEAD_DIM = HIDDEN // HEADS
ROPE_BASE, CONTEXT, EPS = 500000.0, 131072, 1e-5


def copy_tokenizer(reader: GGUFReader, writer: GGUFWriter) -> int:
    """Every `tokenizer.*` key of the vocabulary file; returns the vocabulary's size."""
    vocab = 0
    for field in reader.fields.values():
        if not field.name.startswith("tokenizer."):
            continue
        kind = field.types[0]
        if kind == GGUFValueType.ARRAY:
            sub = field.types[1]
            if sub == GGUFValueType.STRING:
                values = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            else:
                values = [field.parts[i].tolist()[0] for i in field.data]
            writer.add_array(field.name, values)
            if field.name == "tokenizer.ggml.tokens":
                vocab = len(values)
        elif kind == GGUFValueType.STRING:
            writer.add_string(field.name, bytes(field.parts[field.data[0]]).decode("utf-8"))
        else:
            writer.add_key_value(field.name, field.parts[field.data[0]].tolist()[0], kind)
    return vocab


def main() -> None:
    vocab_path, out = sys.argv[1], sys.argv[2]
    reader = GGUFReader(vocab_path)
    writer = GGUFWriter(out, "llama")
    vocab = copy_tokenizer(reader, writer)
    writer.add_name("lynx random Llama-3.2-1B geometry")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(ROPE_BASE)
    writer.add_layer_norm_rms_eps(EPS)
    writer.add_file_type(1)  # mostly F16

    rng = np.random.default_rng(1234)

    def weight(rows: int, cols: int) -> np.ndarray:
        # Scaled so activations keep their size through the layers: 1/sqrt(fan-in).
        w = rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(cols)
        return w.astype(np.float16)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    writer.add_tensor("token_embd.weight", weight(vocab, HIDDEN))
    writer.add_tensor("output_norm.weight", ones(HIDDEN))
    for i in range(LAYERS):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", ones(HIDDEN))
        writer.add_tensor(p + "attn_q.weight", weight(HIDDEN, HIDDEN))
        writer.add_tensor(p + "attn_k.weight", weight(KV_HEADS * HEAD_DIM, HIDDEN))
        writer.add_tensor(p + "attn_v.weight", weight(KV_HEADS * HEAD_DIM, HIDDEN))
        writer.add_tensor(p + "attn_output.weight", weight(HIDDEN, HIDDEN))
        writer.add_tensor(p + "ffn_norm.weight", ones(HIDDEN))
        writer.add_tensor(p + "ffn_gate.weight", weight(FFN, HIDDEN))
        writer.add_tensor(p + "ffn_up.weight", weight(FFN, HIDDEN))
        writer.add_tensor(p + "ffn_down.weight", weight(HIDDEN, FFN))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    main()
