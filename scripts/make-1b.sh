#!/usr/bin/env bash
# Makes the 1B-class benchmark file: random weights at Llama-3.2-1B's geometry (2048
# wide, 16 layers, 32 heads over 8 KV heads, FFN 8192, tied embeddings) with the real
# llama-bpe vocabulary from the conformance data (128,256 tokens), written as F16 by
# scripts/make-1b.py with llama.cpp's own gguf-py, then `llama-quantize` to Q4_K_M
# (scripts/build-llama-cpp.sh). Into the lynx cache folder, never into git. Idempotent;
# the seed is fixed, so every machine makes the same weights. Prints the GGUF's path on
# its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${LYNX_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/lynx}"
out="$cache/models/llama-3.2-1b-geometry-random.Q4_K_M.gguf"
if [ -f "$out" ]; then
  echo "$out"
  exit 0
fi
conformance=$(./scripts/fetch-conformance.sh | tail -1)
bin=$(./scripts/build-llama-cpp.sh llama-quantize | tail -1)
src="$cache/llama.cpp-0.3.36/src"

venv="$cache/make-1b-venv"
[ -x "$venv/bin/python" ] || {
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet numpy==2.2.6 pyyaml==6.0.2 >&2
}
f16=$(mktemp "$cache/models/1b-f16.XXXXXX.gguf")
trap 'rm -f "$f16" "$out.part"' EXIT
echo "writing random F16 weights (2.5 GB) ..." >&2
PYTHONPATH="$src/gguf-py" "$venv/bin/python" scripts/make-1b.py \
  "$conformance/models/ggml-vocab-llama-bpe.gguf" "$f16"
echo "quantizing to Q4_K_M ..." >&2
"$bin/llama-quantize" "$f16" "$out.part" Q4_K_M >&2
mv "$out.part" "$out"
echo "$out"
