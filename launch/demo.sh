#!/usr/bin/env bash
# Set everything up (launch/setup.sh) and run the main job: examples/quickstart.py on
# 4 CPU ranks, tensor-parallel 2 × pipeline-parallel 2, on a tiny model built locally.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup.sh"
cd "$root"
exec bash launch/torchrun.sh 4 examples/quickstart.py --tp 2 --pp 2 "$@"
