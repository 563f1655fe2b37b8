"""Kernel ops: one public function per op with ``backend="auto"|"cpu"|"cuda"|"triton"|"torch"``,
plus the readable torch reference of each (also the fallback)."""

from lazarus_core.ops.dequant_axpby import dequant_axpby, dequant_axpby_reference
from lazarus_core.ops.fp8_dequant import fp8_dequant, fp8_dequant_reference
from lazarus_core.ops.mxfp4_dequant import mxfp4_dequant, mxfp4_dequant_reference
from lazarus_core.ops.mxfp4_quantize import mxfp4_quantize, mxfp4_quantize_reference
from lazarus_core.ops.overlay_moe import (OverlayExperts, overlay_moe_forward, overlay_moe_forward_reference, stored_matmul,
                                         stored_matmul_reference)
from lazarus_core.ops.overlay_moe_op import overlay_moe_op
from lazarus_core.ops.router_entropy import router_entropy_rows, router_entropy_rows_reference

__all__ = [
    "dequant_axpby",
    "dequant_axpby_reference",
    "fp8_dequant",
    "fp8_dequant_reference",
    "mxfp4_dequant",
    "mxfp4_dequant_reference",
    "mxfp4_quantize",
    "mxfp4_quantize_reference",
    "OverlayExperts",
    "overlay_moe_forward",
    "overlay_moe_forward_reference",
    "overlay_moe_op",
    "stored_matmul",
    "stored_matmul_reference",
    "router_entropy_rows",
    "router_entropy_rows_reference",
]
