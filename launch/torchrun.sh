#!/usr/bin/env bash
# Launch a script on N ranks of this machine with torchrun:
#   launch/torchrun.sh 4 examples/quickstart.py --tp 2 --pp 2
# Uses the checkout's .venv (.venv-latest with NNSIGHT_DIST_LATEST=1) when there is one.
# On CPU every rank gets one thread.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m torch.distributed.run --standalone --nproc-per-node "$nproc" "$@"
