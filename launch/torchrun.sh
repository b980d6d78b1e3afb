#!/usr/bin/env bash
# Launch a script on N ranks of this machine with torchrun:
#   launch/torchrun.sh 4 examples/quickstart.py --tp 2 --pp 2
# Uses the checkout's .venv when there is one. On CPU every rank gets one thread.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 NPROC SCRIPT [ARGS...]" >&2
  exit 2
fi
nproc="$1"; shift
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -x "$root/.venv/bin/python" ]; then . "$root/.venv/bin/activate"; fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec python -m torch.distributed.run --standalone --nproc-per-node "$nproc" "$@"
