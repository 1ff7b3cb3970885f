#!/usr/bin/env bash
# Accuracy side by side with llama.cpp (prints figures; not a test): for each GGUF given,
# the mean negative log-likelihood of tests/data/nll_text.txt as lynx serves the file
# (tests/src/bin/nll.rs, through its API) and as `llama-perplexity -c 128` computes it
# (built by scripts/build-llama-cpp.sh). Issue 26's bound is 0.5% of llama.cpp's mean NLL;
# tests/tests/accuracy.rs asserts it for the two models the tests fetch.
# Needs `cargo build --release --workspace --bins` first.
#
#   scripts/nll-vs-llama.sh GGUF...
set -euo pipefail
cd "$(dirname "$0")/.."

bin=$(./scripts/build-llama-cpp.sh llama-perplexity | tail -1)
for f in "$@"; do
  ./target/release/nll "$f"
  ppl=$(LD_LIBRARY_PATH="$bin" "$bin/llama-perplexity" -m "$f" -f tests/data/nll_text.txt \
    -c 128 -b 128 -t "$(nproc)" 2>&1 | sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p')
  python3 -c "import math,sys; p=float(sys.argv[1]); print(f'{sys.argv[2]}: llama.cpp mean NLL {math.log(p):.5f} (PPL = {p})')" \
    "$ppl" "$(basename "$f")"
done
