"""Fused router entropy: per-row entropy of the routing distribution and its column sums, in one pass over the logits.

Per row of raw router logits x [t, E]: p = softmax(x) (``scoring="softmax"``: OLMoE, Mixtral, Qwen,
DeepSeek-V2, GPT-OSS) or p = sigmoid(x) / sum(sigmoid(x)) (``scoring="sigmoid"``: DeepSeek-V3's scores
normalised to sum 1). With y = x or y = log sigmoid(x), d = y - max y, e = exp(d), Z = sum e:
H = log Z - sum(e * d) / Z (no log of a probability, so no 0 * log 0), and prob_sum = sum over rows of e / Z.
"""

from __future__ import annotations

import importlib

import torch

from lazarus_core.ops._backends import cpu_extension, cuda_extension, select_backend, triton_module
from lazarus_core.ops._validate import check_out

SCORINGS = ("softmax", "sigmoid")
LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
TORCH_CHUNK_ROWS = 8192  # 8192 x 64 fp32 = 2 MiB per temporary: fits the caches, amortises torch's call overhead
_LOG2E = 1.4426950408889634  # torch's CPU exp2 is about twice as fast as its exp: work in base 2
_LN2 = 0.6931471805599453


def router_entropy_rows_reference(logits: torch.Tensor, *, scoring: str = "softmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Readable float64 torch version (the reference).

    Parameters
    ----------
    logits : torch.Tensor
        float [t, E] raw router logits.
    scoring : {"softmax", "sigmoid"}

    Returns
    -------
    entropy : torch.Tensor
        float32 [t], nats.
    prob_sum : torch.Tensor
        float64 [E], the probabilities summed over rows.
    """
    x = logits.to(torch.float64)
    if scoring == "softmax":
        p = torch.softmax(x, dim=1)
    else:
        s = torch.sigmoid(x)
        p = s / s.sum(dim=1, keepdim=True)
    entropy = -torch.special.xlogy(p, p).sum(dim=1)  # 0 log 0 = 0
    return entropy.to(torch.float32), p.sum(dim=0)


def _check_inputs(logits: torch.Tensor, scoring: str, out: torch.Tensor | None) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"router_entropy_rows: logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"router_entropy_rows: logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if logits.dim() != 2:
        raise ValueError(f"router_entropy_rows: logits must be [tokens, experts], got shape {list(logits.shape)}")
    if logits.shape[1] < 1:
        raise ValueError("router_entropy_rows: logits must have at least one expert column")
    if scoring not in SCORINGS:
        raise ValueError(f"router_entropy_rows: scoring must be one of {SCORINGS}, got {scoring!r}")
    if out is not None:
        check_out("router_entropy_rows", out, torch.float32, (logits.shape[0],), logits.device, "logits")


def _torch(logits: torch.Tensor, scoring: str, entropy: torch.Tensor, prob_sum: torch.Tensor) -> None:
    """Chunked fp32 torch ops (the fallback where the compiled kernels are absent)."""
    n, experts = logits.shape
    rows = min(TORCH_CHUNK_ROWS, max(n, 1))
    x_buf = torch.empty((rows, experts), dtype=torch.float32, device=logits.device)
    e_buf = torch.empty_like(x_buf)
    prob_sum.zero_()
    with torch.inference_mode():
        for start in range(0, n, TORCH_CHUNK_ROWS):
            stop = min(n, start + TORCH_CHUNK_ROWS)
            x, e = x_buf[: stop - start], e_buf[: stop - start]
            x.copy_(logits[start:stop])  # copy_ into preallocated fp32 converts fp16 ~10x faster than .float()
            if scoring == "sigmoid":
                x.copy_(torch.nn.functional.logsigmoid(x))
            # base 2: y = (x - max) * log2(e), e = 2^y: H = (log2 Z - sum(e * y) / Z) * ln 2
            x.sub_(x.amax(dim=1, keepdim=True)).mul_(_LOG2E)
            torch.exp2(x, out=e)
            z = e.sum(dim=1)
            inv_z = z.reciprocal()
            weighted = x.mul_(e).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).sum(dim=1)  # 0 * -inf -> 0
            entropy[start:stop] = torch.log2(z).sub_(weighted.mul_(inv_z)).mul_(_LN2)
            prob_sum += torch.mv(e.T, inv_z).double()


def _cpu(logits: torch.Tensor, scoring: str, entropy: torch.Tensor, prob_sum: torch.Tensor) -> None:
    x = logits.view(torch.int16) if logits.dtype == torch.bfloat16 else logits
    cpu_extension().router_entropy_rows(x.numpy(), _DTYPE_NAMES[logits.dtype], scoring, entropy.numpy(),
                                        prob_sum.numpy())


def _cuda(logits: torch.Tensor, scoring: str, entropy: torch.Tensor, prob_sum: torch.Tensor) -> None:
    ext = cuda_extension()
    with torch.cuda.device(logits.device):
        stream = torch.cuda.current_stream(logits.device).cuda_stream
        ext.router_entropy_rows(logits.data_ptr(), _DTYPE_CODES[logits.dtype], logits.shape[0], logits.shape[1],
                                scoring == "sigmoid", entropy.data_ptr(), prob_sum.data_ptr(), stream)


def _triton(logits: torch.Tensor, scoring: str, entropy: torch.Tensor, prob_sum: torch.Tensor) -> None:
    triton_module(logits.device)
    kernels = importlib.import_module("lazarus_core.triton_kernels.router_entropy")
    kernels.router_entropy_rows_triton(logits, entropy, prob_sum, sigmoid=scoring == "sigmoid")


_IMPLS = {"cpu": _cpu, "cuda": _cuda, "triton": _triton, "torch": _torch}


def router_entropy_rows(
    logits: torch.Tensor,
    *,
    scoring: str = "softmax",
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy of each row's routing distribution and the distributions' column sums, in one pass.

    Parameters
    ----------
    logits : torch.Tensor
        float16 / bfloat16 / float32 ``[t, E]`` raw router logits (made contiguous if it is not).
    scoring : {"softmax", "sigmoid"}
        ``softmax``: p = softmax(x); ``sigmoid``: p = sigmoid(x) / sum(sigmoid(x)) (DeepSeek-V3).
    out : torch.Tensor, optional
        Contiguous float32 ``[t]`` on the logits' device, reused for the entropies.
    backend : str, optional
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"``.

    Returns
    -------
    entropy : torch.Tensor
        float32 ``[t]``, nats in [0, log E] (``out`` itself when given).
    prob_sum : torch.Tensor
        float64 ``[E]``, sum over rows of p (divide by t for the mean routing distribution).
        -inf logits get probability 0; a row with no defined distribution (softmax: all -inf or a +inf;
        either: a NaN or all -inf) gives NaN, as softmax does.

    Raises
    ------
    TypeError
        logits not a tensor of a supported dtype, or ``out`` of the wrong dtype.
    ValueError
        logits not 2-D or without columns, unknown ``scoring``, a wrong ``out`` shape/device.
    BackendUnavailableError
        ``backend`` names a backend that cannot run here.
    """
    _check_inputs(logits, scoring, out)
    impl = select_backend("router_entropy_rows", backend, logits.device, _IMPLS)
    n, experts = logits.shape
    entropy = torch.empty(n, dtype=torch.float32, device=logits.device) if out is None else out
    prob_sum = torch.zeros(experts, dtype=torch.float64, device=logits.device)
    if n == 0:
        return entropy, prob_sum
    impl(logits.contiguous(), scoring, entropy, prob_sum)
    return entropy, prob_sum
