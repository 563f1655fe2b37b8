"""The machine's measured memory floors, and the check that no benchmark row beats its floor.

A floor is the least time the op could take on this machine. Three bandwidths are measured, each as
its best (not typical) kernel: a streaming READ (the faster of a multi-threaded AVX2 sum and BLAS's
matrix-vector product over the same buffer), a streaming WRITE with
non-temporal stores (which skip the read-for-ownership a normal store pays), and a COPY with
non-temporal stores. An op that reads ``R`` bytes and writes ``W`` bytes cannot take less than
``max(R / read, W / write, (R + W) / copy)``: each term is a resource it must use, and the reads and
writes may overlap. The older figure, ``dst.copy_(src)`` (normal stores: every written line is read
first), understates what a kernel with streaming stores reaches: MXFP4 decode was reported at 171% of it.

On a GPU the probes are ``sum`` (read), ``fill_`` (write) and ``copy_`` (copy) on device buffers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from benchmarks.harness import median_seconds

DEFAULT_BYTES = 1 << 30  # far larger than any cache here
READ_PREFETCH_POLICIES = (0, 1, 2, 3)  # _C.stream_read's prefetch: none, L1, L1 + L2, the kernels' (membench.h)


@dataclass
class MemoryFloors:
    """Measured bytes per second. ``copy`` counts bytes read + bytes written."""

    read: float
    write: float
    copy: float
    device: str = "cpu"
    read_prefetch: int | None = None  # the stream_read prefetch policy that gave ``read`` (CPU only)

    def seconds(self, read_bytes: int, write_bytes: int = 0) -> float:
        """Least time to read ``read_bytes`` and write ``write_bytes`` (see the module docstring)."""
        return max(read_bytes / self.read, write_bytes / self.write, (read_bytes + write_bytes) / self.copy)

    def bound(self, read_bytes: int, write_bytes: int = 0) -> str:
        """Which bandwidth sets :meth:`seconds` (``"read"``, ``"write"`` or ``"copy"``), for the table."""
        terms = {"read": read_bytes / self.read, "write": write_bytes / self.write,
                 "copy": (read_bytes + write_bytes) / self.copy}
        return max(terms, key=terms.get)

    def to_dict(self) -> dict:
        return {"read_gb_s": self.read / 1e9, "write_nt_gb_s": self.write / 1e9, "copy_nt_gb_s": self.copy / 1e9,
                "floor_device": self.device, "read_prefetch": self.read_prefetch}


def measure_memory_floors(n_bytes: int = DEFAULT_BYTES, device: str = "cpu", repeats: int = 7) -> MemoryFloors:
    """Measure the read, non-temporal write and non-temporal copy bandwidths on ``n_bytes`` buffers."""
    n = n_bytes // 4
    if device == "cpu":
        from lazarus_core import _C

        ones = torch.ones(n, dtype=torch.float32)
        src, dst = ones.numpy(), torch.empty(n, dtype=torch.float32).numpy()
        # The read floor is the faster of two readers of the same bytes: our AVX2 sum, and BLAS's matrix-vector
        # product (torch.mv on the buffer as [n / 4096, 4096]), which streams 3-10 % faster on some hosts; a
        # floor from the slower one alone was beaten by transformers' GEMVs (105-110 %).
        cols = 4096 if n % 4096 == 0 else 1
        mat, vec = ones.view(-1, cols), torch.ones(cols)
        out = torch.empty(mat.shape[0])
        # Our sum runs under every software-prefetch policy (which is fastest depends on the CPU: L1 + L2 on the
        # Intel host, none on AMD Zen 3) and the best is kept, with the policy, so that same-round probes reuse it.
        by_policy = {p: median_seconds(lambda p=p: _C.stream_read(src, prefetch=p), repeats=repeats)
                     for p in READ_PREFETCH_POLICIES}
        read_prefetch = min(by_policy, key=by_policy.get)
        read = n_bytes / min(by_policy[read_prefetch],
                             median_seconds(lambda: torch.mv(mat, vec, out=out), repeats=repeats))
        write = n_bytes / median_seconds(lambda: _C.stream_fill(dst, 1.0), repeats=repeats)
        copy = 2 * n_bytes / median_seconds(lambda: _C.stream_copy(src, dst), repeats=repeats)
    else:
        src = torch.ones(n, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        kw = {"repeats": repeats, "cuda_events": True}
        read = n_bytes / median_seconds(lambda: src.sum(), **kw)
        write = n_bytes / median_seconds(lambda: dst.fill_(1.0), **kw)
        copy = 2 * n_bytes / median_seconds(lambda: dst.copy_(src), **kw)
        read_prefetch = None
    return MemoryFloors(read=read, write=write, copy=copy, device=device, read_prefetch=read_prefetch)


def measure_matmul_rate(m: int, k: int, n: int, *, device: str = "cpu", repeats: int = 10) -> float:
    """fp32 FLOP/s (2 per multiply-add) of ``torch.mm`` on ``[m, k] @ [k, n]``: the compute floor of a GEMM-bound
    op, measured at the op's own largest product in the same run."""
    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    out = torch.empty(m, n, device=device)
    return 2 * m * k * n / median_seconds(lambda: torch.mm(a, b, out=out), repeats=repeats, cuda_events=device != "cpu")


def measure_int8_dot_rate(repeats: int = 7, iters: int = 1 << 21) -> float | None:
    """u8 x s8 multiply-adds per second of the CPU's dot instruction (zmm ``vpdpbusd`` with AVX-512 VNNI, else
    ymm AVX-VNNI, else ymm ``vpmaddubsw`` with AVX2 alone) on every thread, 12 independent chains each: the
    compute floor of the integer MXFP4 kernels, which no integer kernel can beat. None where the CPU has none of
    them."""
    from lazarus_core import _C

    if _C.int8_dot_loop(1) == 0:
        return None
    macs = _C.int8_dot_loop(iters)
    return macs / median_seconds(lambda: _C.int8_dot_loop(iters), repeats=repeats)


class FloorExceeded(RuntimeError):
    """A benchmark row reports more than 100% of its floor: the floor (or the byte count) is wrong."""


def check_floors(suite: str, rows) -> None:
    """Raise :class:`FloorExceeded` naming every row of ``suite`` above 100% of its floor, and every row its suite
    marked as beating a floor of its own (``extra["floor_exceeded"]``: the message; e.g. overlay_moe's read floor
    probed in the same rounds).

    Parameters
    ----------
    suite : str
    rows : iterable of benchmarks.harness.BenchRow
    """
    rows = list(rows)
    bad = [f"{r.op}/{r.backend} {r.shape} {r.dtype}: {r.pct_of_floor:.0f}%" for r in rows
           if r.pct_of_floor is not None and r.pct_of_floor > 100.0]
    bad += [f"{r.op}/{r.backend} {r.shape}: {r.extra['floor_exceeded']}" for r in rows if r.extra.get("floor_exceeded")]
    if bad:
        raise FloorExceeded(f"{suite}: {len(bad)} row(s) above 100% of their floor, a benchmark bug "
                            f"(the floor does not bound the op): {'; '.join(bad)}")


__all__ = ["MemoryFloors", "FloorExceeded", "check_floors", "measure_int8_dot_rate", "measure_matmul_rate",
           "measure_memory_floors"]
