"""Routing-capture throughput (tokens/s) against a plain forward of the same model in the same run: hook overhead.

Run: ``python -m benchmarks.bench_capture [--model demo:native] [--tokens 4096] [--repeats 7] [--threads 1]``
prints a table and writes ``benchmarks/results/bench_capture.json``. Without ``--model`` it uses the built-in ``demo:native`` when
installed, else a generated OLMoE model (random weights) and says so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import BenchRow, machine_header, write_json
from lazarus_core.routing.capture import _pad, capture_routing, decoder_of
from lazarus_core.routing.corpus import Corpus, Window
from lazarus_core.routing.locate import find_moe_layers
from lazarus_core.routing.recorder import RoutingRecorder


class _IdsTokenizer:
    """Texts of space-separated integers are their own token ids (keeps tokenising out of the measurement)."""

    pad_token_id = 0
    name_or_path = "ids"

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(t) for t in text.split()]}


def _generated_olmoe():
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    cfg = OlmoeConfig(hidden_size=256, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=2048, num_experts=16, num_experts_per_tok=4)
    return OlmoeForCausalLM(cfg).float().eval(), "generated OLMoE H=256 I=256 E=16 k=4 L=4 (random weights)"


def load_bench_model(spec: str | None):
    """(model, description): ``spec``, else demo:native when installed, else a generated OLMoE."""
    from lazarus_core.routing.loading import load_model

    if spec is None:
        try:
            from lazarus_core.models.builtin import resolve_builtin

            spec = "demo:native" if resolve_builtin("demo:native") is not None else None
        except (ImportError, OSError, ValueError, KeyError):
            spec = None
    if spec is None:
        return _generated_olmoe()
    model, _, source = load_model(spec)
    return model, f"{spec} ({source.kind})"


def run(repeats: int = 7, model_spec: str | None = None, tokens: int = 4096, seq_len: int = 256,
        batch_size: int = 8) -> tuple[list[BenchRow], dict]:
    """Measure plain forward, forward + capture hooks (without/with logits), and the full capture to disk."""
    model, description = load_bench_model(model_spec)
    info = find_moe_layers(model)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    windows = [Window(i, torch.randint(3, vocab, (seq_len,), generator=gen).tolist()) for i in range(tokens // seq_len)]
    batches = [_pad(windows[i:i + batch_size], 0, "cpu") for i in range(0, len(windows), batch_size)]
    n_tokens = sum(len(w.token_ids) for w in windows)
    decoder = decoder_of(model)

    def plain():
        with torch.inference_mode():
            for ids, mask in batches:
                decoder(input_ids=ids, attention_mask=mask, use_cache=False)

    def hooked(logits: bool):
        def go():
            with RoutingRecorder(model, logits=logits, info=info) as rec, torch.inference_mode():
                for ids, mask in batches:
                    decoder(input_ids=ids, attention_mask=mask, use_cache=False)
                    keep = mask.reshape(-1).bool()
                    for r in rec.pop().values():
                        r.topk_ids[keep].to(torch.int32).numpy(), r.topk_weights[keep].numpy()
                        if logits:
                            r.logits[keep].to(torch.float16).numpy()
        return go

    corpus = Corpus([" ".join(map(str, w.token_ids)) for w in windows], [f"w{i}" for i in range(len(windows))])

    def full_capture(**flags):
        def go():
            with tempfile.TemporaryDirectory() as tmp:
                capture_routing(model, _IdsTokenizer(), corpus, Path(tmp) / "t", seq_len=seq_len,
                                batch_size=batch_size, progress=False, **flags)
        return go

    # Activation flags (trace format v2): every token for hidden states and selected expert outputs,
    # a 512-token sample for all experts (E expert runs per sampled token).
    modes = {"plain forward": plain, "forward + hooks": hooked(False), "forward + hooks + logits": hooked(True),
             "capture_routing to disk": full_capture(),
             "capture --hidden-states": full_capture(hidden_states=True),
             "capture --expert-outputs": full_capture(expert_outputs=True),
             "capture --all-experts --sample-tokens 512": full_capture(all_experts=True, sample_tokens=512),
             "capture --hidden-states --sample-tokens 512": full_capture(hidden_states=True, sample_tokens=512)}
    for fn in modes.values():  # warm-up
        fn()
    wall: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(repeats):  # interleaved, so load from other processes hits every mode alike
        for name, fn in modes.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    # Other processes share this machine's cores, which makes wall time noisy; the CPU time of this
    # process (all its threads) measures the work each mode does, so the overhead is stated on both.
    base_wall, base_cpu = statistics.median(wall["plain forward"]), statistics.median(cpu["plain forward"])
    rows = []
    for name in modes:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        rows.append(BenchRow(op=name, backend="torch" if name == "plain forward" else "hooks",
                             shape=f"{n_tokens} tok, B={batch_size} S={seq_len}", dtype="float32",
                             median_ms=round(w * 1e3, 2), ratio_to_reference=round(base_wall / w, 3),
                             extra={"cpu_ms": round(c * 1e3, 2),
                                    "tokens_per_s_wall": round(n_tokens / w, 1),
                                    "tokens_per_cpu_s": round(n_tokens / c, 1),
                                    "overhead_pct_wall": round(100 * (w / base_wall - 1), 1),
                                    "overhead_pct_cpu": round(100 * (c / base_cpu - 1), 1)}))
    floors = {"model": description, "family": info.family, "moe_layers": len(info.layers),
              "num_experts": info.num_experts, "top_k": info.top_k, "repeats": repeats}
    return rows, floors


def _print(rows: list[BenchRow], header: dict, floors: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    console.print("[bold]capture[/bold]  " + ", ".join(f"{k}={v}" for k, v in {**header, **floors}.items() if v is not None))
    table = Table()
    for col in ("mode", "shape", "wall ms", "CPU ms", "tok/s (wall)", "tok/CPU-s", "overhead (wall)", "overhead (CPU)"):
        table.add_column(col, justify="left" if col in ("mode", "shape") else "right")
    for r in rows:
        e = r.extra
        table.add_row(r.op, r.shape, f"{r.median_ms:.1f}", f"{e['cpu_ms']:.1f}", f"{e['tokens_per_s_wall']:,.0f}",
                      f"{e['tokens_per_cpu_s']:,.0f}", f"{e['overhead_pct_wall']:+.1f}%", f"{e['overhead_pct_cpu']:+.1f}%")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_capture", description=__doc__)
    parser.add_argument("--model", default=None, help="model to measure (default demo:native, else generated OLMoE)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_capture.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    header = machine_header()
    rows, floors = run(args.repeats, args.model, args.tokens, args.seq_len, args.batch_size)
    _print(rows, header, floors)
    write_json(args.out, "capture", header, rows, floors)
    print(json.dumps({"header": header, "floors": floors, "rows": [r.to_dict() for r in rows]}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
