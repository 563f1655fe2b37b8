"""Block-scaled FP8 E4M3 (DeepSeek-V3 expert format) -> fp32 / bf16, on every backend.

Format: ``weight`` holds E4M3FN bytes (``torch.float8_e4m3fn`` or their raw ``uint8`` bits) ``[..., R, C]``;
``scale_inv`` is ``[..., ceil(R / br), ceil(C / bc)]`` (``br, bc = block_size``, 128 x 128 in DeepSeek-V3)
and multiplies every value of its block: ``out[r, c] = e4m3(weight[r, c]) * scale_inv[r // br, c // bc]``.
E4M3FN has no Inf; 0x7F / 0xFF are NaN; the largest finite value is 448.
"""

from __future__ import annotations

import importlib

import torch

from lazarus_core.ops._validate import check_out
from lazarus_core.ops._backends import cpu_extension, cuda_extension, select_backend, triton_module

OUTPUT_DTYPES = (torch.float32, torch.bfloat16)
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEFAULT_BLOCK_SIZE = (128, 128)


def _scale_shape(shape: tuple[int, ...], block_size: tuple[int, int]) -> tuple[int, ...]:
    rows, cols = shape[-2], shape[-1]
    return (*shape[:-2], -(-rows // block_size[0]), -(-cols // block_size[1]))


def fp8_dequant_reference(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block_size: tuple[int, int] = DEFAULT_BLOCK_SIZE,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Readable torch decoder (the reference and the fallback).

    Parameters
    ----------
    weight : torch.Tensor
        ``torch.float8_e4m3fn`` or ``uint8`` (raw E4M3FN bits) ``[..., R, C]``.
    scale_inv : torch.Tensor
        float32 / bf16 / fp16 ``[..., ceil(R / br), ceil(C / bc)]``.
    block_size : tuple of int
        ``(br, bc)``: rows and columns covered by one scale.
    dtype : torch.dtype
        ``torch.float32`` or ``torch.bfloat16``.

    Returns
    -------
    torch.Tensor
        ``[..., R, C]`` in ``dtype``: the fp32 product, rounded once more to ``dtype``.
    """
    rows, cols = weight.shape[-2], weight.shape[-1]
    values = weight.view(torch.float8_e4m3fn).to(torch.float32)  # torch's own E4M3FN decoder
    scale = scale_inv.to(torch.float32)
    scale = scale.repeat_interleave(block_size[0], dim=-2)[..., :rows, :]
    scale = scale.repeat_interleave(block_size[1], dim=-1)[..., :cols]
    return (values * scale).to(dtype)


def _check_inputs(weight, scale_inv, block_size, dtype, out) -> tuple[int, ...]:
    if not isinstance(weight, torch.Tensor) or not isinstance(scale_inv, torch.Tensor):
        raise TypeError("fp8_dequant: weight and scale_inv must be torch.Tensor")
    if weight.dtype not in (torch.float8_e4m3fn, torch.uint8):
        raise TypeError(f"fp8_dequant: weight must be float8_e4m3fn or uint8 (raw E4M3FN bits), got {weight.dtype}")
    if scale_inv.dtype not in SCALE_DTYPES:
        raise TypeError(f"fp8_dequant: scale_inv must be float32, bfloat16 or float16, got {scale_inv.dtype}")
    if len(block_size) != 2 or any(int(b) < 1 for b in block_size):
        raise ValueError(f"fp8_dequant: block_size must be two positive ints, got {block_size}")
    if weight.dim() < 2:
        raise ValueError(f"fp8_dequant: weight must have shape [..., R, C], got {list(weight.shape)}")
    expected = _scale_shape(tuple(weight.shape), block_size)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"fp8_dequant: scale_inv has shape {list(scale_inv.shape)}, expected {list(expected)} for weight "
            f"{list(weight.shape)} with block_size {list(block_size)}"
        )
    if weight.device != scale_inv.device:
        raise ValueError(f"fp8_dequant: weight on {weight.device} but scale_inv on {scale_inv.device}")
    if dtype not in OUTPUT_DTYPES:
        raise TypeError(f"fp8_dequant: dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    out_shape = tuple(weight.shape)
    if out is not None:
        check_out("fp8_dequant", out, dtype, out_shape, weight.device, "weight")
    return out_shape


def _dims(weight: torch.Tensor, block_size: tuple[int, int]) -> tuple[int, int, int, int, int]:
    rows, cols = weight.shape[-2], weight.shape[-1]
    batch = weight.numel() // (rows * cols) if rows * cols else 0
    return batch, rows, cols, int(block_size[0]), int(block_size[1])


def _as_bits(out: torch.Tensor) -> torch.Tensor:
    return out.view(torch.int16) if out.dtype == torch.bfloat16 else out


def _torch(weight, scale_inv, block_size, out):
    out.copy_(fp8_dequant_reference(weight, scale_inv, block_size, out.dtype))


def _cpu(weight, scale_inv, block_size, out):
    ext = cpu_extension()
    ext.fp8_dequant(weight.reshape(-1).numpy(), scale_inv.reshape(-1).numpy(), _as_bits(out).reshape(-1).numpy(),
                    *_dims(weight, block_size))


def _cuda(weight, scale_inv, block_size, out):
    ext = cuda_extension()
    with torch.cuda.device(out.device):
        stream = torch.cuda.current_stream(out.device).cuda_stream
        ext.fp8_dequant(weight.data_ptr(), scale_inv.data_ptr(), out.data_ptr(), *_dims(weight, block_size),
                        out.dtype == torch.bfloat16, stream)


def _triton(weight, scale_inv, block_size, out):
    triton_module(out.device)
    kernels = importlib.import_module("lazarus_core.triton_kernels.fp8_dequant")
    kernels.fp8_dequant_triton(weight, scale_inv, out, *_dims(weight, block_size))


_IMPLS = {"cpu": _cpu, "cuda": _cuda, "triton": _triton, "torch": _torch}


def fp8_dequant(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    *,
    block_size: tuple[int, int] = DEFAULT_BLOCK_SIZE,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Decode block-scaled FP8 E4M3FN weights to floating point.

    Parameters
    ----------
    weight : torch.Tensor
        ``torch.float8_e4m3fn`` or ``uint8`` (raw bits) ``[..., R, C]``.
    scale_inv : torch.Tensor
        float32 (bf16 / fp16 are widened exactly) ``[..., ceil(R / br), ceil(C / bc)]``: the multiplier
        of each ``br x bc`` block (DeepSeek-V3 ``weight_scale_inv``).
    block_size : tuple of int, optional
        ``(br, bc)``, default ``(128, 128)``. Edge blocks may be partial.
    dtype : torch.dtype, optional
        ``torch.float32`` (default) or ``torch.bfloat16``.
    out : torch.Tensor, optional
        Contiguous ``[..., R, C]`` tensor of ``dtype`` on the same device, reused as the result.
    backend : str, optional
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"``.

    Returns
    -------
    torch.Tensor
        ``[..., R, C]`` of ``dtype`` (``out`` itself when given): the product rounded once to fp32, then
        (bf16 output) once to bf16 with round-to-nearest-even. NaN codes decode to NaN.

    Raises
    ------
    TypeError
        Wrong input, output or requested dtype.
    ValueError
        ``scale_inv`` shape does not match ``weight`` and ``block_size``, or a wrong ``out`` shape/device.
    BackendUnavailableError
        ``backend`` names a backend that cannot run here.
    """
    block_size = tuple(int(b) for b in block_size)
    out_shape = _check_inputs(weight, scale_inv, block_size, dtype, out)
    impl = select_backend("fp8_dequant", backend, weight.device, _IMPLS)
    if out is None:
        out = torch.empty(out_shape, dtype=dtype, device=weight.device)
    if out.numel() == 0:
        return out
    bits = weight.view(torch.uint8) if weight.dtype == torch.float8_e4m3fn else weight
    impl(bits.contiguous(), scale_inv.to(torch.float32).contiguous(), block_size, out)
    return out
