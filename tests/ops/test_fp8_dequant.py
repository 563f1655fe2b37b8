"""fp8_dequant on every backend that runs here, against an independent float64 E4M3FN oracle."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from lazarus_core import BackendUnavailableError
from lazarus_core.ops import fp8_dequant, fp8_dequant_reference

from .mxfp4_oracle import assert_same_floats

BACKENDS = ["cpu", "cpu-portable", "torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16]


def _dequant(weight, scale_inv, block_size, dtype, backend):
    if backend == "cpu-portable":  # the table path built from the host/device codec the CUDA kernel runs
        import lazarus_core._C as C

        out = torch.empty(weight.shape, dtype=dtype)
        bits = out.view(torch.int16) if dtype == torch.bfloat16 else out
        rows, cols = weight.shape[-2:]
        C.fp8_dequant_portable(weight.contiguous().view(torch.uint8).reshape(-1).numpy(),
                               scale_inv.float().contiguous().reshape(-1).numpy(), bits.reshape(-1).numpy(),
                               weight.numel() // max(rows * cols, 1), rows, cols, *block_size)
        return out
    return fp8_dequant(weight, scale_inv, block_size=block_size, dtype=dtype, backend=backend)


def _e4m3fn_f64(byte: int) -> float:
    """E4M3FN from the spec: sign, 4-bit exponent (bias 7), 3-bit mantissa; S.1111.111 is NaN, no Inf."""
    sign = -1.0 if byte & 0x80 else 1.0
    exponent, mantissa = (byte >> 3) & 15, byte & 7
    if exponent == 15 and mantissa == 7:
        return float("nan")
    if exponent == 0:
        return sign * mantissa / 8.0 * 2.0**-6
    return sign * (1.0 + mantissa / 8.0) * 2.0 ** (exponent - 7)


_TABLE = np.array([_e4m3fn_f64(b) for b in range(256)], dtype=np.float64)


def _expected(weight: torch.Tensor, scale_inv: torch.Tensor, block_size, dtype) -> torch.Tensor:
    """float64 product (exact: 4 x 24 significant bits), rounded once to fp32, then to ``dtype``."""
    values = _TABLE[weight.view(torch.uint8).numpy().astype(np.int64)]
    rows, cols = weight.shape[-2:]
    r_idx = np.arange(rows) // block_size[0]
    c_idx = np.arange(cols) // block_size[1]
    scale = scale_inv.to(torch.float32).numpy().astype(np.float64)[..., r_idx[:, None], c_idx[None, :]]
    with np.errstate(over="ignore"):  # 448 * 3e38 overflows to Inf in fp32, as the kernels must too
        product = (values * scale).astype(np.float32)
    return torch.from_numpy(product).to(dtype)


def test_documented_values():
    w = torch.tensor([[0x38, 0x7E, 0x01, 0x80, 0x7F, 0xFE, 0x08, 0xB8]], dtype=torch.uint8)
    out = fp8_dequant(w, torch.ones(1, 1), block_size=(1, 8), backend="cpu")[0]
    assert out[:3].tolist() == [1.0, 448.0, 2.0**-9]
    assert out[3].item() == 0.0 and torch.signbit(out[3])
    assert torch.isnan(out[4])
    assert out[5:].tolist() == [-448.0, 2.0**-6, -1.0]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_byte_under_edge_scales(backend, dtype):
    # Rows = the 256 byte values; each 4-column block has its own scale, including tiny and huge ones.
    w = torch.arange(256, dtype=torch.int64).to(torch.uint8)[:, None].expand(256, 24).contiguous()
    scales = torch.tensor([1.0, 2.0**-140, 3.0e38, -0.7, 1.0 / 3.0, 2.0**-126], dtype=torch.float32)
    scale_inv = scales[None, :].expand(1, 6).contiguous()
    out = _dequant(w, scale_inv, (256, 4), dtype, backend)
    assert_same_floats(out, _expected(w, scale_inv, (256, 4), dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_byte_in_wide_blocks(backend, dtype):
    # Rows of all 256 codes (permuted) in 128-wide blocks: exercises the 8/16-lane SIMD body and its tails.
    codes = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    w = torch.stack([codes, codes.flip(0), codes.roll(3), codes.roll(77)])
    w = torch.cat([w, w[:, :37]], dim=1).contiguous()  # [4, 293]: 3 column blocks, the last partial
    scale_inv = torch.tensor([[1.0, 2.0**-140, 3.0e38], [-0.7, 1.0 / 3.0, 2.0**-126]])
    assert_same_floats(_dequant(w, scale_inv, (2, 128), dtype, backend), _expected(w, scale_inv, (2, 128), dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape,block", [((1, 1), (128, 128)), ((130, 257), (128, 128)), ((3, 37, 19), (8, 4)), ((2, 1, 5, 7), (2, 3))],
    ids=str,
)
def test_random_odd_shapes_partial_blocks(backend, dtype, shape, block):
    w = torch.randint(0, 256, shape, dtype=torch.uint8)
    scale_shape = (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))
    scale_inv = torch.randn(scale_shape) * 3
    out = _dequant(w, scale_inv, block, dtype, backend)
    assert_same_floats(out, _expected(w, scale_inv, block, dtype))


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_float8_input_bf16_scales_and_strides(backend):
    w = torch.randint(0, 256, (40, 24), dtype=torch.uint8).view(torch.float8_e4m3fn).t()  # [24, 40], strided
    scale_inv = torch.randn(3, 5).to(torch.bfloat16)
    assert not w.is_contiguous()
    out = fp8_dequant(w, scale_inv, block_size=(8, 8), backend=backend)
    assert_same_floats(out, _expected(w.contiguous(), scale_inv, (8, 8), torch.float32))


def test_reference_matches_oracle():
    w = torch.randint(0, 256, (2, 300, 260), dtype=torch.uint8)
    scale_inv = torch.rand(2, 3, 3) + 0.5
    for dtype in DTYPES:
        assert_same_floats(fp8_dequant_reference(w, scale_inv, dtype=dtype), _expected(w, scale_inv, (128, 128), dtype))


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_empty_and_out_reuse(backend):
    assert fp8_dequant(torch.zeros(0, 5, dtype=torch.uint8), torch.zeros(0, 1), backend=backend).shape == (0, 5)
    w = torch.randint(0, 256, (5, 9), dtype=torch.uint8)
    out = torch.full((5, 9), 7.0)
    assert fp8_dequant(w, torch.ones(1, 1) * 2, out=out, backend=backend).data_ptr() == out.data_ptr()
    assert_same_floats(out, _expected(w, torch.ones(1, 1) * 2, (128, 128), torch.float32))


@pytest.mark.parametrize(
    "weight,scale,kwargs,error,match",
    [
        (torch.zeros(4, 4, dtype=torch.int8), torch.ones(1, 1), {}, TypeError, "float8_e4m3fn or uint8"),
        (torch.zeros(4, 4, dtype=torch.uint8), torch.ones(1, 1, dtype=torch.int32), {}, TypeError, "scale_inv must be"),
        (torch.zeros(4, dtype=torch.uint8), torch.ones(1), {}, ValueError, r"\[\.\.\., R, C\]"),
        (torch.zeros(4, 260, dtype=torch.uint8), torch.ones(1, 1), {}, ValueError, r"expected \[1, 3\]"),
        (torch.zeros(4, 4, dtype=torch.uint8), torch.ones(1, 1), {"block_size": (0, 4)}, ValueError, "block_size"),
        (torch.zeros(4, 4, dtype=torch.uint8), torch.ones(1, 1), {"dtype": torch.float16}, TypeError, "dtype"),
        (torch.zeros(4, 4, dtype=torch.uint8), torch.ones(1, 1), {"out": torch.zeros(4, 5)}, ValueError, "out has shape"),
        (torch.zeros(4, 4, dtype=torch.uint8), torch.ones(1, 1), {"backend": "cuda"}, ValueError, "CUDA tensors"),
    ],
    ids=["weight-int8", "scale-int", "1d-weight", "scale-shape", "block-zero", "fp16-out", "out-shape", "cuda-cpu"],
)
def test_bad_input(weight, scale, kwargs, error, match):
    with pytest.raises(error, match=match):
        fp8_dequant(weight, scale, **kwargs)


def test_triton_without_interpreter_on_cpu_is_unavailable(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        fp8_dequant(torch.zeros(1, 1, dtype=torch.uint8), torch.ones(1, 1), backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_gpu_backends(backend, dtype):
    w = torch.randint(0, 256, (3, 257, 130), dtype=torch.uint8)
    scale_inv = torch.randn(3, 3, 2)
    out = fp8_dequant(w.cuda(), scale_inv.cuda(), dtype=dtype, backend=backend).cpu()
    assert_same_floats(out, _expected(w, scale_inv, (128, 128), dtype))


_COMPILE_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lazarus_core.triton_kernels.fp8_dequant import _fp8_dequant_kernel
for out_ty, bits in (("*fp32", False), ("*i16", True)):
    sig = {"weight_ptr": "*u8", "scale_ptr": "*fp32", "out_ptr": out_ty, "total_rows": "i64", "rows": "i64",
           "cols": "i64", "block_rows": "i64", "block_cols": "i64",
           "BLOCK_R": "constexpr", "BLOCK_C": "constexpr", "BF16_BITS": "constexpr", "ROW_SCALE": "constexpr"}
    for row_scale in (False, True):
        src = ASTSource(fn=_fp8_dequant_kernel, signature=sig,
                        constexprs={"BLOCK_R": 32, "BLOCK_C": 128, "BF16_BITS": bits, "ROW_SCALE": row_scale})
        assert triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["cubin"]
print("compiled")
"""


def test_triton_kernel_compiles_for_sm90():
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: _C_cuda is not built")
def test_cuda_extension_exposes_fp8_dequant():
    import lazarus_core._C_cuda as cuda_ext

    assert hasattr(cuda_ext, "fp8_dequant")
