#!/usr/bin/env bash
# Fetches the conformance data the tokenizer and chat-template tests read: llama.cpp's
# tokenizer test vocabularies (`models/ggml-vocab-*.gguf` with `.inp`/`.out` cases),
# its real-world chat templates (`models/templates/*.jinja`) and its chat-template test
# (`tests/test-chat-template.cpp`), from the llama-cpp-python 0.3.36 source
# distribution on PyPI, sha256-checked, into the lynx cache folder (never into git).
# Idempotent. Prints the folder on its last line.
set -euo pipefail

SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
cache="${LYNX_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/lynx}"
dest="$cache/conformance/llama.cpp-0.3.36"
if [ -f "$dest/.complete" ]; then
  echo "$dest"
  exit 0
fi
(umask 022 && mkdir -p "$cache/conformance")
dl=$(mktemp -d)
trap 'rm -rf "$dl"' EXIT
echo "fetching llama-cpp-python==0.3.36 (source) from PyPI ..." >&2
python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python -d "$dl" llama-cpp-python==0.3.36 >&2
sdist=$(ls "$dl"/llama_cpp_python-0.3.36.tar.gz)
got=$(sha256sum "$sdist" | cut -d' ' -f1)
if [ "$got" != "$SDIST_SHA256" ]; then
  echo "sdist sha256 mismatch: expected $SDIST_SHA256, got $got" >&2
  exit 1
fi
root=llama_cpp_python-0.3.36/vendor/llama.cpp
tar -xzf "$sdist" -C "$dl" --wildcards "$root/models/ggml-vocab-*" "$root/models/templates/*" \
  "$root/tests/test-chat-template.cpp"
rm -rf "$dest"
mkdir -p "$dest"
cp -r "$dl/$root/models" "$dl/$root/tests" "$dest/"
touch "$dest/.complete"
echo "$dest"
