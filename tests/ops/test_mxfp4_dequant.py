"""mxfp4_dequant on every backend that runs here, against an independent float64 oracle."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from lazarus_core import BackendUnavailableError
from lazarus_core.ops import mxfp4_dequant, mxfp4_dequant_reference
from lazarus_core.ops._backends import cuda_extension

from .mxfp4_oracle import assert_same_floats, decode_f64

BACKENDS = ["cpu", "cpu-portable", "torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16]


def _dequant(blocks, scales, dtype, backend):
    if backend == "cpu-portable":  # the shared host/device arithmetic the CUDA kernel runs
        import lazarus_core._C as C

        out = torch.empty((*scales.shape[:-1], scales.shape[-1] * 32), dtype=dtype)
        bits = out.view(torch.int16) if dtype == torch.bfloat16 else out
        C.mxfp4_dequant_portable(blocks.contiguous().reshape(-1, 16).numpy(), scales.contiguous().reshape(-1).numpy(),
                                 bits.reshape(-1).numpy())
        return out
    return mxfp4_dequant(blocks, scales, dtype=dtype, backend=backend)


def _expected(blocks, scales, dtype):
    return torch.from_numpy(decode_f64(blocks.numpy(), scales.numpy())).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [0, 1, 2, 100, 127, 128, 200, 253, 254, 255])
def test_every_byte_under_edge_scales(backend, dtype, scale):
    # 16 blocks x 16 bytes = all 256 byte values, every block with the same scale byte.
    blocks = torch.arange(256, dtype=torch.int64).to(torch.uint8).reshape(16, 16)
    scales = torch.full((16,), scale, dtype=torch.uint8)
    assert_same_floats(_dequant(blocks, scales, dtype, backend), _expected(blocks, scales, dtype))


def test_documented_examples():
    blocks = torch.zeros(3, 16, dtype=torch.uint8)
    blocks[0, 0], blocks[1, 0], blocks[2, 0] = 0x21, 0xF7, 0x80
    scales = torch.tensor([127, 128, 127], dtype=torch.uint8)
    for backend in ("cpu", "torch", "triton"):
        out = mxfp4_dequant(blocks, scales, backend=backend).reshape(3, 32)  # G = 3 blocks along one axis
        assert out[0, :2].tolist() == [0.5, 1.0]
        assert out[1, :2].tolist() == [12.0, -12.0]
        assert out[2, 0].item() == 0.0 and not torch.signbit(out[2, 0]) and torch.signbit(out[2, 1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_zero_is_subnormal_not_flushed(backend):
    blocks = torch.full((1, 16), 0x72, dtype=torch.uint8)  # codes 2 (1.0) and 7 (6.0)
    out = _dequant(blocks, torch.zeros(1, dtype=torch.uint8), torch.float32, backend)
    assert out[0].item() == 2.0**-127 and out[1].item() == 6.0 * 2.0**-127


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 13), (1, 3, 1, 9)], ids=str)
def test_random_odd_shapes(backend, dtype, shape):
    blocks = torch.randint(0, 256, (*shape, 16), dtype=torch.uint8)
    scales = torch.randint(0, 256, shape, dtype=torch.uint8)
    assert_same_floats(_dequant(blocks, scales, dtype, backend), _expected(blocks, scales, dtype))


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_strided_inputs(backend):
    blocks = torch.randint(0, 256, (6, 5, 16), dtype=torch.uint8).transpose(0, 1)  # [5, 6, 16], not contiguous
    scales = torch.randint(100, 150, (6, 5), dtype=torch.uint8).t()
    assert not blocks.is_contiguous()
    expected = _expected(blocks.contiguous(), scales.contiguous(), torch.float32)
    assert_same_floats(mxfp4_dequant(blocks, scales, backend=backend), expected)


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
@pytest.mark.parametrize("shape", [(0,), (4, 0), (0, 3)], ids=str)
def test_empty(backend, shape):
    out = mxfp4_dequant(torch.zeros((*shape, 16), dtype=torch.uint8), torch.zeros(shape, dtype=torch.uint8), backend=backend)
    assert out.shape == (*shape[:-1], shape[-1] * 32) and out.numel() == 0


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_out_buffer_is_reused(backend):
    blocks = torch.randint(0, 256, (4, 3, 16), dtype=torch.uint8)
    scales = torch.randint(120, 135, (4, 3), dtype=torch.uint8)
    out = torch.full((4, 96), 7.0)
    result = mxfp4_dequant(blocks, scales, out=out, backend=backend)
    assert result.data_ptr() == out.data_ptr()
    assert_same_floats(out, _expected(blocks, scales, torch.float32))


def test_reference_matches_oracle_large_random():
    blocks = torch.randint(0, 256, (64, 33, 16), dtype=torch.uint8)
    scales = torch.randint(0, 256, (64, 33), dtype=torch.uint8)
    assert_same_floats(mxfp4_dequant_reference(blocks, scales), _expected(blocks, scales, torch.float32))
    assert_same_floats(mxfp4_dequant(blocks, scales, backend="cpu"), _expected(blocks, scales, torch.float32))


@pytest.mark.parametrize(
    "blocks,scales,kwargs,error,match",
    [
        (torch.zeros(2, 16, dtype=torch.int8), torch.zeros(2, dtype=torch.uint8), {}, TypeError, "blocks must be uint8"),
        (torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(2), {}, TypeError, "scales must be uint8"),
        (torch.zeros(2, 15, dtype=torch.uint8), torch.zeros(2, dtype=torch.uint8), {}, ValueError, r"\[\.\.\., G, 16\]"),
        (torch.zeros(16, dtype=torch.uint8), torch.zeros(1, dtype=torch.uint8), {}, ValueError, r"\[\.\.\., G, 16\]"),
        (torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8), {}, ValueError, "must equal scales.shape"),
        (torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(2, dtype=torch.uint8), {"dtype": torch.float16}, TypeError, "dtype"),
        (torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(2, dtype=torch.uint8), {"out": torch.zeros(63)}, ValueError, "out has shape"),
        (torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(2, dtype=torch.uint8),
         {"out": torch.zeros(64, dtype=torch.bfloat16)}, TypeError, "out has dtype"),
        (torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(2, dtype=torch.uint8),
         {"out": torch.zeros(128)[::2]}, ValueError, "contiguous"),
        (torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(2, dtype=torch.uint8), {"backend": "gpu"}, ValueError, "backend must be"),
        (torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(2, dtype=torch.uint8), {"backend": "cuda"}, ValueError, "CUDA tensors"),
        (np.zeros((2, 16), dtype=np.uint8), torch.zeros(2, dtype=torch.uint8), {}, TypeError, "torch.Tensor"),
    ],
    ids=["blocks-int8", "scales-float", "last-axis-15", "1d-blocks", "shape-mismatch", "fp16-output",
         "out-shape", "out-dtype", "out-strided", "unknown-backend", "cuda-with-cpu-tensors", "numpy-input"],
)
def test_bad_input(blocks, scales, kwargs, error, match):
    with pytest.raises(error, match=match):
        mxfp4_dequant(blocks, scales, **kwargs)


def test_triton_without_interpreter_on_cpu_is_unavailable(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        mxfp4_dequant(torch.zeros(1, 16, dtype=torch.uint8), torch.zeros(1, dtype=torch.uint8), backend="triton")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: _C_cuda is not built")
def test_cuda_extension_built_and_imports_without_gpu():
    import lazarus_core._C_cuda as cuda_ext

    if cuda_ext.device_count() > 0:
        pytest.skip("a CUDA device is present; this test covers the no-GPU case")
    assert "no CUDA device" in cuda_ext.device_status()
    with pytest.raises(BackendUnavailableError, match="needs a CUDA device"):
        cuda_extension()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_gpu_backends(backend, dtype):
    blocks = torch.randint(0, 256, (7, 33, 16), dtype=torch.uint8)
    scales = torch.randint(0, 256, (7, 33), dtype=torch.uint8)
    out = mxfp4_dequant(blocks.cuda(), scales.cuda(), dtype=dtype, backend=backend).cpu()
    assert_same_floats(out, _expected(blocks, scales, dtype))


_COMPILE_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lazarus_core.triton_kernels.mxfp4_dequant import _mxfp4_dequant_kernel
from lazarus_core.triton_kernels.mxfp4_quantize import _mxfp4_quantize_kernel
target = GPUTarget("cuda", 90, 32)
for out_ty, bits in (("*fp32", False), ("*i16", True)):
    sig = {"blocks_ptr": "*u8", "scales_ptr": "*u8", "out_ptr": out_ty, "n_blocks": "i64",
           "BLOCK_G": "constexpr", "BF16_BITS": "constexpr"}
    k = triton.compile(ASTSource(fn=_mxfp4_dequant_kernel, signature=sig, constexprs={"BLOCK_G": 64, "BF16_BITS": bits}), target=target)
    assert k.asm["cubin"]
sig = {"w_ptr": "*fp32", "blocks_ptr": "*u8", "scales_ptr": "*u8", "n_blocks": "i64", "BLOCK_G": "constexpr"}
k = triton.compile(ASTSource(fn=_mxfp4_quantize_kernel, signature=sig, constexprs={"BLOCK_G": 64}), target=target)
assert k.asm["cubin"]
from lazarus_core.triton_kernels.dequant_axpby import _float_axpby_kernel, _mxfp4_axpby_kernel
sig = {"blocks_ptr": "*u8", "scales_ptr": "*u8", "y_ptr": "*fp32", "out_ptr": "*fp32", "n_blocks": "i64",
       "alpha": "fp32", "beta": "fp32", "BLOCK_G": "constexpr", "EXACT": "constexpr"}
assert triton.compile(ASTSource(fn=_mxfp4_axpby_kernel, signature=sig, constexprs={"BLOCK_G": 64, "EXACT": True}),
                      target=target).asm["cubin"]
for src in ("*bf16", "*fp16", "*fp32"):
    sig = {"src_ptr": src, "y_ptr": "*fp32", "out_ptr": "*fp32", "n": "i64", "alpha": "fp32", "beta": "fp32",
           "BLOCK_N": "constexpr", "EXACT": "constexpr"}
    assert triton.compile(ASTSource(fn=_float_axpby_kernel, signature=sig, constexprs={"BLOCK_N": 4096, "EXACT": True}),
                          target=target).asm["cubin"]
print("compiled")
"""


def test_triton_kernels_compile_for_sm90():
    # Outside the interpreter (a fresh process without TRITON_INTERPRET): real PTX/cubin for sm_90.
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-2000:]


def test_no_top_level_triton_kernels_module():
    import importlib

    import lazarus_core.triton_kernels as ours

    assert ours.__name__ == "lazarus_core.triton_kernels"
    try:
        importlib.import_module("triton_kernels")
    except ImportError:
        return
    pytest.fail("a top-level `triton_kernels` module is importable; it must ship only inside lazarus_core")
