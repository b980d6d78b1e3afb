# Sourced by the launch scripts: check "NPROC SCRIPT [ARGS...]", use the checkout's virtual
# environment (launch/venv.sh) when there is one, and set the per-rank environment (one
# thread per CPU rank, offline).
if [ $# -lt 2 ]; then
  echo "usage: $0 NPROC SCRIPT [ARGS...]" >&2
  exit 2
fi
nproc="$1"; shift
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$root/launch/venv.sh"
if [ -x "$venv/bin/python" ]; then . "$venv/bin/activate"; fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
