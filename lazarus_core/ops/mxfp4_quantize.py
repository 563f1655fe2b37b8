"""fp32 -> MXFP4 along the last axis (to write gpt-oss-style checkpoints), on every backend.

Per block of 32 values: scale = 2^ceil(log2(amax / 6)) (never clips), clamped to [2^-127, 2^127];
elements round to the nearest E2M1 value, ties to the even code, saturating at 6. An all-zero block
gets scale byte 0 and zero codes.
"""

from __future__ import annotations

import torch

from lazarus_core.ops._backends import cpu_extension, cuda_extension, select_backend, triton_module

# Midpoints between neighbouring E2M1 magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6. At a tie the value
# rounds to the even code: up where the upper code is even (">="), down where it is odd (">").
_ROUND_UP_ABOVE = (0.25, 1.25, 2.5, 5.0)
_ROUND_UP_AT_OR_ABOVE = (0.75, 1.75, 3.5)


def mxfp4_quantize_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Readable torch quantiser (the reference and the fallback).

    Parameters
    ----------
    w : torch.Tensor
        Finite float ``[..., K]`` with ``K % 32 == 0``.

    Returns
    -------
    tuple of torch.Tensor
        ``blocks`` uint8 ``[..., K // 32, 16]`` and ``scales`` uint8 ``[..., K // 32]``.
    """
    x = w.to(torch.float64).reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    amax = x.abs().amax(dim=-1)
    # An all-zero block gives log2(0) = -inf, clamped to -127: scale byte 0, codes keep the sign bit.
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = x / torch.pow(2.0, exponent).unsqueeze(-1)
    magnitude = scaled.abs()
    code = torch.zeros_like(magnitude, dtype=torch.uint8)
    for t in _ROUND_UP_ABOVE:
        code += (magnitude > t).to(torch.uint8)
    for t in _ROUND_UP_AT_OR_ABOVE:
        code += (magnitude >= t).to(torch.uint8)
    code |= torch.signbit(x).to(torch.uint8) << 3
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)
    scales = (exponent + 127).to(torch.uint8)
    return blocks.contiguous(), scales


def _torch(w, blocks, scales):
    b, s = mxfp4_quantize_reference(w)
    blocks.copy_(b)
    scales.copy_(s)


def _cpu(w, blocks, scales):
    cpu_extension().mxfp4_quantize(w.reshape(-1).numpy(), blocks.reshape(-1, 16).numpy(), scales.reshape(-1).numpy())


def _cuda(w, blocks, scales):
    ext = cuda_extension()
    with torch.cuda.device(w.device):
        stream = torch.cuda.current_stream(w.device).cuda_stream
        ext.mxfp4_quantize(w.data_ptr(), scales.numel(), blocks.data_ptr(), scales.data_ptr(), stream)


def _triton(w, blocks, scales):
    triton_module(w.device).mxfp4_quantize_triton(w, blocks, scales)


_IMPLS = {"cpu": _cpu, "cuda": _cuda, "triton": _triton, "torch": _torch}


def mxfp4_quantize(w: torch.Tensor, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``w`` to MXFP4 along its last axis.

    Parameters
    ----------
    w : torch.Tensor
        Floating point ``[..., K]`` (fp32, bf16 or fp16; computed in fp32), ``K`` a multiple of 32,
        every value finite.
    backend : str, optional
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"``.

    Returns
    -------
    tuple of torch.Tensor
        ``blocks`` uint8 ``[..., K // 32, 16]`` and ``scales`` uint8 ``[..., K // 32]``, ready for
        :func:`lazarus_core.ops.mxfp4_dequant`.

    Raises
    ------
    TypeError
        ``w`` is not a floating-point tensor.
    ValueError
        ``w`` is 0-d, its last axis is not a multiple of 32, or it holds NaN/Inf.
    """
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"mxfp4_quantize: w must be a floating-point tensor, got {getattr(w, 'dtype', type(w).__name__)}")
    if w.dim() == 0 or w.shape[-1] % 32 != 0:
        raise ValueError(f"mxfp4_quantize: the last axis of w must be a multiple of 32, got shape {list(w.shape)}")
    impl = select_backend("mxfp4_quantize", backend, w.device, _IMPLS)
    w32 = w.detach().to(torch.float32).contiguous()
    if w32.numel() and not bool(torch.isfinite(w32).all()):
        raise ValueError("mxfp4_quantize: w holds NaN or Inf values, which MXFP4 cannot represent")
    groups = w.shape[-1] // 32
    blocks = torch.empty((*w.shape[:-1], groups, 16), dtype=torch.uint8, device=w.device)
    scales = torch.empty((*w.shape[:-1], groups), dtype=torch.uint8, device=w.device)
    if scales.numel():
        impl(w32, blocks, scales)
    return blocks, scales
