#!/usr/bin/env bash
# Runs lynx-host on the default model on 127.0.0.1:8000, fetching and building what it
# needs first. Extra arguments go to lynx-host (see `lynx-host --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --serve
exec cargo run --release -p lynx-server --bin lynx-host -- "$@"
