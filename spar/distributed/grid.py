"""The ``sample x data`` process grid and :func:`init`, the entry point of every job.

Rank layout
-----------
A job of ``world = sample * data`` ranks is laid out as a 2-D device mesh of shape
``(data, sample)`` with named axes ``("data", "sample")``::

    global rank = data_rank * sample + sample_rank

so the ranks of one *sample group* (same ``data_rank``, all sample ranks: they see the
same mini-batch and split the Monte Carlo samples) are contiguous. With ``torchrun`` or
SLURM placing consecutive ranks on the same node, a sample group stays inside a node,
where the per-step all-gathers of the mixture likelihood and of :meth:`predict` are cheap.
A *data group* (same ``sample_rank``) holds one rank per sample group.

Modes
-----
``local`` (one process), ``sp`` (``sample = world``), ``ddp`` (``data = world``: every
rank runs all S samples on its own shard; noise is keyed by the global sample index, so
all ranks draw the same weights, unlike reseeding each rank with ``seed + rank``) and
``hybrid`` (both axes larger than one).
"""

from __future__ import annotations

import datetime
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "MODES",
    "Grid",
    "LaunchEnv",
    "detect_launch_env",
    "first_host",
    "init",
    "make_grid",
    "shutdown",
]

MODES = ("local", "sp", "ddp", "hybrid")
SAMPLE_AXIS = "sample"
DATA_AXIS = "data"
_DEFAULT_PORT = 29500

# Grids built on the current default process group, keyed by (sample, data). Building a
# grid creates sub-groups, a collective that every rank must run in the same order; reusing
# a grid makes repeated ``init``/``make_grid`` calls free and keeps all ranks in step.
_GRIDS: dict[tuple[int, int], Grid] = {}
_GRIDS_PG: list[Any] = [None]  # the default group the cache belongs to


def _check_axis(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


@dataclass(frozen=True, eq=False)
class Grid:
    """A ``sample x data`` grid of ranks (see the module docstring for the layout).

    Attributes:
        sample, data: axis sizes; ``sample * data == world_size``.
        rank, world_size: this process's global rank and the number of ranks.
        sample_group, data_group: the process group of this rank's sample group (ranks
            sharing its mini-batch) and data group, or ``None`` where the axis has size 1.
        world_group: the default group, or ``None`` for a one-process grid.
        mesh: the ``DeviceMesh`` with axes ``("data", "sample")`` (``None`` when local or
            for a virtual grid).
        device: the device this rank computes on.

    A grid built without process groups (``Grid(sample=2, data=3, rank=4)``) is *virtual*:
    it carries the arithmetic only, which is what samplers and tests need.
    """

    sample: int = 1
    data: int = 1
    rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    sample_group: Any = None
    data_group: Any = None
    world_group: Any = None
    mesh: Any = None

    def __post_init__(self) -> None:
        _check_axis("sample", self.sample)
        _check_axis("data", self.data)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int):
            raise TypeError(f"rank must be an int, got {type(self.rank).__name__}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"rank must be in [0, sample * data) = [0, {self.sample} * {self.data}) = "
                f"[0, {self.world_size}), got {self.rank}"
            )
        object.__setattr__(self, "device", torch.device(self.device))

    @property
    def world_size(self) -> int:
        return self.sample * self.data

    @property
    def sample_rank(self) -> int:
        """Position of this rank on the sample axis: it evaluates global samples
        ``[sample_rank * S / sample, (sample_rank + 1) * S / sample)``."""
        return self.rank % self.sample

    @property
    def data_rank(self) -> int:
        """Position of this rank on the data axis: the index of its data shard."""
        return self.rank // self.sample

    @property
    def mode(self) -> str:
        """``"local"``, ``"sp"``, ``"ddp"`` or ``"hybrid"`` (see the module docstring)."""
        if self.world_size == 1:
            return "local"
        if self.data == 1:
            return "sp"
        if self.sample == 1:
            return "ddp"
        return "hybrid"

    @property
    def is_virtual(self) -> bool:
        """True when the grid has more than one rank but no process groups."""
        return self.world_size > 1 and self.world_group is None

    def global_rank(self, sample_rank: int, data_rank: int) -> int:
        """The global rank at grid position ``(sample_rank, data_rank)``."""
        if not (0 <= sample_rank < self.sample and 0 <= data_rank < self.data):
            raise ValueError(
                f"grid position (sample_rank={sample_rank}, data_rank={data_rank}) is outside "
                f"the grid sample={self.sample} x data={self.data}"
            )
        return data_rank * self.sample + sample_rank

    def sample_group_ranks(self) -> list[int]:
        """Global ranks of this rank's sample group, in sample-rank order."""
        return [self.global_rank(s, self.data_rank) for s in range(self.sample)]

    def data_group_ranks(self) -> list[int]:
        """Global ranks of this rank's data group, in data-rank order."""
        return [self.global_rank(self.sample_rank, d) for d in range(self.data)]

    @classmethod
    def local(cls, device: torch.device | str | None = None) -> Grid:
        """A one-process grid (mode ``"local"``)."""
        return cls(device=torch.device("cpu") if device is None else torch.device(device))

    def __repr__(self) -> str:
        return (
            f"Grid(mode={self.mode!r}, sample={self.sample}, data={self.data}, rank={self.rank}, "
            f"sample_rank={self.sample_rank}, data_rank={self.data_rank}, device={self.device})"
        )


def _resolve_axes(sample: int | None, data: int | None, mode: str | None, world: int):
    """Axis sizes from the user's request; raises ``ValueError`` with the arithmetic."""
    if mode is not None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "local":
            if world != 1:
                raise ValueError(f"mode='local' needs a world size of 1, got {world}")
            sample, data = 1, 1
        elif mode == "sp":
            if sample not in (None, world) or data not in (None, 1):
                raise ValueError(
                    f"mode='sp' puts all {world} ranks on the sample axis, but sample={sample}, "
                    f"data={data} were requested"
                )
            sample, data = world, 1
        elif mode == "ddp":
            # data=1 is init's default, so only an explicit other value conflicts
            if sample not in (None, 1) or data not in (None, 1, world):
                raise ValueError(
                    f"mode='ddp' puts all {world} ranks on the data axis, but sample={sample}, "
                    f"data={data} were requested"
                )
            sample, data = 1, world
        elif sample is None and data in (None, 1):
            raise ValueError("mode='hybrid' needs the axis sizes: pass sample= and/or data=")
    if sample is None and data is None:
        sample, data = world, 1
    elif sample is None:
        data = _check_axis("data", data)
        if world % data:
            raise ValueError(
                f"data={data} does not divide the world size {world} "
                f"({world} % {data} = {world % data}); the sample axis would be {world}/{data}"
            )
        sample = world // data
    elif data is None:
        sample = _check_axis("sample", sample)
        if world % sample:
            raise ValueError(
                f"sample={sample} does not divide the world size {world} "
                f"({world} % {sample} = {world % sample})"
            )
        data = world // sample
    sample = _check_axis("sample", sample)
    data = _check_axis("data", data)
    if sample * data != world:
        raise ValueError(
            f"grid sample={sample} x data={data} = {sample * data} does not match the world "
            f"size {world}; choose sample * data == {world} (or pass None for one axis to "
            "infer it)"
        )
    if mode == "hybrid" and (sample == 1 or data == 1):
        raise ValueError(f"mode='hybrid' needs both axes > 1, got sample={sample} x data={data}")
    return sample, data


def _default_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def make_grid(
    sample: int | None = None,
    data: int | None = 1,
    *,
    mode: str | None = None,
    device: torch.device | str | None = None,
) -> Grid:
    """Build a grid on the already initialized default process group (or a local grid
    when ``torch.distributed`` is not initialized).

    Must be called by every rank with the same arguments (it creates sub-groups). Calling it
    again with the same axis sizes returns the same grid without new collectives.
    """
    if not (dist.is_available() and dist.is_initialized()):
        sample, data = _resolve_axes(sample, data, mode, 1)
        return Grid.local(device)
    world = dist.get_world_size()
    rank = dist.get_rank()
    sample, data = _resolve_axes(sample, data, mode, world)
    pg = dist.group.WORLD
    if _GRIDS_PG[0] is not pg:
        _GRIDS.clear()
        _GRIDS_PG[0] = pg
    cached = _GRIDS.get((sample, data))
    if cached is not None and (device is None or torch.device(device) == cached.device):
        return cached
    dev = _default_device() if device is None else torch.device(device)
    if world == 1:
        grid = Grid(device=dev, world_group=None)
    else:
        from torch.distributed.device_mesh import init_device_mesh

        # mesh[d, s] = d * sample + s: the layout documented above (contiguous sample groups)
        mesh = init_device_mesh(dev.type, (data, sample), mesh_dim_names=(DATA_AXIS, SAMPLE_AXIS))
        grid = Grid(
            sample=sample,
            data=data,
            rank=rank,
            device=dev,
            sample_group=mesh.get_group(SAMPLE_AXIS) if sample > 1 else None,
            data_group=mesh.get_group(DATA_AXIS) if data > 1 else None,
            world_group=pg,
            mesh=mesh,
        )
        # the mesh and our arithmetic must agree, or every slice of samples would be wrong
        coords = (mesh.get_local_rank(DATA_AXIS), mesh.get_local_rank(SAMPLE_AXIS))
        if coords != (grid.data_rank, grid.sample_rank):
            raise RuntimeError(
                f"device mesh placed rank {rank} at (data, sample) = {coords}, expected "
                f"({grid.data_rank}, {grid.sample_rank})"
            )
    _GRIDS[(sample, data)] = grid
    return grid


# ----------------------------------------------------------------------------- launch env


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as the launcher described it."""

    source: str  # "explicit", "torchrun", "slurm" or "local"
    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None = None
    master_port: int | None = None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list, e.g. ``"gpu[007-010,12],cpu1" -> "gpu007"``.

    Bracketed ranges keep their zero padding; each bracket group takes its first entry.
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("empty SLURM node list")
    depth = 0
    end = len(nodelist)
    for i, ch in enumerate(nodelist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            end = i
            break
    host = nodelist[:end]

    def first(match: re.Match[str]) -> str:
        return re.split(r"[,-]", match.group(1))[0]

    return re.sub(r"\[([^\]]*)\]", first, host)


def _env_int(env: dict[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None


def detect_launch_env(env: dict[str, str] | None = None) -> LaunchEnv:
    """Read rank and world size from torchrun's ``env://`` variables, else from SLURM's,
    else report a single local process. ``env`` defaults to ``os.environ``.

    torchrun wins when both are present (``srun torchrun ...``). Under SLURM the rendezvous
    host is the first node of ``SLURM_JOB_NODELIST`` and the port is ``MASTER_PORT`` if set,
    else ``10000 + SLURM_JOB_ID % 20000`` (the same on every task of the job).
    ``SLURM_STEP_NUM_TASKS`` (set by ``srun``) is preferred to ``SLURM_NTASKS`` so that a
    plain ``python`` in the batch script is not mistaken for task 0 of a larger step.
    """
    env = dict(os.environ) if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            source="torchrun",
            rank=_env_int(env, "RANK"),
            world_size=_env_int(env, "WORLD_SIZE"),
            local_rank=_env_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            master_addr=env.get("MASTER_ADDR"),
            master_port=_env_int(env, "MASTER_PORT") if "MASTER_PORT" in env else None,
        )
    ntasks_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    if "SLURM_PROCID" in env and ntasks_var in env:
        nodelist = (
            env.get("SLURM_STEP_NODELIST")
            or env.get("SLURM_JOB_NODELIST")
            or env.get("SLURM_NODELIST")
        )
        addr = env.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else None)
        if "MASTER_PORT" in env:
            port = _env_int(env, "MASTER_PORT")
        elif "SLURM_JOB_ID" in env:
            port = 10000 + _env_int(env, "SLURM_JOB_ID") % 20000
        else:
            port = _DEFAULT_PORT
        return LaunchEnv(
            source="slurm",
            rank=_env_int(env, "SLURM_PROCID"),
            world_size=_env_int(env, ntasks_var),
            local_rank=_env_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            master_addr=addr,
            master_port=port,
        )
    return LaunchEnv(source="local", rank=0, world_size=1, local_rank=0)


def _as_timedelta(timeout: float | datetime.timedelta | None) -> datetime.timedelta | None:
    if timeout is None or isinstance(timeout, datetime.timedelta):
        return timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return datetime.timedelta(seconds=float(timeout))


def init(
    sample: int | None = None,
    data: int | None = 1,
    *,
    mode: str | None = None,
    backend: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    local_rank: int | None = None,
    init_method: str | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    timeout: float | datetime.timedelta | None = None,
) -> Grid:
    """Initialize ``torch.distributed`` and return the ``sample x data`` grid.

    Args:
        sample, data: axis sizes. ``sample=None`` means ``world // data``; ``data=None``
            means ``world // sample``; both default to ``sample = world`` (mode ``sp``).
        mode: ``"local"``, ``"sp"``, ``"ddp"`` or ``"hybrid"``; sets the axes of the first
            three (``ddp`` is ``sample=1, data=world``).
        backend: default NCCL when CUDA is available, else gloo.
        rank, world_size, local_rank, init_method, master_addr, master_port: explicit
            placement; otherwise read from torchrun's or SLURM's environment variables (see
            :func:`detect_launch_env`). Without any of them the job is one local process and
            ``torch.distributed`` is left uninitialized.
        timeout: seconds (or ``timedelta``) after which a collective that some rank never
            joins raises instead of hanging.

    With NCCL the process binds ``cuda:local_rank``. When ``torch.distributed`` is already
    initialized, the existing default group is used and only the grid is built.
    """
    td = _as_timedelta(timeout)
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        if world_size is not None and world_size != world:
            raise ValueError(
                f"torch.distributed is already initialized with world size {world}, "
                f"but world_size={world_size} was requested"
            )
        return make_grid(sample, data, mode=mode)

    if rank is not None or world_size is not None or init_method is not None:
        if world_size is None or rank is None:
            raise ValueError("explicit placement needs both rank= and world_size=")
        launch = LaunchEnv("explicit", rank, world_size, local_rank or 0, master_addr, master_port)
    else:
        launch = detect_launch_env()
        if local_rank is not None:
            launch = LaunchEnv(
                launch.source,
                launch.rank,
                launch.world_size,
                local_rank,
                launch.master_addr,
                launch.master_port,
            )
    if launch.world_size < 1 or not 0 <= launch.rank < launch.world_size:
        raise ValueError(
            f"rank must be in [0, world_size), got rank={launch.rank}, "
            f"world_size={launch.world_size} (from {launch.source})"
        )
    # validate the grid before any rendezvous, so a wrong grid fails fast on every rank
    _resolve_axes(sample, data, mode, launch.world_size)

    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = torch.device("cpu")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("backend='nccl' needs CUDA, which is not available")
        n_gpu = torch.cuda.device_count()
        if n_gpu == 1:
            index = 0  # the launcher bound one GPU per task (e.g. SLURM --gpu-bind)
        elif launch.local_rank < n_gpu:
            index = launch.local_rank
        else:
            raise ValueError(
                f"local rank {launch.local_rank} has no GPU: this process sees {n_gpu}; "
                "launch at most one task per visible GPU"
            )
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)

    if launch.world_size == 1 and launch.source == "local" and init_method is None:
        return Grid.local(device)

    if init_method is None:
        addr = master_addr or launch.master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = master_port or launch.master_port or int(os.environ.get("MASTER_PORT", 0) or 0)
        if not port:
            port = _DEFAULT_PORT
        init_method = f"tcp://{addr}:{port}"
    kwargs: dict[str, Any] = {}
    if td is not None:
        kwargs["timeout"] = td
    if backend == "nccl":
        kwargs["device_id"] = device  # eager NCCL init, bound to our GPU
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=launch.rank,
        world_size=launch.world_size,
        **kwargs,
    )
    return make_grid(sample, data, mode=mode, device=device)


def shutdown() -> None:
    """Destroy the default process group (if any) and forget the cached grids."""
    _GRIDS.clear()
    _GRIDS_PG[0] = None
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as exc:  # teardown must not mask the error that led here
            warnings.warn(f"destroy_process_group failed: {exc}", stacklevel=2)
