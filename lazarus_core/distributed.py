"""torch.distributed for the whole-model jobs: who this process is, what share of the work is its, and
how results reach rank 0. No scheduler of our own: ``torchrun`` starts the ranks and sets the rendezvous
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` or ``--rdzv-endpoint`` for several machines);
this module joins that process group (gloo on CPU, NCCL when the job runs on CUDA devices).

A single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) is world size 1 and every helper is a no-op, so
library code calls them unconditionally.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import torch


@dataclass(frozen=True)
class World:
    """This process's place in the job.

    Attributes
    ----------
    rank : int
        0-based; rank 0 writes the results.
    world_size : int
        Number of processes (1 without torchrun).
    backend : str or None
        ``"gloo"`` or ``"nccl"`` when a process group is up, else None.
    """

    rank: int = 0
    world_size: int = 1
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""
        if self.distributed:
            torch.distributed.barrier()

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` (picklable) on rank 0, in rank order; None on the other ranks."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size if self.is_root else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.is_root else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def all_ok(self, ok: bool, error: str = "") -> list[str]:
        """Gather every rank's (ok, error) to all ranks; returns the errors of the ranks that failed, as
        ``"rank R: error"`` (empty when all succeeded). Lets every rank stop together instead of hanging
        in a collective that a failed rank never reaches."""
        if not self.distributed:
            return [] if ok else [f"rank 0: {error}"]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, (bool(ok), str(error)))
        return [f"rank {r}: {e}" for r, (good, e) in enumerate(out) if not good]


def current_world(device: str | torch.device | None = None) -> World:
    """The World of this process, joining torchrun's process group on first use.

    Parameters
    ----------
    device : str or torch.device, optional
        Where the job computes: NCCL for CUDA devices, gloo otherwise.

    Raises
    ------
    RuntimeError
        ``WORLD_SIZE > 1`` without ``RANK`` (not started by torchrun or an equivalent launcher).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_size <= 1:
        return World()
    if "RANK" not in os.environ:
        raise RuntimeError("WORLD_SIZE is set but RANK is not: start distributed jobs with torchrun "
                           "(torchrun --nproc-per-node N --no-python lazarus ...)")
    dist = torch.distributed
    if not dist.is_initialized():
        cuda = device is not None and torch.device(device).type == "cuda"
        backend = "nccl" if cuda and dist.is_nccl_available() else "gloo"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return World(rank=dist.get_rank(), world_size=dist.get_world_size(), backend=dist.get_backend())


def close_world(*, failed: bool = False) -> None:
    """Leave the process group joined by :func:`current_world` (a no-op when none is up).

    Call once the job's last collective is done, before the process exits: a gloo group left to the
    interpreter's shutdown can abort the process (``terminate called without an active exception``)
    when its worker threads are torn down after the runtime they use.

    Parameters
    ----------
    failed : bool
        The job ended with an error. Leaving a gloo group is local and always done; an NCCL group is then
        left to the launcher, since its shutdown can wait on peers still inside a collective.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    if failed and dist.get_backend() == "nccl":
        return
    dist.destroy_process_group()


def split_contiguous(weights: Sequence[float], parts: int) -> list[range]:
    """Cut items ``0..n-1`` into ``parts`` contiguous ranges of about equal total weight, in order.

    Parameters
    ----------
    weights : sequence of float
        ``[n]`` non-negative cost of each item (e.g. tokens per document).
    parts : int
        Number of ranges (>= 1); ranges may be empty when there are fewer items than parts.

    Returns
    -------
    list of range
        ``parts`` ranges covering ``range(n)`` in order.
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    n = len(weights)
    total = float(sum(weights))
    bounds, acc, item = [0], 0.0, 0
    for p in range(1, parts):
        target = total * p / parts
        while item < n and acc + float(weights[item]) / 2 <= target:  # an item goes where most of it lies
            acc += float(weights[item])
            item += 1
        bounds.append(item)
    bounds.append(n)
    return [range(bounds[i], bounds[i + 1]) for i in range(parts)]


def use_local_gpu() -> None:
    """Make ``"cuda"`` mean this rank's GPU, ``cuda:LOCAL_RANK`` (one rank per GPU under torchrun), when CUDA is
    available; a no-op otherwise. For jobs whose process group was joined before the device was known."""
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())


class RankFailed(RuntimeError):
    """A rank of a distributed job failed; raised on every rank, naming each failed rank and its error."""


_T = TypeVar("_T")


def on_every_rank(world: World, what: str, fn: Callable[[], _T]) -> _T:
    """``fn()`` on this rank, then agree with the others: when any rank raised, every rank raises
    :class:`RankFailed` (``"WHAT failed: rank R: error; ..."``) instead of hanging in a later collective.
    In one process the error of ``fn`` propagates unchanged."""
    try:
        result = fn()
    except Exception as exc:
        if not world.distributed:
            raise
        raise RankFailed(f"{what} failed: " + "; ".join(world.all_ok(False, f"{type(exc).__name__}: {exc}"))) from exc
    failed = world.all_ok(True)
    if failed:
        raise RankFailed(f"{what} failed: " + "; ".join(failed))
    return result


def assign_round_robin(items: Sequence[int], parts: int) -> dict[int, list[int]]:
    """``{rank: [items...]}`` dealing ``items`` (e.g. MoE layers, all of about equal cost) in turn."""
    return {r: list(items[r::parts]) for r in range(parts)}


__all__ = ["RankFailed", "World", "assign_round_robin", "close_world", "current_world", "on_every_rank", "split_contiguous", "use_local_gpu"]
