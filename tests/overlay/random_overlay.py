"""Random overlay layers and routings for kernel tests (fresh draws; odd sizes by default)."""

from __future__ import annotations

import torch

from lazarus_core.ops.overlay_moe import OverlayExperts

BASE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def random_overlay(n_experts: int, hidden: int, inter: int, ranks: tuple[int, int, int], *, bias: bool,
                   activation: str, scale: float = 0.3, factor_dtype: torch.dtype = torch.float32,
                   base: str = "fp32") -> OverlayExperts:
    """An :class:`OverlayExperts` with Gaussian bases, factors and (optionally) biases, stored as asked.

    ``factor_dtype`` is the factors' and biases' dtype; ``base`` is ``"fp32"``, ``"bf16"``, ``"fp16"`` or
    ``"mxfp4"`` (the Gaussian base quantised; ``hidden`` and ``inter`` must then be multiples of 32).
    """
    rg, ru, rd = ranks
    bases = {"gate": torch.randn(inter, hidden) * scale, "up": torch.randn(inter, hidden) * scale,
             "down": torch.randn(hidden, inter) * scale}
    if base == "mxfp4":
        from lazarus_core.ops import mxfp4_quantize

        stored = {p: mxfp4_quantize(w) for p, w in bases.items()}
    else:
        stored = {p: w.to(BASE_DTYPES[base]) for p, w in bases.items()}
    a = {"gate": torch.randn(n_experts, inter, rg) * scale, "up": torch.randn(n_experts, inter, ru) * scale,
         "down": torch.randn(n_experts, hidden, rd) * scale}
    b = {"gate": torch.randn(n_experts, rg, hidden) * scale, "up": torch.randn(n_experts, ru, hidden) * scale,
         "down": torch.randn(n_experts, rd, inter) * scale}
    biases = None
    if bias:
        biases = {"gate": torch.randn(n_experts, inter), "up": torch.randn(n_experts, inter),
                  "down": torch.randn(n_experts, hidden)}
    return OverlayExperts.from_factors(stored, a, b, biases, activation=activation, dtype=factor_dtype)


def random_routing(tokens: int, n_experts: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [T, K] int64 distinct per token, weights [T, K] fp32)``."""
    ids = torch.stack([torch.randperm(n_experts)[:top_k] for _ in range(tokens)]) if tokens else \
        torch.empty(0, top_k, dtype=torch.int64)
    weights = torch.rand(tokens, top_k) + 0.05
    return ids, weights
