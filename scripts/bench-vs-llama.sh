#!/usr/bin/env bash
# Side-by-side benchmark against llama.cpp's llama-server (prints figures; not a test):
# for each GGUF given, lynx and then llama-server serve it in turn (never both at once),
# and the same `load` runs against each: 128-token greedy streamed completions with
# counting prompts at the `--levels` (default 1,8,32), then `--prefill 5` (cold ~400-word
# prompts, one token, c=1). lynx runs with `--kv-slots 32 --max-seq-len 512` (f16 cache),
# llama-server with `-np 32 -t <cores> -c 16384`, built by scripts/build-llama-cpp.sh.
# lynx is measured once its warm constraint pool is full (`warm_up` below).
# Needs `cargo build --release --workspace --bins` first.
#
#   scripts/bench-vs-llama.sh [--levels 1,8,32] [--requests 2] GGUF...
set -euo pipefail
cd "$(dirname "$0")/.."

levels=1,8,32
requests=2
files=()
while [ $# -gt 0 ]; do
  case "$1" in
    --levels) levels="$2"; shift 2 ;;
    --requests) requests="$2"; shift 2 ;;
    *) files+=("$1"); shift ;;
  esac
done
bin=$(./scripts/build-llama-cpp.sh llama-server | tail -1)
cores=$(nproc)
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); flags:" \
  "$(grep -m1 -o -w -E 'avx2|avx512f|avx512bw|avx512_vnni|avx_vnni|amx_int8' /proc/cpuinfo | sort -u | xargs)"

wait_up() {
  for _ in $(seq 600); do
    curl -fs "$1/v1/models" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "server at $1 did not come up" >&2
  return 1
}

# lynx prepares its warm constraint instances (structured outputs) in the background
# after start-up: about 2 s each for gemma's 262k vocabulary. They run under SCHED_IDLE,
# yet the memory they build competes with the forward pass, so the figures wait for the
# pool to be full (steady state, what the table compares), at most 120 s.
warm_up() {
  for _ in $(seq 240); do
    curl -fs http://127.0.0.1:8410/admin/plugins | python3 -c '
import json, sys
d = json.load(sys.stdin)
sys.exit(0 if any(p["state"] == "active" and p["warm_constraints"] >= 8 for p in d["plugins"]) else 1)
' && return 0
    sleep 0.5
  done
  echo "lynx's warm constraint pool did not fill in 120 s; measuring anyway" >&2
}

run_load() {
  ./target/release/load --base "$1" --model "$2" --greedy --levels "$levels" --requests "$requests"
  ./target/release/load --base "$1" --model "$2" --prefill 5
}

for f in "${files[@]}"; do
  name=$(basename "$f")
  echo "=== $name: lynx"
  ./target/release/lynx-host --model "$f" --model-name "$name" --listen 127.0.0.1:8411 \
    --kv-slots 32 --max-seq-len 512 --admin-listen 127.0.0.1:8410 >/tmp/lynx-bench.log 2>&1 &
  pid=$!
  wait_up http://127.0.0.1:8411
  warm_up
  grep -m1 "matmul kernels" /tmp/lynx-bench.log || true
  run_load http://127.0.0.1:8411 "$name"
  kill "$pid"; wait "$pid" 2>/dev/null || true

  echo "=== $name: llama.cpp"
  "$bin/llama-server" -m "$f" --port 8412 -np 32 -t "$cores" -c 16384 >/tmp/llama-bench.log 2>&1 &
  pid=$!
  wait_up http://127.0.0.1:8412
  run_load http://127.0.0.1:8412 "$name"
  kill "$pid"; wait "$pid" 2>/dev/null || true
done
