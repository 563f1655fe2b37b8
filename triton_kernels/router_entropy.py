"""Router entropy in Triton: each program takes BLOCK_R whole rows (BLOCK_E >= E columns) of raw logits,
converts them to fp32 in registers and writes each row's entropy and the block's float64 column sums of p.

The column sums go to one float64 partial row per program, reduced by the launcher (no atomics: the same
result on every run, and nothing the interpreter has to emulate).
"""

import torch
import triton
import triton.language as tl

DEFAULT_BLOCK_ELEMENTS = 4096  # BLOCK_R * BLOCK_E per program: large blocks keep the interpreter's program count low


@triton.jit
def _router_entropy_kernel(x_ptr, entropy_ptr, partial_ptr, rows, experts,
                           BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, SIGMOID: tl.constexpr):
    pid = tl.program_id(0)
    r = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    c = tl.arange(0, BLOCK_E)
    row_ok = r < rows
    col_ok = c < experts
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + r[:, None] * experts + c[None, :], mask=mask, other=float("-inf")).to(tl.float32)
    if SIGMOID:  # log sigmoid(x) = min(x, 0) - log(1 + exp(-|x|))
        y = tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))
    else:
        y = x
    y_max = tl.max(y, axis=1)
    d = y - y_max[:, None]
    e = tl.where(mask, tl.exp(d), 0.0)  # padding rows have y_max = -inf (d NaN): masked to 0
    z = tl.sum(e, axis=1)
    s = tl.sum(tl.where(e > 0.0, e * d, 0.0), axis=1)
    tl.store(entropy_ptr + r, tl.log(z) - s / z, mask=row_ok)
    p = tl.where(mask, e / z[:, None], 0.0)
    tl.store(partial_ptr + pid.to(tl.int64) * BLOCK_E + c, tl.sum(p.to(tl.float64), axis=0), mask=col_ok)


def router_entropy_rows_triton(logits: torch.Tensor, entropy: torch.Tensor, prob_sum: torch.Tensor, *,
                               sigmoid: bool, block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> None:
    """Fill ``entropy`` float32 [t] and ``prob_sum`` float64 [E] from contiguous ``logits`` [t, E].

    Parameters
    ----------
    logits : torch.Tensor
        Contiguous fp32 / fp16 / bf16 [t, E] (validated by :func:`lazarus_core.ops.router_entropy_rows`).
    entropy : torch.Tensor
        float32 [t], written.
    prob_sum : torch.Tensor
        float64 [E], overwritten.
    sigmoid : bool
        DeepSeek-V3 scoring (sigmoid normalised) instead of softmax.
    block_elements : int
        Rows per program x padded columns (a power of two).
    """
    rows, experts = logits.shape
    block_e = triton.next_power_of_2(max(experts, 1))
    block_r = max(1, min(block_elements // block_e, triton.next_power_of_2(max(rows, 1))))
    grid = triton.cdiv(rows, block_r)
    partial = torch.empty((grid, block_e), dtype=torch.float64, device=logits.device)
    _router_entropy_kernel[(grid,)](logits, entropy, partial, rows, experts,
                                    BLOCK_R=block_r, BLOCK_E=block_e, SIGMOID=sigmoid)
    torch.sum(partial[:, :experts], dim=0, out=prob_sum)
