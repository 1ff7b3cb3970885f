#!/usr/bin/env bash
# Installs the client libraries the end-to-end tests drive lynx with (the official
# OpenAI Python client, pinned in tests/clients/requirements.txt) into a virtual
# environment in the lynx cache folder, never into the system's Python. Idempotent.
# Prints the environment's python on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${LYNX_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/lynx}"
venv="$cache/clients-venv"
stamp="$venv/.requirements"
if [ -x "$venv/bin/python" ] && cmp -s tests/clients/requirements.txt "$stamp"; then
  echo "$venv/bin/python"
  exit 0
fi
echo "installing the OpenAI Python client into $venv ..." >&2
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/clients/requirements.txt >&2
cp tests/clients/requirements.txt "$stamp"
echo "$venv/bin/python"
