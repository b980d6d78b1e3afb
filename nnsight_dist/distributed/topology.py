"""The topology: which rank is which, as a ``dp × pp × tp`` mesh.

:func:`init` discovers the launch (``torchrun``, Open MPI's or MPICH's ``mpirun``,
SLURM's ``srun``, or a plain single process), starts ``torch.distributed`` (nccl on CUDA
with a gloo group for control, gloo on CPU) and builds a :class:`Topology`: the one
object that answers mesh questions. A *replica* is one ``pp × tp`` block holding one whole
model; ``dp`` replicas trace their own inputs. Nobody else does rank arithmetic.
"""

from __future__ import annotations

import atexit
import os
import re
import socket
import subprocess
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..intervention.errors import TopologyError

DEFAULT_TIMEOUT = 300.0


@dataclass(frozen=True)
class Launch:
    """What the launcher told this process: its rank, the world size and where to meet."""

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def _int(env: dict, *names: str) -> Optional[int]:
    for name in names:
        if env.get(name, "") != "":
            return int(env[name])
    return None


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``node[01-04,07]`` -> ``node01``,
    ``n1,n2`` -> ``n1``, ``rack[1-2]-ib[3,5]`` -> ``rack1-ib3`` (``scontrol`` when present)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]  # commas outside brackets part hosts
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], first)


def _srun(env: dict) -> Optional[Launch]:
    """The launch as SLURM's ``srun`` describes it, or ``None`` outside an ``srun`` task.

    Ranks meet on the first host of the step's node list (where ``srun`` places task 0),
    on ``MASTER_PORT`` or else ``20000 + job id mod 20000`` (as ``launch/slurm.sbatch``).
    """
    if "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return None
    nodes = next((env[k] for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(k)),
                 "127.0.0.1")
    addr = env.get("MASTER_ADDR") or _first_host(nodes)
    port = _int(env, "MASTER_PORT") or 20000 + (_int(env, "SLURM_JOB_ID") or 0) % 20000
    return Launch("srun", int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), _int(env, "SLURM_LOCALID") or 0,
                  addr, port)


def discover(env: Optional[dict] = None) -> Launch:
    """Read the launch from the environment (see the module docstring for the launchers)."""
    env = dict(os.environ if env is None else env)
    port = _int(env, "MASTER_PORT") or 29500
    if "RANK" in env and "WORLD_SIZE" in env and ("TORCHELASTIC_RUN_ID" in env or "MASTER_ADDR" in env):
        return Launch("torchrun", int(env["RANK"]), int(env["WORLD_SIZE"]), _int(env, "LOCAL_RANK") or 0,
                      env.get("MASTER_ADDR", "127.0.0.1"), port)
    if "OMPI_COMM_WORLD_RANK" in env:
        return Launch("mpirun", int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                      _int(env, "OMPI_COMM_WORLD_LOCAL_RANK") or 0, env.get("MASTER_ADDR", ""), port)
    srun = _srun(env)
    if "PMI_RANK" in env or "PMIX_RANK" in env:
        rank = _int(env, "PMI_RANK", "PMIX_RANK")
        size = _int(env, "PMI_SIZE", "OMPI_UNIVERSE_SIZE", "PMIX_SIZE")
        # ``srun --mpi=pmi2|pmix`` sets these too (PMIx without a size): then srun's view is the
        # launch. A differing rank or size means mpirun started this process inside a job.
        if srun is not None and srun.rank == rank and size in (None, srun.world_size):
            return srun
        return Launch("mpirun", rank, size or 1, _int(env, "MPI_LOCALRANKID", "PMI_LOCAL_RANK") or 0,
                      env.get("MASTER_ADDR", ""), port)
    return srun or Launch("single", 0, 1, 0, "127.0.0.1", port)


def _mpi_master(launch: Launch) -> str:
    """Under MPI without MASTER_ADDR: rank 0's address, broadcast with mpi4py (or localhost)."""
    try:
        from mpi4py import MPI  # noqa: F401 - optional extra
    except ImportError:
        return "127.0.0.1"
    comm = MPI.COMM_WORLD
    addr = socket.gethostbyname(socket.gethostname()) if comm.Get_rank() == 0 else None
    return comm.bcast(addr, root=0)


@dataclass
class Topology:
    """The mesh ``dp × pp × tp`` of this job; rank ``r`` sits at ``(r // (pp·tp), r // tp % pp, r % tp)``."""

    world_size: int
    rank: int
    local_rank: int
    dp: int
    pp: int
    tp: int
    launcher: str = "single"
    timeout: float = DEFAULT_TIMEOUT
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: Any = None
    _groups: dict = field(default_factory=dict, repr=False)
    #: How many ``nd.gather_object``/``nd.broadcast_object`` calls this rank has made.
    exchanges: int = field(default=0, repr=False)

    @property
    def dp_rank(self) -> int:
        return self.rank // (self.pp * self.tp)

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp % self.pp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def rank_of(self, pp_rank: int, tp_rank: int, dp_rank: Optional[int] = None) -> int:
        """Global rank at ``(dp_rank, pp_rank, tp_rank)`` (this replica by default)."""
        dp_rank = self.dp_rank if dp_rank is None else dp_rank
        return (dp_rank * self.pp + pp_rank) * self.tp + tp_rank

    def replica_ranks(self) -> list[int]:
        """Global ranks of this replica, stage by stage."""
        return [self.rank_of(s, t) for s in range(self.pp) for t in range(self.tp)]

    def group(self, name: str):
        """The process group ``"tp"`` (this stage), ``"replica"`` (pp × tp), ``"router"`` (the
        replica's ranks, for point-to-point streams only) or ``"world"``."""
        return self._groups.get(name)

    def payload_groups(self) -> Optional[dict[int, tuple[Any, Any]]]:
        """On an accelerator: for each other stage's rank of this replica (same tp rank), the
        device-backend groups (NCCL) the router's tensors travel on, (to it, from it); on CPU
        ``None`` (tensors travel in the router's gloo messages)."""
        peers = [self.rank_of(s, self.tp_rank) for s in range(self.pp) if s != self.pp_rank]
        if not peers or f"payload {self.rank}->{peers[0]}" not in self._groups:
            return None
        return {p: (self._groups[f"payload {self.rank}->{p}"], self._groups[f"payload {p}->{self.rank}"])
                for p in peers}

    def __str__(self) -> str:
        return (f"rank {self.rank}/{self.world_size} (dp {self.dp_rank}/{self.dp}, pp {self.pp_rank}/{self.pp}, "
                f"tp {self.tp_rank}/{self.tp}) via {self.launcher}")


_TOPOLOGY: Optional[Topology] = None
_AT_EXIT: list = []


def at_exit(fn) -> None:
    """Run ``fn()`` when the process ends, before the process group is torn down."""
    _AT_EXIT.append(fn)


def _shutdown() -> None:
    for fn in reversed(_AT_EXIT):
        try:
            fn()
        except Exception:  # best effort at exit: a failing hook must not block the others
            pass
    _AT_EXIT.clear()
    if dist.is_initialized():
        # Rank 0 usually hosts the store: it must not leave while others still use it.
        try:
            dist.barrier()
        except (RuntimeError, dist.DistError):
            pass
        dist.destroy_process_group()


def current() -> Optional[Topology]:
    """The topology made by :func:`init`, or ``None`` before it."""
    return _TOPOLOGY


def timeout_seconds(timeout: Optional[float] = None) -> float:
    """``timeout``, else ``NNSIGHT_DIST_TIMEOUT``, else 300 s."""
    if timeout is not None:
        return float(timeout)
    return float(os.environ.get("NNSIGHT_DIST_TIMEOUT", DEFAULT_TIMEOUT))


def init(tp: Optional[int] = None, pp: Optional[int] = None, backend: Optional[str] = None,
         timeout: Optional[float] = None) -> Topology:
    """Start (or return) the job's topology. Idempotent; ``tp``/``pp`` default to 1.

    Raises :class:`TopologyError` (a ``ValueError``) on every rank when a degree is not a
    positive integer, when ``tp · pp`` does not divide the world size, or when a second
    call asks for other degrees than the first.
    """
    global _TOPOLOGY
    tp, pp = _degree("tp", tp), _degree("pp", pp)
    if _TOPOLOGY is not None:
        if (tp is not None and tp != _TOPOLOGY.tp) or (pp is not None and pp != _TOPOLOGY.pp):
            asked = ", ".join(f"{k}={v}" for k, v in (("tp", tp), ("pp", pp)) if v is not None)
            raise TopologyError(
                f"nd.init({asked}) asks for other degrees than this job's mesh, made by an earlier "
                f"nd.init (or nd.LanguageModel(..., tp=, pp=)) with tp={_TOPOLOGY.tp}, pp={_TOPOLOGY.pp}: "
                "a job has one mesh; use the same degrees (or leave them out), or launch a new job"
            )
        return _TOPOLOGY
    tp, pp = tp or 1, pp or 1
    seconds = timeout_seconds(timeout)
    launch = discover()
    if launch.world_size % (tp * pp):
        how = (f"launch {tp * pp} ranks (launch/torchrun.sh {tp * pp} script.py, or mpirun, or srun)"
               if launch.launcher == "single" else
               f"launch a multiple of {tp * pp} ranks, or choose degrees whose product divides {launch.world_size}")
        raise TopologyError(
            f"tp={tp} × pp={pp} = {tp * pp} does not divide the world size {launch.world_size} "
            f"({'a single process, started by no launcher' if launch.launcher == 'single' else launch.launcher}): {how}"
        )
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", launch.local_rank % max(torch.cuda.device_count(), 1)) if cuda else torch.device("cpu")
    topo = Topology(launch.world_size, launch.rank, launch.local_rank, launch.world_size // (tp * pp), pp, tp,
                    launch.launcher, seconds, device)
    if launch.world_size > 1:
        if not dist.is_initialized():
            addr = launch.master_addr or (_mpi_master(launch) if launch.launcher == "mpirun" else "127.0.0.1")
            os.environ.setdefault("MASTER_ADDR", addr)
            os.environ.setdefault("MASTER_PORT", str(launch.master_port))
            os.environ.setdefault("RANK", str(launch.rank))
            os.environ.setdefault("WORLD_SIZE", str(launch.world_size))
            os.environ.setdefault("LOCAL_RANK", str(launch.local_rank))
            if cuda:
                torch.cuda.set_device(device)
            dist.init_process_group(backend or ("nccl" if cuda else "gloo"), rank=launch.rank,
                                    world_size=launch.world_size, timeout=timedelta(seconds=seconds))
        _build_groups(topo, cuda)
        atexit.register(_shutdown)
    _TOPOLOGY = topo
    return topo


def _degree(name: str, value: Any) -> Optional[int]:
    """``value`` checked as a parallel degree (a positive integer, or ``None`` for "as set")."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TopologyError(f"nd.init({name}={value!r}): {name} must be a positive integer (1 for no parallelism)")
    return value


def _build_groups(topo: Topology, cuda: bool) -> None:
    """Every rank creates every group, in the same order (a collective requirement)."""
    from torch.distributed.device_mesh import init_device_mesh

    topo.mesh = init_device_mesh(topo.device.type, (topo.dp, topo.pp, topo.tp), mesh_dim_names=("dp", "pp", "tp"))
    control = "gloo" if cuda else None
    timeout = timedelta(seconds=topo.timeout)
    for d in range(topo.dp):
        for s in range(topo.pp):
            ranks = [topo.rank_of(s, t, d) for t in range(topo.tp)]
            group = dist.new_group(ranks, backend=control, timeout=timeout)
            if topo.rank in ranks:
                topo._groups["tp"] = group
        ranks = [topo.rank_of(s, t, d) for s in range(topo.pp) for t in range(topo.tp)]
        group = dist.new_group(ranks, backend=control, timeout=timeout)
        if topo.rank in ranks:
            topo._groups["replica"] = group
        # The router's point-to-point streams get a group of their own, whose posted receives
        # must outlive idle time between traces: the router's waits carry their own timeout.
        group = dist.new_group(ranks, backend=control, timeout=timedelta(days=365))
        if topo.rank in ranks:
            topo._groups["router"] = group
        if cuda:
            # The router's tensors travel on the device: a group per direction of each pair
            # of stages (see router.py), so opposite transfers never share a device stream.
            pairs = [(topo.rank_of(a, t, d), topo.rank_of(b, t, d))
                     for t in range(topo.tp) for a in range(topo.pp) for b in range(topo.pp) if a != b]
            for src, dst in pairs:
                group = dist.new_group(sorted((src, dst)), backend="nccl", timeout=timedelta(days=365))
                if topo.rank in (src, dst):
                    topo._groups[f"payload {src}->{dst}"] = group
    topo._groups["world"] = dist.new_group(list(range(topo.world_size)), backend=control, timeout=timeout)
