"""Which kernel backends can run here, and the one dispatch rule every op follows.

Rule: an explicit ``backend=`` either runs that backend or raises :class:`BackendUnavailableError`
saying what is missing; only ``backend="auto"`` chooses (CUDA tensors: cuda, then triton; CPU
tensors: cpu, then torch) and it never hides a failure of the backend it chose.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType
from typing import Callable, Mapping

import torch

from lazarus_core.errors import BackendUnavailableError

BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")
_AUTO_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpu", "torch")}


@functools.lru_cache(maxsize=None)
def _import_extension(name: str) -> ModuleType | str:
    try:
        return importlib.import_module(f"lazarus_core.{name}")
    except ImportError as exc:  # the module is absent or fails to load
        return f"lazarus_core.{name} could not be imported ({exc})"


def cpu_extension() -> ModuleType:
    """Return the compiled CPU extension ``lazarus_core._C``.

    Raises
    ------
    BackendUnavailableError
        If the package was installed without its compiled extension.
    """
    mod = _import_extension("_C")
    if isinstance(mod, str):
        raise BackendUnavailableError(f"backend 'cpu' needs the compiled extension: {mod}; reinstall with `pip install .`")
    return mod


def cuda_extension() -> ModuleType:
    """Return ``lazarus_core._C_cuda`` when it was built AND a CUDA device is present.

    Raises
    ------
    BackendUnavailableError
        If the extension was not built (no nvcc at install time) or no device is visible.
    """
    mod = _import_extension("_C_cuda")
    if isinstance(mod, str):
        raise BackendUnavailableError(
            f"backend 'cuda' needs the CUDA extension: {mod}; install with nvcc on PATH (LAZARUS_CUDA=ON forces it)"
        )
    if mod.device_count() == 0:
        raise BackendUnavailableError(f"backend 'cuda' needs a CUDA device: {mod.device_status()}")
    return mod


def triton_interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1`` is set, so Triton kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_module(device: torch.device) -> ModuleType:
    """Return the ``lazarus_core.triton_kernels`` package if Triton can run on ``device``.

    Raises
    ------
    BackendUnavailableError
        If triton is not installed, or the tensors are on the CPU without ``TRITON_INTERPRET=1``.
    """
    try:
        importlib.import_module("triton")
    except ImportError as exc:
        raise BackendUnavailableError(f"backend 'triton' needs triton ({exc}); `pip install lazarus-core[triton]`") from exc
    if device.type == "cpu" and not triton_interpreter_enabled():
        raise BackendUnavailableError(
            "backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before first use to run on the CPU"
        )
    return importlib.import_module("lazarus_core.triton_kernels")


def check_backend_device(backend: str, device: torch.device) -> None:
    """Raise ValueError when an explicit backend cannot take tensors on ``device``."""
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")


def _available(backend: str, device: torch.device) -> bool:
    try:
        {"cpu": cpu_extension, "cuda": cuda_extension}.get(backend, lambda: None)()
        if backend == "triton":
            triton_module(device)
    except BackendUnavailableError:
        return False
    return True


def select_backend(op: str, backend: str, device: torch.device, impls: Mapping[str, Callable]) -> Callable:
    """Pick the implementation of ``op`` for ``backend`` on ``device``.

    Parameters
    ----------
    op : str
        Op name, used in error messages.
    backend : str
        One of ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"``, ``"torch"``.
    device : torch.device
        Where the op's tensors live.
    impls : Mapping[str, Callable]
        The op's explicit table: backend name -> implementation.

    Returns
    -------
    Callable
        The implementation to call; its own errors are never caught here.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, ("torch",)):
            if name in impls and _available(name, device):
                return impls[name]
        return impls["torch"]
    if backend not in impls:
        raise BackendUnavailableError(f"{op} has no {backend!r} backend; it has {sorted(impls)}")
    check_backend_device(backend, device)
    if backend == "cpu":
        cpu_extension()
    elif backend == "cuda":
        cuda_extension()
    elif backend == "triton":
        triton_module(device)
    return impls[backend]
