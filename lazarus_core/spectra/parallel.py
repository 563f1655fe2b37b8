"""Per-expert work of the spectra engine on every CPU core, or batched on an accelerator.

CPU (``device="cpu"``): the experts of one projection are spread over ``workers`` threads, each running
its expert's decode, float64 Gram and eigensolve single-threaded (torch's thread count is 1 for the whole
pass; it is process-global, and every worker sees it). Many-threaded LAPACK (the tridiagonalisation of
``eigvalsh`` / ``eigh``) spin-waits on a busy machine (linalg.py docstring: 7.1 s on 2 threads vs 0.49 s
on 1 for a 1024 x 1024 Gram, measured here at load ~10); one-thread calls in parallel threads never wait
on each other, and the Gram GEMM of one expert overlaps the eigensolve of the next. The stored experts
are read by the calling thread (in order; the checkpoint reader is not shared across threads), decoded
by the worker into its own reused delta buffer, and results are yielded in expert order, so every sum
over experts runs in the serial order: the results are the serial path's, expert by expert.
Memory: ``workers + 1`` decoded deltas (plus one stored expert per queued task) instead of one.

Accelerator (``device="cuda"`` or any non-CPU torch device): deltas are decoded on the CPU (the decode
kernels are CPU ones), copied into a ``[batch, out, in]`` float32 buffer on the device, and the batch's
float64 Grams and eigensolves run there in one call each (``torch.bmm`` / ``torch.linalg.eigvalsh`` on
``[batch, r, r]``: cuBLAS / cuSOLVER). float64 where the rank needs it: the Gram and the eigensolve (as on
the CPU: a float32 Gram perturbs the energy curve by ~1e-6 of the total, enough to flip a rank at a
threshold); the deltas stay float32 (they are exact differences of the decoded float32 experts). The same
batched functions run on CPU tensors (the tests check them against the per-expert path there).
"""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator, Sequence, TypeVar

import torch

from lazarus_core.models.checkpoint import MoeCheckpoint
from lazarus_core.spectra.linalg import GRAM_CHUNK, SMALL_MATRIX, one_thread, singular_values, spectrum_and_factors

R = TypeVar("R")
DEVICE_BATCH_BYTES = 1 << 30  # float32 delta bytes per device batch (the float64 Grams add ~r^2 * 8 each)


def cpu_cores() -> int:
    """Cores this process may run on (``os.sched_getaffinity`` where it exists)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


_DEFAULT: dict = {"device": "cpu", "workers": None}  # the process default: use_device (the CLI's --device)


def use_device(device: str | torch.device | None = None, workers: int | None = None) -> None:
    """Set the process default placement of the engine's per-expert work (what ``device=None`` /
    ``workers=None`` mean in :func:`delta_spectra`, :func:`low_rank_parts` and everything above them:
    ``projection_spectrum``, ``overlay_base``, ``analyze_moe_type``, ``compute_spectra``, ``write_overlay``).
    The CLI's ``--device`` calls it once per command.

    Raises
    ------
    ValueError
        As :func:`resolve_device`, or ``workers < 1``.
    """
    resolved = resolve_device("cpu" if device is None else device)
    if workers is not None and int(workers) < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    _DEFAULT.update(device=str(resolved), workers=workers)


def resolve_workers(workers: int | None, shape: Sequence[int]) -> int:
    """Worker threads for a projection of ``shape``: ``workers`` if given (>= 1), else the :func:`use_device`
    default, else every core for matrices of at least :data:`SMALL_MATRIX` elements and 1 below (thread
    hand-offs dominate there)."""
    workers = workers if workers is not None else _DEFAULT["workers"]
    if workers is not None:
        if int(workers) < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        return int(workers)
    return cpu_cores() if shape[0] * shape[1] >= SMALL_MATRIX else 1


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``torch.device`` of ``device`` (None -> the :func:`use_device` default, "cpu" unless set); a CUDA device
    must be available.

    Raises
    ------
    ValueError
        ``device`` is not a torch device name, or names CUDA without one available.
    """
    try:
        dev = torch.device(_DEFAULT["device"] if device is None else device)
    except RuntimeError:
        raise ValueError(f"--device must be a torch device such as 'cpu' or 'cuda', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available to torch here")
    return dev


def map_deltas(ckpt: MoeCheckpoint, layer: int, projection: str, base: torch.Tensor,
               fn: Callable[[int, torch.Tensor], R], *, backend: str = "auto", workers: int = 1
               ) -> Iterator[tuple[int, R]]:
    """Yield ``(expert, fn(expert, delta_e))`` for every expert in order, ``delta_e = W_e - base`` fp32
    ``[out, in]``, with ``fn`` running in ``workers`` single-threaded worker threads.

    ``delta_e`` is a buffer of the worker (reused for its next expert): ``fn`` must not keep it. With
    ``workers == 1`` everything runs in the calling thread at the caller's thread count (the serial path).

    Parameters
    ----------
    ckpt, layer, projection
        The projection whose experts are read.
    base : torch.Tensor
        fp32 ``[out, in]`` on the CPU.
    fn : callable
        ``fn(expert, delta) -> result``; runs with one torch thread when ``workers > 1``.
    backend : str
        Kernel backend of the fused decode.
    workers : int
        Worker threads (>= 1).
    """
    if workers <= 1:
        from lazarus_core.spectra.deltas import iter_deltas  # deltas.py imports this module

        for e, delta in iter_deltas(ckpt, layer, projection, base, backend=backend):
            yield e, fn(e, delta)
        return
    local = threading.local()

    def task(e: int, encoded) -> R:
        delta = getattr(local, "delta", None)
        if delta is None:
            delta = local.delta = torch.empty_like(base)
        encoded.axpby(base, alpha=1.0, beta=-1.0, out=delta, backend=backend)
        return fn(e, delta)

    pending: deque[tuple[int, Future]] = deque()
    with one_thread(), ThreadPoolExecutor(max_workers=workers, thread_name_prefix="spectra") as pool:
        try:
            for e in range(ckpt.num_experts):
                pending.append((e, pool.submit(task, e, ckpt.encoded_expert(layer, projection, e))))
                if len(pending) > workers:  # keep every worker busy, at most one stored expert queued each
                    done, future = pending.popleft()
                    yield done, future.result()
            while pending:
                done, future = pending.popleft()
                yield done, future.result()
        finally:
            for _, future in pending:
                future.cancel()


def device_batch(shape: Sequence[int], num_experts: int, batch: int | None = None) -> int:
    """Experts per device batch: ``batch`` if given, else as many as fit :data:`DEVICE_BATCH_BYTES` of float32
    deltas (at least 1, at most ``num_experts``)."""
    if batch is not None:
        if int(batch) < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        return min(int(batch), max(1, num_experts))
    return max(1, min(num_experts, DEVICE_BATCH_BYTES // (4 * shape[0] * shape[1])))


def iter_delta_batches(ckpt: MoeCheckpoint, layer: int, projection: str, base: torch.Tensor, *,
                       device: torch.device, batch: int, backend: str = "auto"
                       ) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield ``(experts, deltas)``: ``deltas`` fp32 ``[len(experts), out, in]`` on ``device``,
    ``deltas[i] = W_experts[i] - base``, decoded on the CPU; the device buffer is reused (consume each batch
    before the next)."""
    out_dim, in_dim = base.shape
    buffer = torch.empty(batch, out_dim, in_dim, dtype=torch.float32, device=device)
    delta = torch.empty_like(base)
    experts: list[int] = []
    for e in range(ckpt.num_experts):
        ckpt.encoded_expert(layer, projection, e).axpby(base, alpha=1.0, beta=-1.0, out=delta, backend=backend)
        buffer[len(experts)].copy_(delta, non_blocking=False)
        experts.append(e)
        if len(experts) == batch:
            yield experts, buffer
            experts = []
    if experts:
        yield experts, buffer[:len(experts)]


def gram_batched(deltas: torch.Tensor) -> torch.Tensor:
    """float64 Grams of the smaller side of each delta of a batch, on the batch's device.

    Parameters
    ----------
    deltas : torch.Tensor
        ``[b, out, in]`` floating point, any device.

    Returns
    -------
    torch.Tensor
        float64 ``[b, r, r]``, ``r = min(out, in)``: ``d @ d^T`` if ``out <= in`` else ``d^T @ d``, accumulated
        over column chunks of :data:`GRAM_CHUNK` copied to float64 (no float64 copy of the batch).
    """
    x = deltas if deltas.shape[1] <= deltas.shape[2] else deltas.transpose(1, 2)
    b, r, n = x.shape
    g = torch.zeros(b, r, r, dtype=torch.float64, device=x.device)
    scratch = torch.empty(b, r, min(GRAM_CHUNK, n), dtype=torch.float64, device=x.device)
    for start in range(0, n, GRAM_CHUNK):
        part = scratch[:, :, :min(GRAM_CHUNK, n - start)]
        part.copy_(x[:, :, start:start + part.shape[2]])
        g.baddbmm_(part, part.transpose(1, 2))
    return g


def singular_values_batched(deltas: torch.Tensor) -> torch.Tensor:
    """float64 ``[b, min(out, in)]`` singular values (each row descending) of a ``[b, out, in]`` batch, from
    its float64 Grams and one batched ``eigvalsh``, on the batch's device."""
    eig = torch.linalg.eigvalsh(gram_batched(deltas))
    return eig.flip(-1).clamp_min_(0.0).sqrt_()


def spectra_and_factors_batched(deltas: torch.Tensor, rank_of: Callable[[int, torch.Tensor], int]
                                ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per delta of a batch, ``(singular, A, B)`` as :func:`lazarus_core.spectra.spectrum_and_factors` (one
    batched ``eigh``): ``A @ B`` the truncated SVD at ``r_i = rank_of(i, singular_i)``.

    Parameters
    ----------
    deltas : torch.Tensor
        ``[b, out, in]`` floating point, any device.
    rank_of : callable
        ``rank_of(index in batch, float64 [min(out, in)] descending singular values on the CPU) -> r``.

    Returns
    -------
    list of tuple
        ``b`` tuples of float64 CPU tensors ``singular [min(out, in)]``, ``A [out, r_i]``, ``B [r_i, in]``.
    """
    values, vectors = torch.linalg.eigh(gram_batched(deltas))
    singular = values.flip(-1).clamp_min_(0.0).sqrt_().cpu()
    wide = deltas.shape[1] <= deltas.shape[2]
    n_small = values.shape[-1]
    out = []
    for i in range(deltas.shape[0]):
        r = int(rank_of(i, singular[i]))
        top = vectors[i, :, n_small - r:].flip(1)  # [small, r] float64 on the device
        x = deltas[i] if wide else deltas[i].T
        projected = top.T @ x.double() if r else torch.empty(0, x.shape[1], dtype=torch.float64, device=x.device)
        a, b = (top, projected) if wide else (projected.T, top.T)
        out.append((singular[i], a.contiguous().cpu(), b.contiguous().cpu()))
    return out


def dots_batched(deltas: torch.Tensor, base: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """float64 ``[b]``: ``<delta_i, base>`` of a ``[b, out, in]`` batch and an ``[out, in]`` base on its device,
    over float64 column chunks of ``chunk`` elements (no float64 copy of the batch)."""
    x, y = deltas.reshape(deltas.shape[0], -1), base.reshape(-1)
    acc = torch.zeros(deltas.shape[0], dtype=torch.float64, device=deltas.device)
    for s in range(0, y.numel(), chunk):
        acc += x[:, s:s + chunk].double() @ y[s:s + chunk].double()
    return acc


def delta_spectra(ckpt: MoeCheckpoint, layer: int, projection: str, base: torch.Tensor,
                  dot: Callable[[torch.Tensor], float], *, backend: str = "auto",
                  device: str | torch.device | None = None, workers: int | None = None, batch: int | None = None
                  ) -> Iterator[tuple[torch.Tensor, float]]:
    """Per expert in order: ``(singular values of W_e - base, <W_e - base, base>)``.

    Parameters
    ----------
    ckpt, layer, projection, backend
        As :func:`map_deltas`.
    base : torch.Tensor
        fp32 ``[out, in]`` on the CPU.
    dot : callable
        ``dot(delta) -> float``, the float64 ``<delta, base>`` of the CPU path (the device path computes it
        with :func:`dots_batched`).
    device, workers, batch
        CPU with ``workers`` threads (:func:`resolve_workers`), or batched on ``device`` (or on the CPU when
        ``batch`` is given) with ``batch`` experts per call (:func:`device_batch`).

    Yields
    ------
    tuple
        float64 ``[min(out, in)]`` descending on the CPU, and a float.
    """
    dev = resolve_device(device)
    if dev.type == "cpu" and batch is None:
        n = resolve_workers(workers, base.shape)
        for _, result in map_deltas(ckpt, layer, projection, base, lambda _, d: (singular_values(d), dot(d)),
                                    backend=backend, workers=n):
            yield result
        return
    base_on = base.to(dev)
    for _, deltas in iter_delta_batches(ckpt, layer, projection, base, device=dev, backend=backend,
                                        batch=device_batch(base.shape, ckpt.num_experts, batch)):
        yield from zip(singular_values_batched(deltas).cpu(), dots_batched(deltas, base_on).cpu().tolist())


def low_rank_parts(ckpt: MoeCheckpoint, layer: int, projection: str, base: torch.Tensor,
                   rank_of: Callable[[int, torch.Tensor], int], *, backend: str = "auto",
                   device: str | torch.device | None = None, workers: int | None = None, batch: int | None = None
                   ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Per expert in order: ``(expert, A, B)``, the truncated SVD of ``W_e - base`` at the rank
    ``rank_of(expert, singular values)`` chooses (float64 CPU ``[out, r]`` and ``[r, in]``); placement as
    :func:`delta_spectra`."""
    dev = resolve_device(device)
    if dev.type == "cpu" and batch is None:
        n = resolve_workers(workers, base.shape)
        for e, (a, b) in map_deltas(ckpt, layer, projection, base,
                                    lambda e, d: spectrum_and_factors(d, lambda sv: rank_of(e, sv))[1:],
                                    backend=backend, workers=n):
            yield e, a, b
        return
    for experts, deltas in iter_delta_batches(ckpt, layer, projection, base, device=dev, backend=backend,
                                              batch=device_batch(base.shape, ckpt.num_experts, batch)):
        parts = spectra_and_factors_batched(deltas, lambda i, sv: rank_of(experts[i], sv))
        for e, (_, a, b) in zip(experts, parts):
            yield e, a, b
