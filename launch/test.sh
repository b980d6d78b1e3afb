#!/usr/bin/env bash
# Set everything up (launch/setup.sh) and run the test suite, including the side-by-side
# comparison with nnsight 0.8.1 (the "bench" extra), the examples' figures (the "plot"
# extra) and engine="deepspeed" (the "deepspeed" extra): on the tested versions
# (constraints.txt, in .venv), or with NNSIGHT_DIST_LATEST=1 on the newest releases (in
# .venv-latest).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NNSIGHT_DIST_EXTRAS="${NNSIGHT_DIST_EXTRAS:-bench,plot,data,deepspeed}" bash "$root/launch/setup.sh"
cd "$root"
. launch/venv.sh
. "$venv/bin/activate"
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -q "$@"
