"""The SLURM launch path: ``srun``'s variables -> ranks, world size and meeting point, and a
real job of forked ranks that see only SLURM's variables (no torchrun variables at all)."""

from __future__ import annotations

import os
import socket

import pytest
import torch

import nnsight_dist as nd
from nnsight_dist.distributed.topology import _first_host, discover
from nnsight_dist.testing.ranks import run_ranks

NO_SCONTROL = {"PATH": ""}  # _first_host must not depend on a cluster's scontrol


def _srun_env(procid: int, ntasks: int, localid: int, nodelist: str, job: str = "4242", **extra: str) -> dict:
    """The variables ``srun`` sets in each task (the ones discovery reads, and some it must ignore)."""
    return {"SLURM_PROCID": str(procid), "SLURM_NTASKS": str(ntasks), "SLURM_NPROCS": str(ntasks),
            "SLURM_LOCALID": str(localid), "SLURM_JOB_ID": job, "SLURM_JOBID": job, "SLURM_STEP_ID": "0",
            "SLURM_JOB_NODELIST": nodelist, "SLURM_NODELIST": nodelist, "SLURM_STEP_NODELIST": nodelist,
            "SLURM_NNODES": "2", "SLURM_NODEID": str(procid // 8), **extra}


@pytest.mark.parametrize("nodelist,first", [
    ("node[01-04,07]", "node01"), ("gpu-a[1,3]", "gpu-a1"), ("n1,n2", "n1"), ("solo", "solo"),
    ("node[007-010]", "node007"), ("node[01-04]-ib", "node01-ib"), ("rack[2-3]-n[5,7-9]", "rack2-n5"),
    ("a[3-4],b[1-2]", "a3"), ("x1,gpu[1-2]", "x1"),
])
def test_first_host_of_node_lists(monkeypatch, nodelist, first):
    monkeypatch.setenv("PATH", "")
    assert _first_host(nodelist) == first


@pytest.mark.parametrize("nodelist,first", [("node[01-04,07]", "node01"), ("gpu-a[1,3]", "gpu-a1"), ("n1,n2", "n1")])
def test_discover_srun_tasks(monkeypatch, nodelist, first):
    """16 tasks on two nodes: every task sees its own rank, one world and one meeting point,
    the port 20000 + job id mod 20000 (launch/slurm.sbatch's formula) unless MASTER_* are set."""
    monkeypatch.setenv("PATH", "")
    launches = [discover(_srun_env(r, 16, r % 8, nodelist, job="123457")) for r in range(16)]
    assert [(x.launcher, x.rank, x.world_size, x.local_rank) for x in launches] == \
        [("srun", r, 16, r % 8) for r in range(16)]
    assert {(x.master_addr, x.master_port) for x in launches} == {(first, 20000 + 123457 % 20000)}
    given = discover(_srun_env(5, 16, 5, nodelist, MASTER_ADDR="10.0.0.9", MASTER_PORT="31000"))
    assert (given.launcher, given.rank, given.master_addr, given.master_port) == ("srun", 5, "10.0.0.9", 31000)
    only_addr = discover(_srun_env(5, 16, 5, nodelist, job="77", MASTER_ADDR="10.0.0.9"))
    assert (only_addr.master_addr, only_addr.master_port) == ("10.0.0.9", 20077)


def test_discover_srun_with_pmi_plugins(monkeypatch):
    """``srun --mpi=pmix`` adds PMIX_RANK (no size), ``--mpi=pmi2`` PMI_RANK/PMI_SIZE: still
    srun's launch. mpirun inside a job (other ranks and size than the job's task) is mpirun."""
    monkeypatch.setenv("PATH", "")
    pmix = discover(_srun_env(3, 8, 3, "gpu[1-2]", PMIX_RANK="3", PMIX_NAMESPACE="slurm.pmix.1.0"))
    assert (pmix.launcher, pmix.rank, pmix.world_size, pmix.master_addr) == ("srun", 3, 8, "gpu1")
    pmi2 = discover(_srun_env(3, 8, 3, "gpu[1-2]", PMI_RANK="3", PMI_SIZE="8"))
    assert (pmi2.launcher, pmi2.rank, pmi2.world_size) == ("srun", 3, 8)
    hydra = discover(_srun_env(0, 1, 0, "gpu[1-2]", PMI_RANK="5", PMI_SIZE="16", MPI_LOCALRANKID="5"))
    assert (hydra.launcher, hydra.rank, hydra.world_size, hydra.local_rank) == ("mpirun", 5, 16, 5)


def _free_slurm_port() -> tuple[int, str]:
    """A job id whose SLURM port (20000 + id mod 20000) is free on this host right now."""
    for port in range(20000 + os.getpid() % 19000, 40000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port, str(100000 + port - 20000)
    raise RuntimeError("no free port in 20000-39999")


def _slurm_rank(rank: int, path: str, tasks: int, job: str) -> dict:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        os.environ.pop(name, None)  # run_ranks plays torchrun; this job is srun's alone
    os.environ.update(_srun_env(rank, tasks, rank, "localhost", job=job))
    model = nd.LanguageModel(path, tp=2, pp=2)
    topo = model.topology
    with model.trace("The Eiffel Tower is in the city of"):
        hidden = model.model.layers[3].output.save()
        logits = model.lm_head.output.save()
    return {"launch": [topo.launcher, topo.rank, topo.world_size, topo.pp_rank, topo.tp_rank],
            "meet": [os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])],
            "hidden": hidden.detach(), "logits": logits.detach()}


def test_srun_job_of_four_ranks(tmp_path):
    """Four ranks that see only SLURM's variables build tp=2 × pp=2 and match one process."""
    path = nd.testing.make_tiny_model(str(tmp_path))
    model = nd.LanguageModel(path)
    with model.trace("The Eiffel Tower is in the city of"):
        hidden = model.model.layers[3].output.save()
        logits = model.lm_head.output.save()
    port, job = _free_slurm_port()
    results = run_ranks(_slurm_rank, 4, path, 4, job, timeout=120, env={"NNSIGHT_DIST_TIMEOUT": "60", **NO_SCONTROL})
    for rank, r in enumerate(results):
        assert r["launch"] == ["srun", rank, 4, rank // 2, rank % 2]
        assert r["meet"] == ["localhost", port]
        torch.testing.assert_close(r["hidden"], hidden, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(r["logits"], logits, rtol=1e-4, atol=1e-5)
        assert torch.equal(r["logits"], results[0]["logits"])
