"""Overlay compression of pseudo-MoE layers (``W_e = base + A[e] @ B[e]``) and inference on the overlay.

Public API:
    load_model(model, overlay=DIR, backend="auto") -> transformers model running the fused overlay forward
    plan_overlay / write_overlay / compute_spectra: the engine of the moe-overlay-* commands
    make_policy / RankPolicy: rank options (--rank, per-projection ranks, --energy, --target-ratio, --preset)
    read_config / read_layer / load_overlay_layers: the overlay checkpoint (docs/overlay_format.md)
"""

from lazarus_core.overlay.compute import OverlayPlan, compute_spectra, plan_overlay, write_overlay
from lazarus_core.overlay.format import OverlayFormatError, read_config, read_layer
from lazarus_core.overlay.load import attach_overlay, load_model, load_overlay_layers
from lazarus_core.overlay.ranks import PRESETS, RankPolicy, make_policy
from lazarus_core.spectra import factorize

__all__ = ["OverlayPlan", "compute_spectra", "factorize", "plan_overlay", "write_overlay", "OverlayFormatError",
           "read_config", "read_layer", "attach_overlay", "load_model", "load_overlay_layers", "PRESETS",
           "RankPolicy", "make_policy"]
