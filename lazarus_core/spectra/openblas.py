"""numpy's OpenBLAS as the float64 dense backend of the spectra engine on the CPU: the Gram update
(``dsyrk``) and the symmetric eigensolve (LAPACK ``dsyevd`` through ``numpy.linalg``).

Why: on this CPU (AMD EPYC, 2 vCPUs) torch's MKL runs the engine's float64 kernels markedly slower than the
OpenBLAS numpy ships. Measured on one thread, best of 5 (two interleaved runs for the eigensolve):

==============================================  =================  =====================
kernel                                          torch (MKL)        numpy's OpenBLAS
==============================================  =================  =====================
Gram of a [1024, 2048] delta, 512-column chunks  0.085 s (blocked)  0.054 s (dsyrk)
Gram of a [2048, 7168] delta                     1.01 s             0.81 s
eigvalsh 1024 x 1024                             0.159 / 0.164 s    0.104 / 0.103 s
eigvalsh 1536 x 1536                             0.388 / 0.405 s    0.323 / 0.333 s
eigvalsh 2048 x 2048                             0.832 / 0.892 s    0.932 / 0.840 s
eigvalsh 2880 x 2880                             2.02 / 1.82 s      2.37 / 2.41 s
eigvalsh 4096 x 4096                             5.23 / 5.58 s      8.00 / 8.29 s
==============================================  =================  =====================

So the Gram always uses ``dsyrk`` and eigensolves up to :data:`EIG_MAX` rows use numpy; larger ones stay on
torch. Everything is float64 either way; eigenvalues agree with torch's to about 1e-14 of the largest.
The rule is a constant, not a timing taken at run time: every process (every rank of a distributed job, every
rerun) must pick the same solver for a size, so that their spectra are equal bit for bit.

Threads: OpenBLAS's thread count is set per calling thread (``openblas_set_num_threads_local``, OpenBLAS >=
0.3.27) to torch's current count, so a spectra worker (torch on one thread) runs OpenBLAS on one thread
too and two workers never spin-wait on each other's BLAS threads. ctypes releases the GIL during each call.

The library is the one numpy loaded, found in ``/proc/self/maps`` (then numpy's wheel folders). Only the
``scipy_openblas64`` build numpy's wheels ship is used (its CBLAS symbol ``scipy_cblas_dsyrk64_`` has
64-bit integers); with any other BLAS, or without the per-thread setting, :func:`usable` is False and the
engine uses its torch kernels (``linalg.gram``'s blocked GEMMs, ``torch.linalg.eigvalsh``).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import os
from types import SimpleNamespace
from typing import Iterator

import numpy as np
import torch

EIG_MAX = 1536  # eigensolves up to this many rows go to numpy (table above)
_ROW_MAJOR, _NO_TRANS, _LOWER = 101, 111, 122  # CBLAS enums


def _candidate_libraries() -> list[str]:
    """Paths of OpenBLAS libraries: those loaded in this process first (Linux), then numpy's wheel folders."""
    import numpy.linalg  # noqa: F401  (loads numpy's BLAS/LAPACK)

    found: list[str] = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(None, 5)  # address perms offset device inode [path]
                path = fields[5].strip() if len(fields) == 6 else ""
                if "openblas" in os.path.basename(path).lower() and os.path.isfile(path) and path not in found:
                    found.append(path)
    except OSError:
        pass
    root = os.path.dirname(np.__file__)
    for folder in (os.path.join(os.path.dirname(root), "numpy.libs"), os.path.join(root, ".dylibs")):
        for path in sorted(glob.glob(os.path.join(folder, "*openblas*"))):
            if os.path.realpath(path) not in map(os.path.realpath, found):
                found.append(path)
    return found


@functools.lru_cache(maxsize=1)
def _library() -> SimpleNamespace | None:
    """``set_threads(int) -> int`` and ``dsyrk`` of numpy's scipy_openblas64, or None."""
    for path in _candidate_libraries():
        try:
            lib = ctypes.CDLL(path)
            set_threads = lib.openblas_set_num_threads_local
            dsyrk = lib.scipy_cblas_dsyrk64_
        except (OSError, AttributeError):
            continue
        set_threads.argtypes, set_threads.restype = [ctypes.c_int], ctypes.c_int
        i64, f64, ptr = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p
        dsyrk.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, i64, i64, f64, ptr, i64, f64, ptr, i64]
        dsyrk.restype = None
        return SimpleNamespace(path=path, set_threads=set_threads, dsyrk=dsyrk)
    return None


def usable() -> bool:
    """True when numpy's OpenBLAS was found with a per-thread thread count (so the engine uses it)."""
    return _library() is not None


@contextlib.contextmanager
def torch_threads() -> Iterator[None]:
    """OpenBLAS on torch's current thread count, for the calling thread only (then its previous count)."""
    lib = _library()
    previous = lib.set_threads(torch.get_num_threads())
    try:
        yield
    finally:
        lib.set_threads(previous)


def _check_matrix(name: str, t: torch.Tensor, rows: int | None = None) -> None:
    if t.dtype != torch.float64 or t.device.type != "cpu" or t.dim() != 2 or t.stride(1) != 1:
        raise ValueError(f"{name} must be a row-major float64 CPU matrix, got {t.dtype} {list(t.shape)} "
                         f"strides {list(t.stride())} on {t.device}")
    if rows is not None and t.shape[0] != rows:
        raise ValueError(f"{name} has {t.shape[0]} rows, expected {rows}")


def syrk_lower_(g: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """``g += part @ part.T`` on the lower triangle of ``g`` (diagonal included; the upper one is untouched).

    Requires :func:`usable`; runs on torch's thread count (:func:`torch_threads`).

    Parameters
    ----------
    g : torch.Tensor
        float64 ``[n, n]`` contiguous, updated in place.
    part : torch.Tensor
        float64 ``[n, k]`` with unit column stride (a column slice of a wider buffer is fine).

    Returns
    -------
    torch.Tensor
        ``g``.
    """
    n = g.shape[0]
    _check_matrix("part", part, n)
    if not g.is_contiguous() or g.dtype != torch.float64 or g.shape != (n, n):
        raise ValueError(f"g must be a contiguous float64 [{n}, {n}] matrix, got {g.dtype} {list(g.shape)}")
    if part.shape[1] == 0 or n == 0:
        return g
    with torch_threads():
        _library().dsyrk(_ROW_MAJOR, _LOWER, _NO_TRANS, n, part.shape[1], 1.0, part.data_ptr(), part.stride(0),
                         1.0, g.data_ptr(), n)
    return g


def uses_numpy_eig(n: int) -> bool:
    """True when an ``n x n`` eigensolve goes to numpy (``n <= EIG_MAX`` and :func:`usable`)."""
    return n <= EIG_MAX and usable()


def _numpy_square(g: torch.Tensor) -> np.ndarray:
    if g.dtype != torch.float64 or g.device.type != "cpu" or g.dim() != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"expected a square float64 CPU matrix, got {g.dtype} {list(g.shape)} on {g.device}")
    return g.detach().numpy()


def eigvalsh(g: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the symmetric matrix whose LOWER triangle ``g`` holds, ascending, on torch's thread count.

    Parameters
    ----------
    g : torch.Tensor
        float64 ``[n, n]`` on the CPU; only the lower triangle (diagonal included) is read.

    Returns
    -------
    torch.Tensor
        float64 ``[n]`` ascending.
    """
    if uses_numpy_eig(g.shape[0]):
        a = _numpy_square(g)
        with torch_threads():
            return torch.from_numpy(np.linalg.eigvalsh(a, UPLO="L"))
    return torch.linalg.eigvalsh(g, UPLO="L")


def eigh(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric matrix whose LOWER triangle ``g`` holds.

    Parameters
    ----------
    g : torch.Tensor
        float64 ``[n, n]`` on the CPU; only the lower triangle (diagonal included) is read.

    Returns
    -------
    values : torch.Tensor
        float64 ``[n]`` ascending.
    vectors : torch.Tensor
        float64 ``[n, n]``: column i is the unit eigenvector of ``values[i]``.
    """
    if uses_numpy_eig(g.shape[0]):
        a = _numpy_square(g)
        with torch_threads():
            values, vectors = np.linalg.eigh(a, UPLO="L")
        return torch.from_numpy(values), torch.from_numpy(vectors)
    return torch.linalg.eigh(g, UPLO="L")
