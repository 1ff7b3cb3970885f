#!/usr/bin/env bash
# Builds the guest components (wasm32-wasip2) and puts them where the host looks:
#   plugins/dist/default.wasm, plugins/dist/strict.wasm   (the plugin folder)
#   plugins/dist/test/{hostile,future}.wasm                (used by the tests only)
#   plugins/dist/test/swap-{v1,v2,smoke-trap,smoke-sleep,flaky}.wasm (the hot-swap tests' versions)
#   plugins/dist/test/stdlib.wasm                          (ordinary Rust std, for WASI)
#   plugins/dist/test/legacy.wasm                          (built for lynx:plugin@0.1.0)
#   plugins/dist/test/legacy2.wasm                         (the same, for lynx:plugin@0.2.0)
set -euo pipefail
cd "$(dirname "$0")/../plugins"
rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
cargo build --quiet --target wasm32-wasip2 --release
out=target/wasm32-wasip2/release
mkdir -p dist/test
# Write to a temporary name and rename, so a watching host never reads half a file.
put() { cp "$out/lynx_plugin_$1.wasm" "$2.tmp" && mv "$2.tmp" "$2"; }
put default dist/default.wasm
put strict dist/strict.wasm
put hostile dist/test/hostile.wasm
put future dist/test/future.wasm
put stdlib dist/test/stdlib.wasm
put legacy dist/test/legacy.wasm
# The swap plugin's versions are one crate built with different features.
put swap dist/test/swap-v1.wasm
for version in v2 smoke-trap smoke-sleep flaky; do
  cargo build --quiet --target wasm32-wasip2 --release -p lynx-plugin-swap --features "$version"
  put swap "dist/test/swap-$version.wasm"
done
cargo build --quiet --target wasm32-wasip2 --release -p lynx-plugin-legacy --features v0_2
put legacy dist/test/legacy2.wasm
# Leave the workspace build's (featureless) artifacts as they were.
cargo build --quiet --target wasm32-wasip2 --release -p lynx-plugin-swap
cargo build --quiet --target wasm32-wasip2 --release -p lynx-plugin-legacy
