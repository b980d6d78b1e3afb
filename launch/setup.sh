#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv inside the checkout and install
# nnsight_dist with its test extras (plus NNSIGHT_DIST_EXTRAS, comma-separated). The CPU build of torch goes in first, so nothing
# later pulls a multi-GB CUDA build. Safe to run again: it only installs what is missing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
. .venv/bin/activate
extras="test${NNSIGHT_DIST_EXTRAS:+,$NNSIGHT_DIST_EXTRAS}"
stamp=".venv/.nnsight_dist_installed_${extras//,/_}"
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
  pip install -q --upgrade pip
  pip install -q "torch==2.13.0"
  pip install -q -e ".[$extras]"
  touch "$stamp"
fi
