#!/usr/bin/env bash
# Installs the client libraries the end-to-end tests drive lynx with: the official
# OpenAI Python client twice, pinned (tests/clients/requirements.txt, into
# clients-venv) and at its current 3.x release (tests/clients/requirements-current.txt,
# into clients-current-venv), each in a virtual environment in the lynx cache folder,
# never into the system's Python. Idempotent. Prints the pinned environment's python on
# its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${LYNX_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/lynx}"

install() {
  local requirements="$1" venv="$cache/$2"
  local stamp="$venv/.requirements"
  if [ -x "$venv/bin/python" ] && cmp -s "$requirements" "$stamp"; then
    return 0
  fi
  echo "installing $(head -c 200 "$requirements" | grep -m1 -o 'openai==[0-9.]*') into $venv ..." >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements" >&2
  cp "$requirements" "$stamp"
}

install tests/clients/requirements-current.txt clients-current-venv
install tests/clients/requirements.txt clients-venv
echo "$cache/clients-venv/bin/python"
