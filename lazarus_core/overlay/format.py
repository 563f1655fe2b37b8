"""The overlay checkpoint on disk (DESIGN.md section 6; docs/overlay_format.md): ``overlay_config.json`` plus
one safetensors shard per MoE layer, each written atomically so an interrupted compress resumes.

Per MoE layer L (the model's layer index) and projection P in gate/up/down, in ``[out, in]`` orientation:
``layers.L.P.base [out, in]`` (or, with an MXFP4 base, ``layers.L.P.base_blocks [out, in/32, 16]`` +
``layers.L.P.base_scales [out, in/32]``), ``layers.L.P.A [E, out, r]``, ``layers.L.P.B [E, r, in]`` (expert
e = base + A[e] @ B[e]) and ``layers.L.P.bias [E, out]`` when the source has expert biases.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lazarus_core.atomic_io import atomic_path
from lazarus_core.models.checkpoint import PROJECTIONS

FORMAT_NAME = "lazarus-overlay"
FORMAT_VERSION = 1
CONFIG_NAME = "overlay_config.json"
MAX_HEADER_BYTES = 16 << 20


class OverlayFormatError(ValueError):
    """A malformed or incomplete overlay directory; the message names the file and tensor."""


def shard_name(layer: int) -> str:
    return f"overlay-layer-{layer:05d}.safetensors"


def tensor_name(layer: int, projection: str, kind: str) -> str:
    return f"layers.{layer}.{projection}.{kind}"


def write_layer_shard(directory: Path, layer: int, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write one layer's tensors to ``overlay-layer-LLLLL.safetensors`` atomically
    (:func:`lazarus_core.atomic_io.atomic_path`: unique temporary name, fsync, rename)."""
    from safetensors.torch import save_file

    path = directory / shard_name(layer)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return path


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """Parse and check ``overlay_config.json``.

    Raises
    ------
    FileNotFoundError
        No such directory or no config in it.
    OverlayFormatError
        Not an overlay config, unknown version, or missing keys.
    """
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: not an overlay checkpoint ({CONFIG_NAME} is missing)")
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise OverlayFormatError(f"{path}: invalid JSON ({exc})") from None
    if config.get("format") != FORMAT_NAME:
        raise OverlayFormatError(f"{path}: format is {config.get('format')!r}, expected {FORMAT_NAME!r}")
    if config.get("version") != FORMAT_VERSION:
        raise OverlayFormatError(f"{path}: version {config.get('version')!r} is not supported (expected {FORMAT_VERSION})")
    for key in ("source", "family", "num_experts", "moe_layers", "layers", "dtype", "activation"):
        if key not in config:
            raise OverlayFormatError(f"{path}: key {key!r} is missing")
    return config


@dataclass
class LayerFactors:
    """One layer's overlay tensors as stored (no decoding, no dtype change): projection -> base, A ``[E, out, r]``,
    B ``[E, r, in]``, bias ``[E, out]`` or None. A float base is ``[out, in]``; an MXFP4 base is the tuple
    ``(blocks uint8 [out, in/32, 16], scales uint8 [out, in/32])`` (what
    :meth:`lazarus_core.ops.OverlayExperts.from_factors` takes)."""

    layer: int
    base: dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]
    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    bias: dict[str, torch.Tensor | None]

    def base_fp32(self, projection: str) -> torch.Tensor:
        """The base of ``projection`` as fp32 ``[out, in]`` (an MXFP4 base decoded; a copy)."""
        base = self.base[projection]
        if isinstance(base, tuple):
            from lazarus_core.ops import mxfp4_dequant

            blocks, scales = base
            return mxfp4_dequant(blocks, scales).reshape(blocks.shape[0], -1)
        return base.float()


def read_layer(directory: str | os.PathLike, config: dict[str, Any], layer: int) -> LayerFactors:
    """Read and validate one layer's factors against the config (shapes from the header before any data).

    Raises
    ------
    OverlayFormatError
        Missing shard or tensor, or a shape/dtype that disagrees with the config (names file and tensor).
    """
    from safetensors import safe_open

    directory = Path(directory)
    entry = config["layers"].get(str(layer))
    if entry is None:
        raise OverlayFormatError(f"{directory / CONFIG_NAME}: layer {layer} is not in this overlay "
                                 f"(layers {sorted(int(k) for k in config['layers'])})")
    path = directory / entry["shard"]
    if not path.is_file():
        raise OverlayFormatError(f"{path}: shard of layer {layer} is missing (an interrupted compress? rerun it)")
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
    if header_len > MAX_HEADER_BYTES or header_len > path.stat().st_size:
        raise OverlayFormatError(f"{path}: safetensors header of {header_len} bytes is implausible")
    e = int(config["num_experts"])
    out = LayerFactors(layer, {}, {}, {}, {})
    raw: dict[str, torch.Tensor] = {}
    with safe_open(str(path), "pt") as f:
        names = set(f.keys())
        for p in PROJECTIONS:
            info = entry["projections"][p]
            (o, i), r = info["shape"], int(info["rank"])
            mxfp4_base = config.get("base_dtype") == "mxfp4"
            expected = {"A": (e, o, r), "B": (e, r, i)}
            if mxfp4_base:
                expected.update({"base_blocks": (o, i // 32, 16), "base_scales": (o, i // 32)})
            else:
                expected["base"] = (o, i)
            if info.get("bias"):
                expected["bias"] = (e, o)
            for kind, shape in expected.items():
                name = tensor_name(layer, p, kind)
                if name not in names:
                    raise OverlayFormatError(f"{path}: tensor {name!r} is missing")
                got = tuple(f.get_slice(name).get_shape())
                if got != shape:
                    raise OverlayFormatError(f"{path}: tensor {name!r} has shape {list(got)}, the config says "
                                             f"{list(shape)}")
                t = f.get_tensor(name)
                if t.is_floating_point() == kind.startswith("base_"):
                    raise OverlayFormatError(f"{path}: tensor {name!r} has dtype {t.dtype}, expected "
                                             f"{'uint8' if kind.startswith('base_') else 'a float type'}")
                if kind.startswith("base_"):
                    raw[kind] = t
                else:
                    {"base": out.base, "A": out.a, "B": out.b, "bias": out.bias}[kind][p] = t
            if mxfp4_base:
                out.base[p] = (raw["base_blocks"], raw["base_scales"])
            out.bias.setdefault(p, None)
    return out
