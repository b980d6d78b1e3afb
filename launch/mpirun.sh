#!/usr/bin/env bash
# Launch a script on N ranks of this machine with mpirun (Open MPI or MPICH):
#   launch/mpirun.sh 4 examples/quickstart.py --tp 2 --pp 2
# nnsight_dist reads its rank from the MPI launcher's variables and meets on
# MASTER_ADDR:MASTER_PORT (default 127.0.0.1 and a free port). Uses the checkout's .venv
# (.venv-latest with NNSIGHT_DIST_LATEST=1).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
export MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
export MASTER_PORT="${MASTER_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("",0)); print(s.getsockname()[1])')}"
flags=()
if mpirun --version 2>&1 | grep -q "Open MPI"; then
  # Open MPI refuses root and more ranks than cores unless told.
  [ "$(id -u)" = 0 ] && flags+=(--allow-run-as-root)
  flags+=(--oversubscribe -x MASTER_ADDR -x MASTER_PORT -x OMP_NUM_THREADS -x TOKENIZERS_PARALLELISM -x HF_HUB_OFFLINE -x PATH -x VIRTUAL_ENV)
else
  flags+=(-genvall)
fi
exec mpirun "${flags[@]}" -np "$nproc" python "$@"
