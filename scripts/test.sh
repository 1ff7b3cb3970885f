#!/usr/bin/env bash
# Runs the whole test suite: set-up, the release build the end-to-end tests start, then
# every test of the workspace on the real model (and a real Prometheus).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# The binary the end-to-end tests start has `--fault-injection` (a feature no other
# build has).
cargo build --release --workspace --bins --features lynx-server/fault-injection
cargo test --release --workspace --features lynx-server/fault-injection "$@"
# The plugins' logic, natively (the same code the wasm components run).
(cd plugins && cargo test --release -p lynx-plugin-core)
