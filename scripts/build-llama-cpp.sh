#!/usr/bin/env bash
# Builds llama.cpp's tools from the llama-cpp-python 0.3.36 source distribution on PyPI
# (sha256-checked), into the lynx cache folder, never into git: `llama-quantize` (what
# scripts/make-1b.sh needs), and the performance peer `llama-server` with
# `llama-perplexity` for the side-by-side benchmarks. cmake comes from PyPI when the
# machine has none.
#
# The build names the CPU's ISA instead of `-march=native` (GGML_NATIVE=OFF): AVX2, FMA,
# F16C always; AVX-512 (F, BW, VBMI), AVX-512-VNNI, AVX-VNNI and AVX-512-BF16 where the
# CPU has them. AMX stays off: on a VM that advertises it, its path dies at the first
# `ldtilecfg`. Idempotent. Prints the folder of the binaries on its last line.
#
#   scripts/build-llama-cpp.sh [target ...]   (default: llama-quantize llama-server
#                                              llama-perplexity)
set -euo pipefail

SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(llama-quantize llama-server llama-perplexity)

cache="${LYNX_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/lynx}"
src="$cache/llama.cpp-0.3.36/src"
build="$cache/llama.cpp-0.3.36/build"
bin="$build/bin"

missing=0
for t in "${targets[@]}"; do [ -x "$bin/$t" ] || missing=1; done
if [ "$missing" = 0 ]; then
  echo "$bin"
  exit 0
fi

if [ ! -f "$src/.complete" ]; then
  dl=$(mktemp -d)
  trap 'rm -rf "$dl"' EXIT
  echo "fetching llama-cpp-python==0.3.36 (source) from PyPI ..." >&2
  python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python -d "$dl" \
    llama-cpp-python==0.3.36 >&2
  sdist="$dl/llama_cpp_python-0.3.36.tar.gz"
  got=$(sha256sum "$sdist" | cut -d' ' -f1)
  if [ "$got" != "$SDIST_SHA256" ]; then
    echo "sdist sha256 mismatch: expected $SDIST_SHA256, got $got" >&2
    exit 1
  fi
  rm -rf "$src"
  mkdir -p "$src"
  tar -xzf "$sdist" -C "$src" --strip-components=3 llama_cpp_python-0.3.36/vendor/llama.cpp
  touch "$src/.complete"
fi

if ! command -v cmake >/dev/null 2>&1; then
  venv="$cache/llama.cpp-0.3.36/cmake-venv"
  [ -x "$venv/bin/cmake" ] || {
    echo "installing cmake from PyPI ..." >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet cmake==4.4.5 >&2
  }
  export PATH="$venv/bin:$PATH"
fi

flag() { grep -qw "$1" /proc/cpuinfo && echo ON || echo OFF; }
isa=(
  -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
  -DGGML_AVX512="$(flag avx512f)" -DGGML_AVX512_VBMI="$(flag avx512vbmi)"
  -DGGML_AVX512_VNNI="$(flag avx512_vnni)" -DGGML_AVX512_BF16="$(flag avx512_bf16)"
  -DGGML_AVX_VNNI="$(flag avx_vnni)" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF
  -DGGML_AMX_BF16=OFF
)
echo "building ${targets[*]} (${isa[*]}) ..." >&2
cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "${isa[@]}" >&2
cmake --build "$build" --config Release -j "$(nproc)" --target "${targets[@]}" >&2
echo "$bin"
