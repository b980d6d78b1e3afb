#!/usr/bin/env bash
# Set everything up (launch/setup.sh) and run the main job, examples/quickstart.py, on a
# tiny model built locally (nothing is downloaded).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup.sh"
cd "$root"
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python examples/quickstart.py "$@"
