"""Multi-process training with ``torchrun``: process-group setup from the environment and the few collectives the loops use.

:func:`~cstar_fx.robust.finetune`, :func:`~cstar_fx.robust.cstar` and :func:`~cstar_fx.robust.evaluate`
detect an initialised process group and then shard the data, wrap the model in
``DistributedDataParallel`` and reduce their metrics; this module starts that group from the
variables ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``)
and holds the helpers they share. Outside ``torchrun`` every helper is a single-process no-op, so
the same script runs with ``python`` or ``torchrun --nproc-per-node N``.

Example:
    >>> with process_group() as w:   # under torchrun: nccl on CUDA, gloo on the CPU; else nothing
    ...     w.size, w.rank, w.is_main
    (1, 0, True)
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn
from ..errors import CstarRuntimeError, CstarValueError

__all__ = ["World", "world", "init_from_env", "process_group", "is_main_process", "barrier", "all_reduce_sum",
           "broadcast_object", "rank0_first", "local_device"]

T = TypeVar("T")
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """Where this process stands: ``rank`` of ``size`` processes, ``local_rank`` on its node.

    ``active`` is True when there are several processes, i.e. when the loops shard and reduce.

    Example:
        >>> World(1, 4, 1).active, World(0, 1, 0).is_main
        (True, True)
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        """More than one process: data is sharded, gradients and metrics are reduced."""
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0, the one that writes checkpoints, logs and reports."""
        return self.rank == 0


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def world(enabled: bool | None = None) -> World:
    """The current :class:`World`: the initialised process group's, or a single process.

    ``enabled=False`` always answers a single process (train alone although a group exists);
    ``enabled=True`` requires an initialised group.

    Example:
        >>> world().size
        1
    """
    if enabled is False or (enabled is None and not _initialised()):
        return World()
    if not _initialised():
        raise CstarRuntimeError("distributed=True needs an initialised torch.distributed process group; launch with "
                                "torchrun and call cstar_fx.robust.init_from_env() (or use process_group()) first")
    rank, size = dist.get_rank(), dist.get_world_size()
    return World(rank, size, int(os.environ.get("LOCAL_RANK", rank)))


def init_from_env(backend: str | None = None, *, timeout_s: float | None = None) -> World:
    """Initialise ``torch.distributed`` from ``torchrun``'s environment variables; a no-op outside ``torchrun``.

    ``backend`` defaults to ``"nccl"`` when CUDA is available (each process then uses GPU
    ``LOCAL_RANK``) and ``"gloo"`` otherwise. An already initialised group is kept as it is.
    ``timeout_s`` bounds how long a collective waits for a missing rank (torch's default otherwise).

    Example:
        >>> init_from_env().size   # plain python: nothing to initialise
        1
    """
    if _initialised():
        return world()
    if not all(k in os.environ for k in _ENV):
        return World()
    if not dist.is_available():
        raise CstarRuntimeError("this torch build has no torch.distributed; install a build with distributed support")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    kwargs: dict[str, Any] = {}
    if timeout_s is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise CstarRuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s); "
                                    "lower --nproc-per-node to the number of GPUs")
        torch.cuda.set_device(local_rank)
        kwargs["device_id"] = torch.device("cuda", local_rank)
    dist.init_process_group(backend, **kwargs)
    return world()


@contextlib.contextmanager
def process_group(backend: str | None = None, *, timeout_s: float | None = None) -> Iterator[World]:
    """:func:`init_from_env` for the ``with`` block, destroying the group at the end if the block created it.

    Example:
        >>> with process_group() as w:
        ...     w.active
        False
    """
    created = not _initialised()
    w = init_from_env(backend, timeout_s=timeout_s)
    try:
        yield w
    finally:
        if created and _initialised():
            dist.destroy_process_group()


def is_main_process() -> bool:
    """True on rank 0 (and in a single process).

    Example:
        >>> is_main_process()
        True
    """
    return world().is_main


def _comm_device() -> torch.device:
    # NCCL moves only CUDA tensors; gloo works on the host.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every rank reaches this point (nothing in a single process).

    Example:
        >>> barrier()
    """
    if not world().active:
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """The element-wise sum of ``values`` over all ranks, in float64 (``values`` itself in a single process).

    Example:
        >>> all_reduce_sum([1.0, 2.5])
        [1.0, 2.5]
    """
    if not world().active:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def min_max(value: int) -> tuple[int, int]:
    """``(min, max)`` of an integer over all ranks."""
    if not world().active:
        return value, value
    t = torch.tensor([value, -value], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(-t[1]), int(t[0])


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (picklable objects; ``obj`` itself in a single process).

    Example:
        >>> broadcast_object({"out": "runs/1"})
        {'out': 'runs/1'}
    """
    if not world().active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device() if dist.get_backend() == "nccl" else None)
    return box[0]


def broadcast_tensors(tensors: Sequence[torch.Tensor], src: int = 0) -> list[torch.Tensor]:
    """Rank ``src``'s tensors on every rank (same shapes and dtypes expected everywhere); returns contiguous copies."""
    out = [t.contiguous() for t in tensors]
    if world().active:
        for t in out:
            dist.broadcast(t, src=src)
    return out


def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (batch-norm running statistics) into ``model`` on every rank, in place."""
    if not world().active:
        return
    for buf in model.buffers():
        (t,) = broadcast_tensors([buf], src)
        if t is not buf:
            buf.copy_(t)


@contextlib.contextmanager
def rank0_first() -> Iterator[None]:
    """Rank 0 runs the block first, the others after it (e.g. a dataset extracted and cached once, then read).

    Example:
        >>> with rank0_first():
        ...     pass
    """
    w = world()
    if w.active and not w.is_main:
        barrier()
    yield
    if w.active and w.is_main:
        barrier()


def local_device(device: str | torch.device) -> torch.device:
    """``device``, with a CUDA device pinned to this process's GPU (``LOCAL_RANK``) when several processes run.

    Example:
        >>> local_device("cpu")
        device(type='cpu')
    """
    device = torch.device(device)
    w = world()
    if device.type == "cuda" and w.active:
        return torch.device("cuda", w.local_rank)
    return device


def rank_seed(seed: int, rank: int) -> int:
    """A seed for ``rank``'s private random stream: ``seed`` itself on rank 0, a distinct one elsewhere."""
    return seed if rank == 0 else (seed * 1_000_003 + rank * 0x9E3779B97F4A7C15) % (2**63)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` on ``device`` (its constructor broadcasts rank 0's weights and buffers)."""
    from torch.nn.parallel import DistributedDataParallel

    if not any(p.requires_grad for p in model.parameters()):
        raise CstarValueError("the model has no trainable parameters to train with DistributedDataParallel")
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)
