"""Per-layer plans of a compress (every projection's delta spectra and its overlay base) saved in the output
directory, so a rerun or an interrupted compress reuses them instead of recomputing the costly part of the
job, and writing the overlay reuses the base that planning built.

``OUT/plan-cache/plan-layer-LLLLL.safetensors`` holds, per projection P, each tensor field F of
:class:`ProjectionSpectrum` as ``P.F`` (``singular``, ``expert_energy``, ``noise_edge``, ``base``...), and in its
metadata the non-tensor fields and the key the plan was computed for: the source layer's fingerprint digest
and the base method. A plan whose key or field set differs is ignored (and rewritten). Deleting the directory
is always safe: it only costs the recomputation.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from lazarus_core.atomic_io import atomic_path
from lazarus_core.spectra import ProjectionSpectrum

PLAN_DIR = "plan-cache"
PLAN_FORMAT = "lazarus-overlay-plan"
PLAN_VERSION = 1


def plan_path(directory: str | os.PathLike, layer: int) -> Path:
    """``directory/plan-layer-LLLLL.safetensors``."""
    return Path(directory) / f"plan-layer-{layer:05d}.safetensors"


def save_layer_plan(directory: str | os.PathLike, layer: int, spectra: dict[str, ProjectionSpectrum],
                    key: dict[str, Any]) -> Path:
    """Write one layer's plan atomically.

    Parameters
    ----------
    directory : str or PathLike
        The plan cache directory (created if missing).
    layer : int
    spectra : dict
        Projection -> :class:`ProjectionSpectrum` (tensor fields, e.g. ``base`` fp32 ``[out, in]``, stored as is).
    key : dict
        JSON-able identity of the plan (source digest, base method); :func:`load_layer_plan` needs the same.

    Returns
    -------
    Path
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, scalars = {}, {}
    for p, sp in spectra.items():
        scalars[p] = {}
        for f in dataclasses.fields(sp):
            value = getattr(sp, f.name)
            if isinstance(value, torch.Tensor):
                tensors[f"{p}.{f.name}"] = value.detach().cpu().contiguous()
            else:
                scalars[p][f.name] = {"value": list(value) if isinstance(value, tuple) else value,
                                      "tuple": isinstance(value, tuple)}
    meta = {"format": PLAN_FORMAT, "version": str(PLAN_VERSION), "layer": str(layer),
            "key": json.dumps(key, sort_keys=True), "fields": json.dumps(scalars)}
    path = plan_path(directory, layer)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_layer_plan(directory: str | os.PathLike, layer: int, key: dict[str, Any],
                    projections: tuple[str, ...]) -> dict[str, ProjectionSpectrum] | None:
    """The saved plan of ``layer`` when it was made for ``key`` and covers ``projections``, else None.

    A missing, torn, foreign or stale file (other key, other fields of :class:`ProjectionSpectrum`) is None,
    never an error: the plan is then recomputed.
    """
    from safetensors import safe_open

    path = plan_path(directory, layer)
    if not path.is_file():
        return None
    names = {f.name for f in dataclasses.fields(ProjectionSpectrum)}
    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != PLAN_FORMAT or meta.get("version") != str(PLAN_VERSION) or \
                    json.loads(meta.get("key", "null")) != json.loads(json.dumps(key, sort_keys=True)):
                return None
            scalars = json.loads(meta["fields"])
            stored = set(fh.keys())
            out = {}
            for p in projections:
                kwargs = {n: (tuple(v["value"]) if v["tuple"] else v["value"]) for n, v in scalars[p].items()}
                for n in names - set(kwargs):
                    if f"{p}.{n}" not in stored:
                        return None
                    kwargs[n] = fh.get_tensor(f"{p}.{n}")
                if set(kwargs) != names:
                    return None
                out[p] = ProjectionSpectrum(**kwargs)
    except Exception:  # a torn or foreign file: recompute
        return None
    return out


__all__ = ["PLAN_DIR", "load_layer_plan", "plan_path", "save_layer_plan"]
