"""`lazarus generate -m MODEL [--overlay DIR] -p PROMPT`: greedy generation, optionally on an overlay, with tokens/s
measured as the median of several timed runs after an untimed warm-up run (first-call costs excluded)."""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass, field


@dataclass
class GenerationResult:
    model: str
    overlay: str | None
    backend: str
    prompt: str
    completion: str
    new_tokens: int
    seconds: float  # median over the timed runs
    tokens_per_second: float  # new_tokens / seconds
    model_bytes: int
    runs: int = 1
    run_seconds: list[float] = field(default_factory=list)  # every timed run, in order (warm-up excluded)
    mxfp4_tokens: str | None = None  # the CPU MXFP4 GEMV's token mode (None: the library default)

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
             revision: str | None = None, device: str = "cpu", runs: int = 3, force: bool = False,
             mxfp4_tokens: str | None = None) -> GenerationResult:
    """Greedy-decode ``max_new_tokens`` after ``prompt`` with the model (or its overlay) on ``device`` and time it.

    Parameters
    ----------
    model, prompt : str
    overlay : str, optional
        Run the experts from this overlay checkpoint.
    max_new_tokens : int
    backend, revision, device : str
    runs : int
        Timed runs after one untimed warm-up run; the reported time is their median (greedy decoding gives the
        same tokens every run).
    force : bool
        Load an overlay whose source fingerprint does not match ``model`` (loud warning).
    mxfp4_tokens : {"int16", "int8", "fp32"}, optional
        How the CPU kernels meet an MXFP4 base at decode (see ``lazarus_core.ops.overlay_moe.MXFP4_TOKENS``);
        None keeps the library default.

    Returns
    -------
    GenerationResult

    Raises
    ------
    ValueError
        ``runs < 1``, an unknown ``mxfp4_tokens`` or an empty prompt.
    """
    if runs < 1:
        raise ValueError(f"--runs must be >= 1, got {runs}")
    from lazarus_core.ops.overlay_moe import mxfp4_token_mode

    with mxfp4_token_mode(mxfp4_tokens):
        result = _generate(model, prompt, overlay, max_new_tokens, backend, revision, device, runs, force)
    result.mxfp4_tokens = mxfp4_tokens
    return result


def _generate(model: str, prompt: str, overlay: str | None, max_new_tokens: int, backend: str, revision: str | None,
              device: str, runs: int, force: bool) -> GenerationResult:
    import torch
    from transformers import AutoTokenizer

    from lazarus_core.models.resolve import resolve_model

    source = resolve_model(model, revision=revision)
    location = str(source.root) if source.root is not None else source.name
    if overlay is not None:
        from lazarus_core.overlay import load_model

        lm = load_model(model, overlay=overlay, backend=backend, device=device, force=force)
    else:
        from lazarus_core.routing.loading import load_model as load_original

        lm, _, _ = load_original(model, revision=revision, device=device)
    tokenizer = AutoTokenizer.from_pretrained(location, revision=revision)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    if ids.numel() == 0:
        raise ValueError("-p/--prompt encodes to no tokens")
    cuda = torch.device(device).type == "cuda"
    times = []
    with torch.no_grad():
        for run in range(runs + 1):  # run 0 is the warm-up
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = lm.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            if cuda:
                torch.cuda.synchronize()
            if run:
                times.append(time.perf_counter() - t0)
    new = out[0, ids.shape[1]:]
    seconds = statistics.median(times)
    return GenerationResult(model, overlay, backend, prompt, tokenizer.decode(new, skip_special_tokens=True),
                            int(new.numel()), seconds, new.numel() / seconds if seconds > 0 else 0.0, _model_bytes(lm),
                            runs, times)


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lazarus_core.cli.io import write_json

    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be >= 1")
    result = generate(args.model, args.prompt, overlay=args.overlay, max_new_tokens=args.max_new_tokens,
                      backend=args.backend, revision=args.revision, device=args.device, runs=args.runs,
                      force=args.force, mxfp4_tokens=args.mxfp4_tokens)
    console = Console()
    console.print(f"[bold]{result.prompt}[/bold]{result.completion}", highlight=False)
    what = f"overlay {result.overlay} ({result.backend})" if result.overlay else "original experts"
    console.print(f"[dim]{result.new_tokens} tokens in {result.seconds:.2f} s = {result.tokens_per_second:.1f} tokens/s "
                  f"(median of {result.runs} run(s) after a warm-up); "
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
    p.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up run; tokens/s is their median")
    p.add_argument("--force", action="store_true",
                   help="run an overlay whose source fingerprint does not match -m (loud warning)")
    p.add_argument("--mxfp4-tokens", default=None, choices=("int16", "int8", "fp32"),
                   help="how the CPU kernels meet an MXFP4 base: int16 (default; 16-bit fixed point per 32-block), "
                        "int8 (faster, coarser: max|x|/254 per element) or fp32 (exact products, slowest)")
    p.add_argument("-o", "--output", default=None, metavar="FILE.json")
    p.set_defaults(func=_run)
