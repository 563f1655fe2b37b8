"""Overlay MoE forward vs transformers' experts implementations on the full weights, and vs the floor.

One MoE layer at the gpt-oss-20b shape (E=32, H=I=2880, k=4, GPT-OSS clamped SwiGLU with biases), rank 64 per
projection, synthetic fp32 weights built as ``base + A[e] @ B[e]`` so both paths compute the same layer
(checked first). Floors: at T=1 the weight bytes that must be read (bases + the selected experts' factors)
over the measured copy bandwidth (bytes read + written per second); at T=256 the GEMM flops over the
measured fp32 matmul rate; T=16 takes the larger of the two.

Run `python -m benchmarks overlay_moe`.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from benchmarks.harness import BenchRow, available_backends, measure_copy_bandwidth, median_seconds
from lazarus_core.ops import OverlayExperts, overlay_moe_forward
from lazarus_core.ops.overlay_moe import _IMPLS, overlay_moe_bytes, overlay_moe_flops
from lazarus_core.overlay.graphs import GraphCache

E, H, I, K, RANK = 32, 2880, 2880, 4, 64
TOKENS = (1, 16, 256)
IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
BATCHED_MM_MAX_BYTES = 2 << 30  # batched_mm copies the selected weights of every (token, expert) pair


def make_layer(seed: int = 0, device: str = "cpu") -> tuple[OverlayExperts, torch.nn.Module]:
    """The overlay and a transformers ``GptOssExperts`` holding the same experts as full fp32 weights, on ``device``."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale: torch.randn(*s, generator=g) * scale  # noqa: E731
    base = {"gate": rnd(I, H, scale=H ** -0.5), "up": rnd(I, H, scale=H ** -0.5), "down": rnd(H, I, scale=I ** -0.5)}
    a = {p: rnd(E, base[p].shape[0], RANK, scale=RANK ** -0.5) for p in base}
    b = {p: rnd(E, RANK, base[p].shape[1], scale=0.3 * base[p].shape[1] ** -0.5) for p in base}
    bias = {"gate": rnd(E, I, scale=0.1), "up": rnd(E, I, scale=0.1), "down": rnd(E, H, scale=0.1)}
    ov = OverlayExperts.from_factors(base, a, b, bias, activation="gpt_oss", device=device)
    cfg = GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        experts = GptOssExperts(cfg)
    with torch.no_grad():
        gate, up, down = (ov.reconstruct(p) for p in ("gate", "up", "down"))   # [E, out, in]
        experts.gate_up_proj.data = torch.empty(E, H, 2 * I)
        experts.gate_up_proj.data[:, :, 0::2] = gate.transpose(1, 2)
        experts.gate_up_proj.data[:, :, 1::2] = up.transpose(1, 2)
        del gate, up
        experts.down_proj.data = down.transpose(1, 2).contiguous()
        del down
        experts.gate_up_proj_bias.data = torch.stack([bias["gate"], bias["up"]], -1).reshape(E, 2 * I)
        experts.down_proj_bias.data = bias["down"].clone()
    return ov, experts.to(device).eval()


def _routing(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens)])
    return ids, torch.softmax(torch.randn(tokens, K, generator=g), -1)


def measure_matmul_rate(device: str = "cpu") -> float:
    """fp32 FLOP/s of torch.matmul on the layer's largest product ([256, 2880] @ [2880, 5760])."""
    x, w = torch.randn(256, H, device=device), torch.randn(H, 2 * I, device=device)
    return 2 * 256 * H * 2 * I / median_seconds(lambda: x @ w, repeats=10, cuda_events=device == "cuda")


def _graphed_reference(experts, impl: str, x, ids, w, reps: int) -> float | None:
    """Median time of transformers' ``impl`` replayed from a CUDA graph, or None if it cannot be captured."""
    experts.config._experts_implementation = impl
    graphs = GraphCache(max_tokens=max(TOKENS))
    try:
        graphs.run(experts, x, ids, w)
    except (RuntimeError, NotImplementedError) as exc:  # a host sync inside: not capturable
        print(f"transformers {impl} not capturable in a CUDA graph: {str(exc).splitlines()[0][:120]}")
        torch.cuda.synchronize()
        return None
    return median_seconds(lambda: graphs.run(experts, x, ids, w), repeats=reps, warmup=1, cuda_events=True)


def run(repeats: int = 10) -> tuple[list[BenchRow], dict]:
    """Measure transformers' implementations and the overlay at every T; returns (rows, floors).

    On a machine with a CUDA device everything runs there (fp32, TF32 off: torch's default for matmul)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = device == "cuda"
    copy_bw = measure_copy_bandwidth(device=device)
    flop_rate = measure_matmul_rate(device)
    ov, experts = make_layer(device=device)
    full_bytes_per_expert = 4 * (3 * H * I)
    rows = []
    for tokens in TOKENS:
        ids, w = (t.to(device) for t in _routing(tokens, tokens))
        x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(tokens + 1)).to(device)
        label = f"E={E} H=I={H} k={K} r={RANK} T={tokens}"
        reps = max(3, repeats // (4 if tokens >= 256 else 1))
        with torch.no_grad():
            ref_times, expected = {}, None
            for impl in IMPLEMENTATIONS:
                if impl == "batched_mm" and tokens * K * full_bytes_per_expert > BATCHED_MM_MAX_BYTES:
                    continue
                experts.config._experts_implementation = impl
                try:
                    out = experts(x, ids, w)
                except (RuntimeError, NotImplementedError) as exc:  # e.g. a kernel without fp32 on this device
                    print(f"transformers {impl} skipped at T={tokens}: {str(exc).splitlines()[0][:120]}")
                    continue
                expected = out if expected is None else expected
                torch.testing.assert_close(out, expected, atol=2e-3, rtol=2e-3)
                ref_times[impl] = median_seconds(lambda: experts(x, ids, w), repeats=reps, warmup=1,
                                                cuda_events=gpu)
            fastest = min(ref_times, key=ref_times.get)
            for impl, t in ref_times.items():
                rows.append(BenchRow("transformers experts", impl, label, "fp32", t * 1e3, None, None,
                                     ref_times[fastest] / t, {"tokens": tokens}))
            graphed_ref = _graphed_reference(experts, fastest, x, ids, w, reps) if gpu else None
            if graphed_ref is not None:
                rows.append(BenchRow("transformers experts", f"{fastest} + CUDA graph", label, "fp32",
                                     graphed_ref * 1e3, None, None, ref_times[fastest] / graphed_ref,
                                     {"tokens": tokens}))
            moved, flops = overlay_moe_bytes(tokens, K, ov), overlay_moe_flops(tokens, K, ov)
            floor = {1: moved / copy_bw, 256: flops / flop_rate}.get(tokens, max(moved / copy_bw, flops / flop_rate))
            for backend in available_backends("overlay_moe_forward", _IMPLS, torch.device(device)) + ["torch"]:
                out = overlay_moe_forward(x, ids, w, ov, backend=backend)
                torch.testing.assert_close(out, expected, atol=2e-3, rtol=2e-3)  # correctness first
                t = median_seconds(lambda: overlay_moe_forward(x, ids, w, ov, backend=backend), repeats=reps,
                                   warmup=1, cuda_events=gpu)
                rows.append(BenchRow("overlay_moe_forward", backend, label, "fp32", t * 1e3, moved / t / 1e9,
                                     100 * floor / t, ref_times[fastest] / t,
                                     {"tokens": tokens, "floor_ms": floor * 1e3, "gflop_per_s": flops / t / 1e9,
                                      "reference": f"transformers {fastest}"}))
                if gpu and backend in ("cuda", "triton"):  # as the model integration runs decode: a CUDA graph
                    graphs = GraphCache(max_tokens=max(TOKENS))
                    fwd = lambda a, b, c: overlay_moe_forward(a, b, c, ov, backend=backend, check_ids=False)  # noqa: E731,B023
                    torch.testing.assert_close(graphs.run(fwd, x, ids, w), expected, atol=2e-3, rtol=2e-3)
                    t = median_seconds(lambda: graphs.run(fwd, x, ids, w), repeats=reps, warmup=1, cuda_events=True)
                    ref_t, ref_name = (graphed_ref, f"transformers {fastest} + CUDA graph") if graphed_ref else \
                        (ref_times[fastest], f"transformers {fastest}")
                    rows.append(BenchRow("overlay_moe_forward", f"{backend} + CUDA graph", label, "fp32", t * 1e3,
                                         moved / t / 1e9, 100 * floor / t, ref_t / t,
                                         {"tokens": tokens, "floor_ms": floor * 1e3, "gflop_per_s": flops / t / 1e9,
                                          "reference": ref_name}))
    return rows, {"device": device, "copy_bandwidth_gb_s": copy_bw / 1e9, "matmul_gflop_per_s": flop_rate / 1e9,
                  "overlay_bytes_fp32": ov.nbytes(), "full_expert_bytes_fp32": E * full_bytes_per_expert}


@pytest.mark.parametrize("tokens", [1])
def test_bench_overlay_moe(benchmark, tokens):
    ov, _ = make_layer()
    ids, w = _routing(tokens, 0)
    x = torch.randn(tokens, H)
    benchmark(overlay_moe_forward, x, ids, w, ov)
