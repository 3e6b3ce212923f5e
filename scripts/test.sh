#!/usr/bin/env bash
# Everything the tests need on a fresh Debian machine, then the tests themselves.
# Extra arguments go to pytest (e.g. bash scripts/test.sh -k gateway).
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install -e ".[test]"

# The browser tests drive Debian's chromium through Playwright (no browser download).
if ! command -v chromium >/dev/null 2>&1; then
  sudo=""
  if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi
  $sudo apt-get update
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium
fi

python -m pytest "$@"
