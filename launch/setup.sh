#!/usr/bin/env bash
# Create (or reuse) the checkout's virtual environment and install nnsight_dist with its test
# extras (plus NNSIGHT_DIST_EXTRAS, comma-separated). The CPU build of torch goes in first, on
# its own, so nothing later pulls a multi-GB CUDA build; everything else is held to that torch.
#
#   default                .venv: every package at the version the suite was tested with
#                          (constraints.txt). Reinstalled only when setup.cfg, constraints.txt
#                          or the extras change.
#   NNSIGHT_DIST_LATEST=1  .venv-latest: the newest releases (torch: the newest CPU build pip
#                          can see), upgraded on every run. Prints the versions it got.
#
# NNSIGHT_DIST_TORCH_INDEX: an extra package index for torch alone, e.g. PyTorch's CPU wheel
# index, where no CPU build lies in pip's find-links (see README, "Tested versions").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
. launch/venv.sh
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
. "$venv/bin/activate"
extras="test${NNSIGHT_DIST_EXTRAS:+,$NNSIGHT_DIST_EXTRAS}"
torch_index=(${NNSIGHT_DIST_TORCH_INDEX:+--extra-index-url "$NNSIGHT_DIST_TORCH_INDEX"})

# The newest torch release whose CPU build ("+cpu") pip can see: PyPI's own Linux x86_64
# wheels are CUDA builds, so the newest release may be newer than what this can install.
newest_cpu_torch() {
  local versions cpu
  versions="$(pip index versions torch "${torch_index[@]}" 2>/dev/null | sed -n 's/^Available versions: //p' | tr -d ' ' | tr ',' '\n')"
  cpu="$(grep -m1 '+cpu$' <<<"$versions" || true)"
  if [ -z "$cpu" ]; then
    echo "setup: no CPU build of torch found (newest release: $(head -n1 <<<"$versions")); set NNSIGHT_DIST_TORCH_INDEX to PyTorch's CPU wheel index" >&2
    exit 1
  fi
  if [ "$(head -n1 <<<"$versions")" != "$cpu" ]; then
    echo "setup: torch $(head -n1 <<<"$versions") is the newest release; its newest CPU build here is $cpu" >&2
  fi
  echo "$cpu"
}

if [ "${NNSIGHT_DIST_LATEST:-0}" = 1 ]; then
  pip install -q --upgrade pip
  torch="$(newest_cpu_torch)"
  pip install -q "${torch_index[@]}" "torch==$torch"
  echo "torch==$torch" > "$venv/torch-constraint.txt"  # later installs must not replace it
  pip install -q --upgrade --upgrade-strategy eager -c "$venv/torch-constraint.txt" -e ".[$extras]"
  echo "setup: newest releases in $venv:" $(pip list --format=freeze 2>/dev/null |
    grep -iE '^(torch|transformers|accelerate|tokenizers|safetensors|huggingface.hub|greenlet|tqdm|nnsight|pytest|pytest.timeout|deepspeed)==')
else
  stamp="$venv/.nnsight_dist_installed_${extras//,/_}"
  wanted="$(cat setup.cfg constraints.txt | sha256sum | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    pip install -q --upgrade pip
    pip install -q "${torch_index[@]}" -c constraints.txt torch
    pip install -q -c constraints.txt -e ".[$extras]"
    echo "$wanted" > "$stamp"
  fi
fi
