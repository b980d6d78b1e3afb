"""Topology: launch discovery, the mesh, placements, JSON object exchange, unshardable models."""

from __future__ import annotations

import pytest

import nnsight_dist as nd
from nnsight_dist.distributed.topology import _first_host, discover
from nnsight_dist.testing.ranks import run_ranks


def test_discover_torchrun():
    launch = discover({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h1",
                       "MASTER_PORT": "1234", "TORCHELASTIC_RUN_ID": "x"})
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("torchrun", 3, 4, 1)
    assert (launch.master_addr, launch.master_port) == ("h1", 1234)


def test_discover_open_mpi_and_mpich():
    ompi = discover({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "2"})
    assert (ompi.launcher, ompi.rank, ompi.world_size, ompi.local_rank) == ("mpirun", 2, 8, 2)
    mpich = discover({"PMI_RANK": "5", "PMI_SIZE": "6", "MPI_LOCALRANKID": "1"})
    assert (mpich.launcher, mpich.rank, mpich.world_size, mpich.local_rank) == ("mpirun", 5, 6, 1)


def test_discover_slurm_and_single():
    slurm = discover({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                      "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123"})
    assert (slurm.launcher, slurm.rank, slurm.world_size, slurm.local_rank) == ("srun", 9, 16, 1)
    assert slurm.master_addr == "gpu07" and slurm.master_port == 20123
    assert _first_host("node1,node2") == "node1" and _first_host("a[1,3-4]") == "a1"
    assert discover({}).launcher == "single" and discover({}).world_size == 1


def _mesh(rank: int, path: str) -> dict:
    model = nd.LanguageModel(path, tp=2, pp=2)
    topo = model.topology
    down = model.placement("model.model.layers.3.mlp.down_proj")
    q = model.placement("model.layers.0.self_attn.q_proj")
    act = model.placement("model.model.layers.0.mlp.act_fn")
    gathered = nd.gather_object({"rank": topo.rank, "stage": topo.pp_rank}, dst=0)
    said = nd.broadcast_object({"hello": [1, 2]} if topo.rank == 0 else None, src=0)
    return {"coords": [topo.dp_rank, topo.pp_rank, topo.tp_rank], "down": [down.owner_stage, list(down.ranks), down.input, down.output],
            "q": [q.owner_stage, list(q.ranks), q.input, q.output], "gathered": gathered, "said": said,
            "placements": len(model.placements()), "act": [act.input, act.output]}


def test_mesh_and_placements_tp2_pp2(tmp_path):
    path = nd.testing.make_tiny_model(str(tmp_path))
    results = run_ranks(_mesh, 4, path, timeout=120)
    assert [r["coords"] for r in results] == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]]
    for r in results:
        assert r["down"] == [1, [2, 3], "shard(-1)", "whole"]
        assert r["q"] == [0, [0, 1], "whole", "shard(-1)"]
        assert r["said"] == {"hello": [1, 2]}
        assert r["act"] == ["shard(-1)", "shard(-1)"]  # between the col- and row-parallel layers
        assert r["placements"] == results[0]["placements"] > 40
    assert results[0]["gathered"] == [{"rank": i, "stage": i // 2} for i in range(4)]
    assert all(r["gathered"] is None for r in results[1:])


def _load(rank: int, path: str, tp: int, pp: int) -> None:
    nd.LanguageModel(path, tp=tp, pp=pp)


@pytest.mark.parametrize("tp,pp,what", [(3, 1, "num_attention_heads"), (1, 3, "exceeds")])
def test_unshardable_model(tmp_path, tp, pp, what):
    path = nd.testing.make_tiny_model(str(tmp_path), layers=2)
    results = run_ranks(_load, 3, path, tp, pp, timeout=60, expect_errors=True)
    for r in results:
        assert r[0] == "error" and r[1] == "UnshardableModel" and what in r[2]
