"""The `lazarus capture` subcommand: record a model's routing over a corpus into a trace directory."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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
        return list(dict.fromkeys(int(v) for v in items))  # "1,1" is one layer
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
    src.add_argument("--dataset", metavar="PATH_OR_NAME",
                     help="a Hugging Face `datasets` dataset: local .parquet/.jsonl/.csv/.txt file(s) or a name "
                          "(hub cache; needs the `datasets` extra), one document per record (with --field)")
    p.add_argument("--split", default="train", help="--dataset split (default train)")
    p.add_argument("--field", default="text", help="JSONL / dataset field holding the text (default: text)")
    p.add_argument("--label-field", default=None,
                   help="JSONL / dataset field with a per-document domain label, saved beside the trace for "
                        "domain analyses (lazarus_labels.json)")
    p.add_argument("-o", "--output", required=True, metavar="TRACE_DIR", help="trace directory to write")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after N tokens")
    p.add_argument("--seq-len", type=int, default=512, help="window length the model sees (default 512)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--logits", action="store_true", help="also store raw router logits (float16 [t, E])")
    act = p.add_argument_group("activations (trace format version 2)")
    act.add_argument("--hidden-states", action="store_true", help="store each layer's router input [s, H]")
    act.add_argument("--expert-outputs", action="store_true",
                     help="store each selected expert's output before weighting [s, k, H] (k extra expert runs per token)")
    act.add_argument("--all-experts", action="store_true",
                     help="store every expert's output on the sampled tokens [s, E, H] (needs --sample-tokens)")
    act.add_argument("--sample-tokens", type=int, default=None, metavar="N",
                     help="keep activations at N tokens drawn uniformly (seeded); default every token")
    act.add_argument("--activation-dtype", default="fp16", choices=("fp16", "bf16", "fp32"),
                     help="storage dtype of activations (default fp16)")
    act.add_argument("--seed", type=int, default=0, help="seed of the token sample (default 0)")
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
    from lazarus_core.routing.corpus import corpus_from_dataset, corpus_from_jsonl, corpus_from_prompts, corpus_from_texts
    from lazarus_core.routing.loading import load_model
    from lazarus_core.routing.trace_format import TraceError

    try:
        layers = parse_layers(args.layers)
        labels = None
        if args.text:
            corpus = corpus_from_texts(args.text)
        elif args.jsonl:
            corpus = corpus_from_jsonl(args.jsonl, args.field)
            if args.label_field:
                from lazarus_core.cli.analysis_common import jsonl_labels

                labels = jsonl_labels(args.jsonl, args.field, args.label_field)
        elif args.dataset:
            corpus, labels = corpus_from_dataset(args.dataset, args.field, split=args.split,
                                                 label_field=args.label_field)
        else:
            corpus = corpus_from_prompts(args.prompt)
        model, tokenizer, source = load_model(args.model, revision=args.revision, dtype=getattr(torch, args.dtype),
                                              device=args.device, trust_remote_code=args.trust_remote_code)
        if tokenizer is None:
            raise ValueError(f"-m {args.model}: the model has no tokenizer files; capture needs one")
        result = capture_routing(
            model, tokenizer, corpus, args.output, layers=layers, seq_len=args.seq_len, batch_size=args.batch_size,
            max_tokens=args.max_tokens, logits=args.logits, hidden_states=args.hidden_states,
            expert_outputs=args.expert_outputs, all_experts=args.all_experts, sample_tokens=args.sample_tokens,
            activation_dtype=args.activation_dtype, seed=args.seed, shard_tokens=args.shard_tokens, resume=args.resume,
            progress=not args.no_progress and not args.json,
            model_meta={"model": source.name, "revision": args.revision,
                        "tokenizer": str(source.root) if source.root is not None else source.name},
        )
        if labels:
            from lazarus_core.cli.routing_common import LABELS_FILE
            from lazarus_core.routing.trace_format import atomic_write_json

            atomic_write_json(Path(args.output) / LABELS_FILE, {str(i): label for i, label in enumerate(labels)})
    except (ValueError, OSError, TraceError, UnsupportedModelError, CheckpointError, ImportError, TypeError) as exc:
        print(f"lazarus capture: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lazarus capture: interrupted; completed shards are kept in {args.output}: "
              "run the same command with --resume to continue", file=sys.stderr)
        return 130
    from lazarus_core.distributed import current_world

    if not current_world().is_root:  # under torchrun rank 0 reports the merged trace
        return 0
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"Routing trace {escape(str(result.trace_dir))}")
    table.add_column("field")
    table.add_column("value")
    for key, value in result.to_dict().items():
        table.add_row(escape(str(key)), escape(str(value)))
    Console(emoji=False).print(table)
    return 0
