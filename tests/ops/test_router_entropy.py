"""router_entropy_rows on every backend that runs here, against the float64 reference."""

import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from lazarus_core import BackendUnavailableError
from lazarus_core.ops import router_entropy_rows, router_entropy_rows_reference
from lazarus_core.ops import _backends

BACKENDS = ["cpu", "cpu-portable", "torch", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
SCORINGS = ["softmax", "sigmoid"]
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # NaN on masked padding (interpreter)

ENTROPY_ATOL = 1e-5  # nats, against float64 on the same (low-precision) input values
PROB_RTOL = 1e-5


def _run(logits, scoring, backend):
    if backend == "cpu-portable":  # the host/device arithmetic the CUDA kernel runs
        import lazarus_core._C as C

        x = logits.contiguous()
        name = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[x.dtype]
        entropy = torch.empty(x.shape[0], dtype=torch.float32)
        prob_sum = torch.empty(x.shape[1], dtype=torch.float64)
        bits = x.view(torch.int16) if x.dtype == torch.bfloat16 else x
        C.router_entropy_rows_portable(bits.numpy(), name, scoring, entropy.numpy(), prob_sum.numpy())
        return entropy, prob_sum
    return router_entropy_rows(logits, scoring=scoring, backend=backend)


def _check(logits, scoring, backend):
    entropy, prob_sum = _run(logits, scoring, backend)
    ref_h, ref_p = router_entropy_rows_reference(logits, scoring=scoring)
    assert entropy.dtype == torch.float32 and entropy.shape == (logits.shape[0],)
    assert prob_sum.dtype == torch.float64 and prob_sum.shape == (logits.shape[1],)
    torch.testing.assert_close(entropy, ref_h, atol=ENTROPY_ATOL, rtol=0)
    torch.testing.assert_close(prob_sum, ref_p, atol=1e-6 * max(logits.shape[0], 1), rtol=PROB_RTOL)
    return entropy, prob_sum


def _random_logits(t, e, dtype, scale=3.0):
    return (torch.randn(t, e) * scale + torch.randn(e)).to(dtype)


@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("experts", [1, 3, 8, 64, 129])
@pytest.mark.parametrize("tokens", [0, 1, 7, 1000])
@pytest.mark.parametrize("backend", BACKENDS)
def test_random_against_reference(backend, tokens, experts, dtype, scoring):
    if backend == "triton" and tokens * experts > 20_000:
        pytest.skip("interpreter: small shapes only")
    _check(_random_logits(tokens, experts, dtype), scoring, backend)


@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_equal_logits_give_log_e(backend, dtype, scoring):
    logits = torch.full((5, 37), 1.25, dtype=dtype)
    logits[1] = -7.0
    entropy, prob_sum = _check(logits, scoring, backend)
    torch.testing.assert_close(entropy, torch.full((5,), math.log(37), dtype=torch.float32), atol=ENTROPY_ATOL, rtol=0)
    torch.testing.assert_close(prob_sum, torch.full((37,), 5 / 37, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_huge_logit_gives_zero(backend, dtype):
    logits = torch.zeros(3, 64, dtype=dtype)
    logits[:, 5] = 30000.0 if dtype == torch.float16 else 1e5
    entropy, prob_sum = _check(logits, "softmax", backend)
    assert entropy.abs().max().item() < ENTROPY_ATOL
    assert abs(prob_sum[5].item() - 3.0) < 1e-6 and prob_sum.sum().item() == pytest.approx(3.0)


@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_logits_get_zero_probability(backend, dtype, scoring):
    logits = _random_logits(9, 13, dtype)
    logits[:, [0, 4, 12]] = float("-inf")
    logits[3, :] = float("-inf")
    logits[3, 1] = 0.5  # one finite expert left: entropy 0
    entropy, prob_sum = _check(logits, scoring, backend)
    assert prob_sum[[0, 4, 12]].abs().max().item() == 0.0
    assert abs(entropy[3].item()) < ENTROPY_ATOL
    assert torch.isfinite(entropy).all()


@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_fp16_magnitudes(backend, scoring):
    logits = _random_logits(50, 64, torch.float32)
    pick = torch.rand(50, 64)
    logits[pick < 0.05] = 60000.0
    logits[pick > 0.95] = -60000.0
    _check(logits.to(torch.float16), scoring, backend)


@pytest.mark.parametrize("shift", [-50.0, -70.0, -100.0, 40.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sigmoid_far_from_zero(backend, shift):
    # sigmoid scores that are all tiny (or all near 1): the row max decides how the CPU kernel weighs them
    logits = _random_logits(30, 40, torch.float32, scale=8.0) + shift
    _check(logits, "sigmoid", backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_undefined_rows_are_nan(backend):
    logits = torch.zeros(3, 10)
    logits[1, :] = float("-inf")
    entropy, _ = _run(logits, "softmax", backend)
    assert torch.isnan(entropy[1]) and torch.isfinite(entropy[[0, 2]]).all()


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_strided_input_and_out(backend):
    base = _random_logits(40, 96, torch.float16)
    strided = base[::2, :64]
    out = torch.empty(20)
    entropy, prob_sum = router_entropy_rows(strided, out=out, backend=backend)
    ref_h, ref_p = router_entropy_rows_reference(strided)
    assert entropy is out
    torch.testing.assert_close(entropy, ref_h, atol=ENTROPY_ATOL, rtol=0)
    torch.testing.assert_close(prob_sum, ref_p, atol=1e-6, rtol=PROB_RTOL)


def test_cpu_matches_portable_closely():
    logits = _random_logits(3000, 64, torch.float16)
    for scoring in SCORINGS:
        h_simd, p_simd = router_entropy_rows(logits, scoring=scoring, backend="cpu")
        h_port, p_port = _run(logits, scoring, "cpu-portable")
        torch.testing.assert_close(h_simd, h_port, atol=2e-6, rtol=0)
        torch.testing.assert_close(p_simd, p_port, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "logits, kwargs, error, match",
    [
        (torch.zeros(2, 4, dtype=torch.int32), {}, TypeError, "float32, float16 or bfloat16"),
        (torch.zeros(8), {}, ValueError, r"\[tokens, experts\]"),
        (torch.zeros(3, 0), {}, ValueError, "at least one expert"),
        (torch.zeros(2, 4), {"scoring": "sparsemax"}, ValueError, "scoring must be"),
        (torch.zeros(2, 4), {"out": torch.zeros(3)}, ValueError, "out has shape"),
        (torch.zeros(2, 4), {"out": torch.zeros(2, dtype=torch.float64)}, TypeError, "out has dtype"),
        (torch.zeros(2, 4), {"out": torch.zeros(4)[::2]}, ValueError, "contiguous"),
        (torch.zeros(2, 4), {"backend": "gpu"}, ValueError, "backend must be"),
        (torch.zeros(2, 4), {"backend": "cuda"}, ValueError, "CUDA tensors"),
        (np.zeros((2, 4), dtype=np.float32), {}, TypeError, "torch.Tensor"),
    ],
    ids=["int32", "1d", "no-experts", "unknown-scoring", "out-shape", "out-dtype", "out-strided", "unknown-backend",
         "cuda-with-cpu-tensors", "numpy-input"],
)
def test_bad_input(logits, kwargs, error, match):
    with pytest.raises(error, match=match):
        router_entropy_rows(logits, **kwargs)


def test_triton_without_interpreter_on_cpu_is_unavailable(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        router_entropy_rows(torch.zeros(2, 4), backend="triton")


def test_missing_cpu_extension(monkeypatch):
    monkeypatch.setattr(_backends, "_import_extension", lambda name: f"lazarus_core.{name} is missing")
    with pytest.raises(BackendUnavailableError, match="compiled extension"):
        router_entropy_rows(torch.zeros(2, 4), backend="cpu")
    entropy, _ = router_entropy_rows(torch.zeros(2, 4), backend="auto")  # auto falls back to torch
    torch.testing.assert_close(entropy, torch.full((2,), math.log(4), dtype=torch.float32))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: _C_cuda is not built")
def test_cuda_backend_without_gpu_is_unavailable():
    import lazarus_core._C_cuda as cuda_ext

    if cuda_ext.device_count() > 0:
        pytest.skip("a CUDA device is present; this test covers the no-GPU case")
    assert hasattr(cuda_ext, "router_entropy_rows")
    with pytest.raises(BackendUnavailableError, match="needs a CUDA device"):
        _backends.cuda_extension()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(0, 8), (1, 1), (7, 3), (1000, 64), (333, 129), (64, 7000)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backends(backend, shape, dtype, scoring):
    logits = _random_logits(*shape, dtype)
    logits[:, 0] = float("-inf")
    entropy, prob_sum = router_entropy_rows(logits.cuda(), scoring=scoring, backend=backend)
    ref_h, ref_p = router_entropy_rows_reference(logits, scoring=scoring)
    torch.testing.assert_close(entropy.cpu(), ref_h, atol=ENTROPY_ATOL, rtol=0)
    torch.testing.assert_close(prob_sum.cpu(), ref_p, atol=1e-6 * max(shape[0], 1), rtol=PROB_RTOL)


_COMPILE_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lazarus_core.triton_kernels.router_entropy import _router_entropy_kernel
target = GPUTarget("cuda", 90, 32)
for src in ("*fp16", "*bf16", "*fp32"):
    for sigmoid in (False, True):
        sig = {"x_ptr": src, "entropy_ptr": "*fp32", "partial_ptr": "*fp64", "rows": "i64", "experts": "i64",
               "BLOCK_R": "constexpr", "BLOCK_E": "constexpr", "SIGMOID": "constexpr"}
        k = triton.compile(ASTSource(fn=_router_entropy_kernel, signature=sig,
                                     constexprs={"BLOCK_R": 64, "BLOCK_E": 64, "SIGMOID": sigmoid}), target=target)
        assert k.asm["cubin"]
print("compiled")
"""


def test_triton_kernel_compiles_for_sm90():
    # Outside the interpreter (a fresh process without TRITON_INTERPRET): real PTX/cubin for sm_90.
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-2000:]
