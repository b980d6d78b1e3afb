"""Real launchers: the quickstart on 4 CPU ranks (tp=2 × pp=2) with torchrun and mpirun
prints what the single-process run prints."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(cmd: list[str], tmp_path) -> list[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NNSIGHT_DIST_TIMEOUT": "60"}
    env.pop("RANK", None)
    out = subprocess.run(cmd + ["--model-dir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    lines = [line for line in out.stdout.splitlines() if not line.startswith(("topology:", "placement:"))]
    assert len(lines) == 4, out.stdout
    return lines


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> list[str]:
    return _run([sys.executable, "examples/quickstart.py"], tmp_path_factory.mktemp("single"))


def test_torchrun_quickstart_tp2_pp2(single, tmp_path):
    assert _run(["bash", "launch/torchrun.sh", "4", "examples/quickstart.py", "--tp", "2", "--pp", "2"], tmp_path) == single


def test_mpirun_quickstart_tp2_pp2(single, tmp_path):
    if shutil.which("mpirun") is None:
        if os.environ.get("NNSIGHT_DIST_REQUIRE_MPI"):
            pytest.fail("mpirun is not installed (NNSIGHT_DIST_REQUIRE_MPI is set)")
        pytest.skip("mpirun is not installed")
    assert _run(["bash", "launch/mpirun.sh", "4", "examples/quickstart.py", "--tp", "2", "--pp", "2"], tmp_path) == single
