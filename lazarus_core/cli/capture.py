"""The `lazarus capture` subcommand: record a model's routing over a corpus into a trace directory."""

from __future__ import annotations

import argparse
import json
import sys


def parse_layers(values: list[str] | None) -> list[int] | None:
    """``--layers 0,12,23`` / ``--layers 0 12`` / ``--layers all`` -> list of ints (None = all).

    Raises
    ------
    ValueError
        A value is neither ``all`` nor an integer.
    """
    if not values:
        return None
    items = [v.strip() for value in values for v in value.split(",") if v.strip()]
    if any(v.lower() == "all" for v in items):
        return None
    try:
        return [int(v) for v in items]
    except ValueError:
        raise ValueError(f"--layers expects integers or 'all', got {' '.join(values)!r}") from None


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``capture`` subcommand to the top-level parser's subparsers."""
    p = subparsers.add_parser(
        "capture", help="record router decisions over a corpus into a routing trace",
        description="Run MODEL over documents and write, per token and MoE layer, the top-k experts and the "
                    "weights the model mixed with (and optionally raw router logits) to TRACE_DIR "
                    "(format: docs/trace_format.md).")
    p.add_argument("-m", "--model", required=True, help="local directory, built-in alias or Hugging Face id")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", nargs="+", metavar="FILE", help="text files, one document each")
    src.add_argument("--jsonl", metavar="FILE", help="JSON-lines file, one document per record (with --field)")
    src.add_argument("-p", "--prompt", nargs="+", metavar="PROMPT", help="prompts, one document each")
    p.add_argument("--field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("-o", "--output", required=True, metavar="TRACE_DIR", help="trace directory to write")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after N tokens")
    p.add_argument("--seq-len", type=int, default=512, help="window length the model sees (default 512)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--logits", action="store_true", help="also store raw router logits (float16 [t, E])")
    p.add_argument("--layers", nargs="+", metavar="L", help="MoE layers to record: 0,12,23 or all (default all)")
    p.add_argument("--shard-tokens", type=int, default=None, help="tokens per shard (default: about 128 MiB)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted capture in TRACE_DIR")
    p.add_argument("--revision", default=None, help="Hugging Face revision")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="parameter dtype (default float32; bf16 is very slow on CPU)")
    p.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run_capture)
    return p


def run_capture(args: argparse.Namespace) -> int:
    """Execute ``lazarus capture``; returns the exit code (2 on bad input)."""
    import torch

    from lazarus_core.models.errors import CheckpointError
    from lazarus_core.models.families import UnsupportedModelError
    from lazarus_core.routing.capture import capture_routing
    from lazarus_core.routing.corpus import corpus_from_jsonl, corpus_from_prompts, corpus_from_texts
    from lazarus_core.routing.loading import load_model
    from lazarus_core.routing.trace_format import TraceError

    try:
        layers = parse_layers(args.layers)
        if args.text:
            corpus = corpus_from_texts(args.text)
        elif args.jsonl:
            corpus = corpus_from_jsonl(args.jsonl, args.field)
        else:
            corpus = corpus_from_prompts(args.prompt)
        model, tokenizer, source = load_model(args.model, revision=args.revision, dtype=getattr(torch, args.dtype),
                                              device=args.device, trust_remote_code=args.trust_remote_code)
        if tokenizer is None:
            raise ValueError(f"-m {args.model}: the model has no tokenizer files; capture needs one")
        result = capture_routing(
            model, tokenizer, corpus, args.output, layers=layers, seq_len=args.seq_len, batch_size=args.batch_size,
            max_tokens=args.max_tokens, logits=args.logits, shard_tokens=args.shard_tokens, resume=args.resume,
            progress=not args.no_progress and not args.json,
            model_meta={"model": source.name, "revision": args.revision,
                        "tokenizer": str(source.root) if source.root is not None else source.name},
        )
    except (ValueError, OSError, TraceError, UnsupportedModelError, CheckpointError) as exc:
        print(f"lazarus capture: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lazarus capture: interrupted; completed shards are kept in {args.output}: "
              "run the same command with --resume to continue", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Routing trace {result.trace_dir}")
    table.add_column("field")
    table.add_column("value")
    for key, value in result.to_dict().items():
        table.add_row(key, str(value))
    Console().print(table)
    return 0
