"""Where the overlay forward spends its time on a GPU: torch.profiler's per-kernel table for each backend
at the gpt-oss-20b layer shape (E=32, H=I=2880, k=4, rank 64), T in {1, 16, 256}.

    python -m benchmarks.profile_overlay_gpu [--tokens 1 16 256] [--backends cuda triton]

Prints the top kernels by device time and the wall time per call (CUDA-synchronised median). A diagnosis
tool, not a benchmark: `python -m benchmarks overlay_moe` gives the figures.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.harness import median_seconds
from lazarus_core.ops import OverlayExperts, overlay_moe_forward

E, H, I, K, RANK = 32, 2880, 2880, 4, 64


def make_overlay(device: str = "cuda") -> OverlayExperts:
    """Random gpt-oss-20b-shaped overlay layer (GPT-OSS activation with biases) on ``device``."""
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s, scale: torch.randn(*s, generator=g, device=device) * scale  # noqa: E731
    base = {"gate": rnd(I, H, scale=H ** -0.5), "up": rnd(I, H, scale=H ** -0.5), "down": rnd(H, I, scale=I ** -0.5)}
    a = {p: rnd(E, base[p].shape[0], RANK, scale=RANK ** -0.5) for p in base}
    b = {p: rnd(E, RANK, base[p].shape[1], scale=0.3 * base[p].shape[1] ** -0.5) for p in base}
    bias = {"gate": rnd(E, I, scale=0.1), "up": rnd(E, I, scale=0.1), "down": rnd(E, H, scale=0.1)}
    return OverlayExperts.from_factors(base, a, b, bias, activation="gpt_oss", device=device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, nargs="*", default=[1, 16, 256])
    parser.add_argument("--backends", nargs="*", default=["cuda", "triton", "torch"])
    parser.add_argument("--rows", type=int, default=14, help="kernels shown per profile")
    args = parser.parse_args()
    ov = make_overlay()
    for tokens in args.tokens:
        g = torch.Generator().manual_seed(tokens)
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens)]).cuda()
        w = torch.softmax(torch.randn(tokens, K, generator=g), -1).cuda()
        x = torch.randn(tokens, H, generator=g).cuda()
        for backend in args.backends:
            call = lambda: overlay_moe_forward(x, ids, w, ov, backend=backend)  # noqa: E731
            t = median_seconds(call, repeats=20, warmup=3)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    call()
                torch.cuda.synchronize()
            print(f"\n=== T={tokens} backend={backend}: median {t * 1e3:.3f} ms per call ===")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
