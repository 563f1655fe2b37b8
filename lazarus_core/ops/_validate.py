"""Argument checks shared by the ops, so every op words the same mistake the same way."""

from __future__ import annotations

import torch


def check_out(op: str, out: object, dtype: torch.dtype, shape: tuple[int, ...], device: torch.device,
              device_of: str) -> None:
    """Raise TypeError/ValueError unless ``out`` is a contiguous ``dtype`` tensor of ``shape`` on ``device``.

    ``device_of`` names the input whose device ``out`` must share (for the message).
    """
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{op}: out must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"{op}: out has dtype {out.dtype} but dtype={dtype} was requested")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{op}: out has shape {list(out.shape)}, expected {list(shape)}")
    if out.device != device:
        raise ValueError(f"{op}: out on {out.device} but {device_of} on {device}")
    if not out.is_contiguous():
        raise ValueError(f"{op}: out must be contiguous")
