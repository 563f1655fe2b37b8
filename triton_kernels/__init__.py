"""Triton kernels of lazarus-core, shipped as ``lazarus_core.triton_kernels`` (never top-level).

One public launcher per op (``<op>_triton``) beside its private ``@triton.jit`` kernel. Importing
this package imports triton; ``lazarus_core.ops`` does so only when the triton backend is used.
"""

if __name__ != "lazarus_core.triton_kernels":
    # The source folder sits on sys.path in editable installs and in the repo root; never let it pose
    # as the Triton project's own top-level `triton_kernels` library (vLLM, SGLang import that name).
    raise ImportError("this is lazarus-core's kernel folder; import it as lazarus_core.triton_kernels")

from lazarus_core.triton_kernels.dequant_axpby import dequant_axpby_triton
from lazarus_core.triton_kernels.mxfp4_dequant import mxfp4_dequant_triton
from lazarus_core.triton_kernels.mxfp4_quantize import mxfp4_quantize_triton
from lazarus_core.triton_kernels.overlay_moe import (down_expand_triton, gate_up_expand_triton, grouped_shrink_triton,
                                                     mxfp4_matmul_triton)
from lazarus_core.triton_kernels.router_entropy import router_entropy_rows_triton

__all__ = [
    "dequant_axpby_triton",
    "mxfp4_dequant_triton",
    "mxfp4_quantize_triton",
    "down_expand_triton",
    "gate_up_expand_triton",
    "grouped_shrink_triton",
    "mxfp4_matmul_triton",
    "router_entropy_rows_triton",
]
