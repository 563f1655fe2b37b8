"""The one byte-accounting formula of overlays, used by estimate, compute, compress and verify alike.

bytes = values x bits per value / 8.
- Original experts: the routed-expert tensors of each MoE layer exactly as stored in the checkpoint files
  (their safetensors header sizes): MXFP4 = 4-bit codes + one 8-bit scale per 32 values = 4.25 bits/value,
  FP8 = 8 bits + its block scales, bf16/fp16 = 16 bits, fp32 = 32; expert biases included.
- Overlay of one (layer, projection) ``[out, in]`` with E experts at rank r:
  ``out*in x bits(base dtype) / 8 + (E*r*(out + in) + E*out [bias, if any]) x bits(overlay dtype) / 8``
  (base dtype = the overlay dtype unless ``--base-dtype``; MXFP4 = 4.25 bits).
- Whole model: the non-expert tensors as stored + the experts (original or overlay).
- ratio = original bytes / overlay bytes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from lazarus_core.models.checkpoint import PROJECTIONS, MoeCheckpoint

FORMULA = ("bytes = values x bits/8; original experts as stored (MXFP4 4.25 bits/value incl. scales, FP8 8 bits + "
           "scales, bf16 16, biases included); overlay per (layer, projection) = out*in x bits of the base dtype / 8 + "
           "(E*r*(out+in) + E*out if biased) x bits of the overlay dtype / 8; whole model = non-expert tensors as "
           "stored + experts; ratio = original / overlay")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dtype_bytes(dtype: str) -> int:
    """Bytes per value of an overlay dtype name (``bf16``, ``fp16``, ``fp32``)."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return torch.finfo(DTYPES[dtype]).bits // 8


def _all_tensors(ckpt: MoeCheckpoint) -> dict[str, int]:
    return {name: ckpt.tensor_info(name).nbytes for name in ckpt.tensor_names()}


def expert_bytes_as_stored(ckpt: MoeCheckpoint, layers: list[int] | None = None) -> dict[int, int]:
    """Per MoE layer (default all): bytes of its routed-expert tensors on disk (weights, scales, biases).

    Only the headers of the files holding those layers' experts are read (a hub model fetches no other shard)."""
    out = {}
    for layer in ckpt.moe_layers if layers is None else layers:
        prefix = ckpt.spec.names.moe_prefix(layer) + "experts."
        out[layer] = sum(ckpt.tensor_info(name).nbytes for name in ckpt.tensor_names() if name.startswith(prefix))
    return out


def model_bytes_as_stored(ckpt: MoeCheckpoint) -> int:
    """Bytes of every tensor of the checkpoint on disk."""
    return sum(_all_tensors(ckpt).values())


def overlay_projection_bytes(shape: tuple[int, int], num_experts: int, rank: int, has_bias: bool, dtype: str,
                             base_dtype: str | None = None) -> int:
    """Bytes of one (layer, projection) overlay: base (in ``base_dtype``, default ``dtype``; ``"mxfp4"`` =
    4.25 bits/value) + factors (+ biases) in ``dtype``."""
    out_dim, in_dim = shape
    values = num_experts * rank * (out_dim + in_dim) + (num_experts * out_dim if has_bias else 0)
    if base_dtype == "mxfp4":
        base = out_dim * (in_dim // 32) * 17  # 16 bytes of codes + 1 scale byte per 32 values
    else:
        base = out_dim * in_dim * dtype_bytes(base_dtype or dtype)
    return base + values * dtype_bytes(dtype)


@dataclass
class ByteReport:
    """Sizes by the formula of :data:`FORMULA`."""

    formula: str
    overlay_dtype: str
    original_expert_bytes: int
    overlay_expert_bytes: int
    expert_ratio: float
    original_model_bytes: int
    overlay_model_bytes: int
    model_ratio: float
    source_storage: str

    def to_dict(self) -> dict:
        return asdict(self)


def expert_bytes(ckpt: MoeCheckpoint, ranks: dict[tuple[int, str], int], dtype: str, layers: list[int],
                 base_dtype: str | None = None) -> tuple[int, int]:
    """(original, overlay) bytes of the routed experts of ``layers`` alone: reads only those layers' headers, so
    the expert ratio (moe-type-analyze's ``compression``) of a hub model fetches no shard outside ``layers``."""
    original = sum(expert_bytes_as_stored(ckpt, layers).values())
    overlay = sum(overlay_projection_bytes(ckpt.projection_shape(p), ckpt.num_experts, ranks[(layer, p)],
                                           ckpt.spec.expert_bias, dtype, base_dtype)
                  for layer in layers for p in PROJECTIONS)
    return original, overlay


def byte_report(ckpt: MoeCheckpoint, ranks: dict[tuple[int, str], int], dtype: str,
                layers: list[int] | None = None, base_dtype: str | None = None) -> ByteReport:
    """Original vs overlay bytes for ``ranks`` ((layer, projection) -> rank) over ``layers`` (default all).

    Layers not in ``layers`` keep their original experts in the whole-model figure.
    """
    layers = list(ckpt.moe_layers) if layers is None else list(layers)
    original, overlay = expert_bytes(ckpt, ranks, dtype, layers, base_dtype)
    total = model_bytes_as_stored(ckpt)
    overlay_total = total - original + overlay
    return ByteReport(FORMULA, dtype, original, overlay, original / overlay if overlay else float("inf"), total,
                      overlay_total, total / overlay_total if overlay_total else float("inf"),
                      ckpt.storage_format(layers[0]))
