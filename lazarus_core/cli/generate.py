"""`lazarus generate -m MODEL [--overlay DIR] -p PROMPT`: greedy generation, optionally on an overlay, with tokens/s."""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass


@dataclass
class GenerationResult:
    model: str
    overlay: str | None
    backend: str
    prompt: str
    completion: str
    new_tokens: int
    seconds: float
    tokens_per_second: float
    model_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


def _model_bytes(model) -> int:
    """Bytes of parameters and buffers, plus the overlay tensors attached to experts modules."""
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    for m in model.modules():
        ov = getattr(m, "_lazarus_overlay", None)
        if ov is not None:
            total += ov.nbytes()
    return total


def generate(model: str, prompt: str, *, overlay: str | None = None, max_new_tokens: int = 32, backend: str = "auto",
             revision: str | None = None, device: str = "cpu") -> GenerationResult:
    """Greedy-decode ``max_new_tokens`` after ``prompt`` with the model (or its overlay) on ``device`` and time it."""
    import torch
    from transformers import AutoTokenizer

    from lazarus_core.models.resolve import resolve_model

    source = resolve_model(model, revision=revision)
    location = str(source.root) if source.root is not None else source.name
    if overlay is not None:
        from lazarus_core.overlay import load_model

        lm = load_model(model, overlay=overlay, backend=backend, device=device)
    else:
        from lazarus_core.routing.loading import load_model as load_original

        lm, _, _ = load_original(model, revision=revision, device=device)
    tokenizer = AutoTokenizer.from_pretrained(location, revision=revision)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    if ids.numel() == 0:
        raise ValueError("-p/--prompt encodes to no tokens")
    with torch.no_grad():
        t0 = time.perf_counter()
        out = lm.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                          pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    return GenerationResult(model, overlay, backend, prompt, tokenizer.decode(new, skip_special_tokens=True),
                            int(new.numel()), seconds, new.numel() / seconds if seconds > 0 else 0.0, _model_bytes(lm))


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lazarus_core.cli.io import write_json

    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be >= 1")
    result = generate(args.model, args.prompt, overlay=args.overlay, max_new_tokens=args.max_new_tokens,
                      backend=args.backend, revision=args.revision, device=args.device)
    console = Console()
    console.print(f"[bold]{result.prompt}[/bold]{result.completion}", highlight=False)
    what = f"overlay {result.overlay} ({result.backend})" if result.overlay else "original experts"
    console.print(f"[dim]{result.new_tokens} tokens in {result.seconds:.2f} s = {result.tokens_per_second:.1f} tokens/s; "
                  f"{what}; weights in memory {result.model_bytes / 1e6:.2f} MB[/dim]")
    if args.output:
        write_json(args.output, result.to_dict())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``lazarus generate``."""
    p = sub.add_parser("generate", help="generate text (optionally on an overlay) and report tokens/s")
    p.add_argument("-m", "--model", required=True, help="local directory, Hugging Face id or built-in alias")
    p.add_argument("--revision", default=None)
    p.add_argument("--overlay", default=None, metavar="DIR", help="run the experts from this overlay checkpoint")
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--backend", default="auto", choices=("auto", "cpu", "cuda", "triton", "torch"),
                   help="kernel backend of the overlay forward")
    p.add_argument("--device", default="cpu", help="torch device to run on (cpu, cuda, cuda:1, ...)")
    p.add_argument("-o", "--output", default=None, metavar="FILE.json")
    p.set_defaults(func=_run)
