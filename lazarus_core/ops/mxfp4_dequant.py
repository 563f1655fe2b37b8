"""MXFP4 (OCP microscaling, gpt-oss expert format) -> fp32 / bf16, on every backend.

Format: a block is 32 E2M1 codes sharing one E8M0 scale byte. ``blocks`` is uint8 ``[..., G, 16]``
(byte j holds element 2j in its low nibble, 2j+1 in its high nibble), ``scales`` is uint8 ``[..., G]``.
Scale s means 2^(s-127); s = 0xFF makes the whole block NaN; s = 0 is 2^-127 (a subnormal, kept).
"""

from __future__ import annotations

import torch

from lazarus_core.ops._validate import check_out
from lazarus_core.ops._backends import cpu_extension, cuda_extension, select_backend, triton_module

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
OUTPUT_DTYPES = (torch.float32, torch.bfloat16)


def mxfp4_dequant_reference(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Readable torch decoder (the reference and the fallback).

    Parameters
    ----------
    blocks : torch.Tensor
        uint8 ``[..., G, 16]`` packed E2M1 codes.
    scales : torch.Tensor
        uint8 ``[..., G]`` E8M0 scale bytes.
    dtype : torch.dtype
        ``torch.float32`` or ``torch.bfloat16``.

    Returns
    -------
    torch.Tensor
        ``[..., G * 32]`` in ``dtype``.
    """
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    low = blocks & 0x0F
    high = blocks >> 4
    codes = torch.stack((low, high), dim=-1).reshape(*blocks.shape[:-1], 32)  # [..., G, 32]
    values = lut[codes.to(torch.int32)]
    # 2^(s-127) is exact in float64; its float32 cast keeps 2^-127 as a subnormal.
    scale = torch.pow(2.0, scales.to(torch.float64) - 127.0).to(torch.float32)
    scale = torch.where(scales == 0xFF, torch.full_like(scale, float("nan")), scale)
    decoded = values * scale.unsqueeze(-1)  # a power-of-two scaling: exact in float32
    return decoded.reshape(*scales.shape[:-1], scales.shape[-1] * 32).to(dtype)


def _check_inputs(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None) -> tuple[int, ...]:
    for name, t in (("blocks", blocks), ("scales", scales)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"mxfp4_dequant: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.uint8:
            raise TypeError(f"mxfp4_dequant: {name} must be uint8, got {t.dtype}")
    if blocks.dim() < 2 or blocks.shape[-1] != 16:
        raise ValueError(f"mxfp4_dequant: blocks must have shape [..., G, 16], got {list(blocks.shape)}")
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(
            f"mxfp4_dequant: blocks.shape[:-1] {list(blocks.shape[:-1])} must equal scales.shape {list(scales.shape)}"
        )
    if blocks.device != scales.device:
        raise ValueError(f"mxfp4_dequant: blocks on {blocks.device} but scales on {scales.device}")
    if dtype not in OUTPUT_DTYPES:
        raise TypeError(f"mxfp4_dequant: dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    out_shape = (*scales.shape[:-1], scales.shape[-1] * 32)
    if out is not None:
        check_out("mxfp4_dequant", out, dtype, out_shape, blocks.device, "blocks")
    return out_shape


def _torch(blocks, scales, out):
    out.copy_(mxfp4_dequant_reference(blocks, scales, out.dtype))


def _as_bits(out: torch.Tensor) -> torch.Tensor:
    return out.view(torch.int16) if out.dtype == torch.bfloat16 else out


def _cpu(blocks, scales, out):
    ext = cpu_extension()
    ext.mxfp4_dequant(blocks.reshape(-1, 16).numpy(), scales.reshape(-1).numpy(), _as_bits(out).reshape(-1).numpy())


def _cuda(blocks, scales, out):
    ext = cuda_extension()
    with torch.cuda.device(out.device):
        stream = torch.cuda.current_stream(out.device).cuda_stream
        ext.mxfp4_dequant(blocks.data_ptr(), scales.data_ptr(), scales.numel(), out.data_ptr(),
                          out.dtype == torch.bfloat16, stream)


def _triton(blocks, scales, out):
    triton_module(out.device).mxfp4_dequant_triton(blocks, scales, out)


_IMPLS = {"cpu": _cpu, "cuda": _cuda, "triton": _triton, "torch": _torch}


def mxfp4_dequant(
    blocks: torch.Tensor,
    scales: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Decode MXFP4 blocks to floating point.

    Parameters
    ----------
    blocks : torch.Tensor
        uint8 ``[..., G, 16]``: 32 packed E2M1 codes per block along the last (input) axis.
    scales : torch.Tensor
        uint8 ``[..., G]``: one E8M0 scale byte per block, same leading shape as ``blocks``.
    dtype : torch.dtype, optional
        ``torch.float32`` (default) or ``torch.bfloat16``.
    out : torch.Tensor, optional
        Contiguous ``[..., G * 32]`` tensor of ``dtype`` on the same device, reused as the result.
    backend : str, optional
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"``.

    Returns
    -------
    torch.Tensor
        ``[..., G * 32]`` of ``dtype`` (``out`` itself when given). Every decoded value is exact in
        both output dtypes; blocks with scale 0xFF are NaN.

    Raises
    ------
    TypeError
        Wrong input, output or requested dtype.
    ValueError
        ``blocks.shape[:-1] != scales.shape``, last axis not 16, or a wrong ``out`` shape/device.
    BackendUnavailableError
        ``backend`` names a backend that cannot run here.
    """
    out_shape = _check_inputs(blocks, scales, dtype, out)
    impl = select_backend("mxfp4_dequant", backend, blocks.device, _IMPLS)
    if out is None:
        out = torch.empty(out_shape, dtype=dtype, device=blocks.device)
    if out.numel() == 0:
        return out
    impl(blocks.contiguous(), scales.contiguous(), out)
    return out
