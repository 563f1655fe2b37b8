"""Edits of a generated checkpoint for the source-binding tests: another model of the same shape, or one
changed expert tensor (the same file names, dtypes and shapes; only the bytes differ)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def rewrite_experts(directory: Path, *, only: str | None = None, seed: int = 1) -> list[str]:
    """Give the routed-expert tensors of ``directory/model.safetensors`` fresh random values (all of them, or just
    the tensor named ``only``), in place; returns the names changed."""
    path = Path(directory) / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    gen = torch.Generator().manual_seed(seed)
    changed = []
    for name, t in tensors.items():
        if ".experts." in name and t.is_floating_point() and (only is None or name == only):
            tensors[name] = (torch.randn(t.shape, generator=gen) * 0.02).to(t.dtype)
            changed.append(name)
    assert changed, f"no expert tensor {only or ''} in {path}"
    save_file(tensors, str(path), metadata=metadata)
    return changed
