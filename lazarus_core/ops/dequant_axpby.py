"""Fused decode + axpby: ``out = alpha * decode(weight) + beta * y`` in one pass over memory.

Exact on every backend: ``alpha`` and ``beta`` are rounded to fp32, then ``alpha * w``, ``beta * y`` and their sum
are each rounded to fp32 (round to nearest even); nothing is contracted into an FMA. Results are bit-identical
across backends and equal the float64 computation of the same three operations rounded to fp32 after each.

The streaming expert analyses use it twice per expert: the running mean (``out = y = mean``,
``alpha = 1/E``, ``beta = 1``) and the delta from the mean (``y = base``, ``alpha = 1``, ``beta = -1``).
Sources: MXFP4 (uint8 blocks + scales) or a float tensor (bf16/fp16/fp32); results are fp32.
"""

from __future__ import annotations

import torch

from lazarus_core.ops._backends import cpu_extension, cuda_extension, select_backend, triton_module
from lazarus_core.ops.mxfp4_dequant import mxfp4_dequant_reference

FLOAT_SOURCES = (torch.float32, torch.bfloat16, torch.float16)


def dequant_axpby_reference(weight: torch.Tensor, y: torch.Tensor, *, scales: torch.Tensor | None = None,
                            alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    """Readable torch version: decode, then ``alpha * w + beta * y`` in fp32.

    Parameters
    ----------
    weight : torch.Tensor
        MXFP4 blocks uint8 ``[..., G, 16]`` (with ``scales``) or float ``[...]``.
    y : torch.Tensor
        fp32 with the decoded weight's shape (``[..., G * 32]`` for MXFP4).
    scales : torch.Tensor, optional
        uint8 ``[..., G]`` for MXFP4 sources.
    alpha, beta : float

    Returns
    -------
    torch.Tensor
        fp32, ``y``'s shape.
    """
    decoded = mxfp4_dequant_reference(weight, scales) if scales is not None else weight.to(torch.float32)
    alpha32 = torch.tensor(alpha, dtype=torch.float32)
    beta32 = torch.tensor(beta, dtype=torch.float32)
    return alpha32 * decoded.reshape(y.shape) + beta32 * y


def _decoded_shape(weight: torch.Tensor, scales: torch.Tensor | None) -> tuple[int, ...]:
    if scales is None:
        if weight.dtype not in FLOAT_SOURCES:
            raise TypeError(f"dequant_axpby: a float weight must be fp32, bf16 or fp16, got {weight.dtype} "
                            "(pass scales= for MXFP4 blocks)")
        return tuple(weight.shape)
    if weight.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"dequant_axpby: MXFP4 blocks and scales must be uint8, got {weight.dtype} and {scales.dtype}")
    if weight.dim() < 2 or weight.shape[-1] != 16 or weight.shape[:-1] != scales.shape:
        raise ValueError(f"dequant_axpby: MXFP4 blocks {list(weight.shape)} must be [..., G, 16] with scales "
                         f"[..., G], got scales {list(scales.shape)}")
    return (*scales.shape[:-1], scales.shape[-1] * 32)


def _torch(weight, scales, y, out, alpha, beta):
    out.copy_(dequant_axpby_reference(weight, y, scales=scales, alpha=alpha, beta=beta))


def _float_axpby(weight, y, out, alpha, beta):
    """fp32/fp16 sources with torch's elementwise kernels, one rounding per operation like every other path
    (``torch.add(y, w, alpha=a)`` fuses ``a * w + y`` into one FMA rounding: 12% of values differ at a = 1/7)."""
    torch.add(weight.to(torch.float32) * alpha, y * beta if beta != 1.0 else y, out=out)


def _cpu(weight, scales, y, out, alpha, beta):
    ext = cpu_extension()
    if scales is not None:
        ext.mxfp4_axpby(weight.reshape(-1, 16).numpy(), scales.reshape(-1).numpy(), alpha, y.reshape(-1).numpy(), beta,
                        out.reshape(-1).numpy())
    elif weight.dtype == torch.bfloat16:
        ext.bf16_axpby(weight.view(torch.int16).reshape(-1).numpy(), alpha, y.reshape(-1).numpy(), beta,
                       out.reshape(-1).numpy())
    else:
        _float_axpby(weight, y, out, alpha, beta)


def _cuda(weight, scales, y, out, alpha, beta):
    ext = cuda_extension()
    with torch.cuda.device(out.device):
        stream = torch.cuda.current_stream(out.device).cuda_stream
        if scales is not None:
            ext.mxfp4_axpby(weight.data_ptr(), scales.data_ptr(), scales.numel(), alpha, y.data_ptr(), beta,
                            out.data_ptr(), stream)
        elif weight.dtype == torch.bfloat16:
            ext.bf16_axpby(weight.data_ptr(), weight.numel(), alpha, y.data_ptr(), beta, out.data_ptr(), stream)
        else:
            _float_axpby(weight, y, out, alpha, beta)


def _triton(weight, scales, y, out, alpha, beta):
    triton_module(out.device).dequant_axpby_triton(weight, scales, y, out, alpha, beta)


_IMPLS = {"cpu": _cpu, "cuda": _cuda, "triton": _triton, "torch": _torch}


def dequant_axpby(
    weight: torch.Tensor,
    y: torch.Tensor,
    *,
    scales: torch.Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 1.0,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Compute ``alpha * decode(weight) + beta * y`` in fp32, fusing decode, convert and add.

    Parameters
    ----------
    weight : torch.Tensor
        Either MXFP4 blocks uint8 ``[..., G, 16]`` (pass ``scales``) or a float tensor (fp32/bf16/fp16).
    y : torch.Tensor
        fp32, contiguous, with the decoded weight's shape (``[..., G * 32]`` for MXFP4).
    scales : torch.Tensor, optional
        uint8 ``[..., G]`` MXFP4 scales.
    alpha, beta : float, optional
        Scalars (applied in fp32).
    out : torch.Tensor, optional
        fp32 contiguous result buffer of ``y``'s shape; may be ``y`` itself (in-place accumulate).
    backend : str, optional
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"``.

    Returns
    -------
    torch.Tensor
        fp32, ``y``'s shape (``out`` when given).

    Raises
    ------
    TypeError
        Wrong dtypes (``y``/``out`` must be fp32).
    ValueError
        Shapes do not match, tensors on different devices, or non-contiguous ``y``/``out``.
    """
    for name, t in (("weight", weight), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"dequant_axpby: {name} must be a torch.Tensor, got {type(t).__name__}")
    shape = _decoded_shape(weight, scales)
    if y.dtype != torch.float32:
        raise TypeError(f"dequant_axpby: y must be float32, got {y.dtype}")
    if tuple(y.shape) != shape:
        raise ValueError(f"dequant_axpby: y has shape {list(y.shape)} but the decoded weight is {list(shape)}")
    if out is None:
        out = torch.empty_like(y, memory_format=torch.contiguous_format)
    elif out.dtype != torch.float32 or tuple(out.shape) != shape or not out.is_contiguous():
        raise ValueError(f"dequant_axpby: out must be contiguous float32 of shape {list(shape)}, got "
                         f"{out.dtype} {list(out.shape)}")
    devices = {t.device for t in (weight, y, out) + ((scales,) if scales is not None else ())}
    if len(devices) != 1:
        raise ValueError(f"dequant_axpby: tensors are on different devices: {sorted(map(str, devices))}")
    if not y.is_contiguous():
        raise ValueError("dequant_axpby: y must be contiguous")
    impl = select_backend("dequant_axpby", backend, y.device, _IMPLS)
    if out.numel():
        impl(weight.contiguous(), scales.contiguous() if scales is not None else None, y, out, float(alpha), float(beta))
    return out
