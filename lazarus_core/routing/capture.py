"""Run a model over a corpus in padded batches and stream its routing, token by token, into a trace directory."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from lazarus_core.routing.corpus import Corpus, Window, iter_windows
from lazarus_core.routing.locate import find_moe_layers
from lazarus_core.routing.recorder import RoutingRecorder
from lazarus_core.routing.trace_writer import LayerBatch, TraceWriter


@dataclass
class CaptureResult:
    """Summary of one capture run (also what ``lazarus capture`` prints as JSON)."""

    trace_dir: str
    family: str
    layers: list[int]
    num_tokens: int
    num_documents: int
    num_shards: int
    tokens_this_run: int
    seconds: float
    tokens_per_second: float
    resumed: bool

    def to_dict(self) -> dict:
        return asdict(self)


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM (skips the LM head, which routing capture does not need)."""
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, nn.Module) else model


def tokenize_fn(tokenizer) -> Callable[[str], list[int]]:
    """``str -> list[int]`` with the tokenizer's own special tokens (BOS where it adds one)."""
    if tokenizer is None:
        raise ValueError("the model has no tokenizer: give token ids, or a model directory with tokenizer files")
    return lambda text: tokenizer(text, add_special_tokens=True)["input_ids"]


def _batches(windows: Iterable[Window], batch_size: int) -> Iterable[list[Window]]:
    batch: list[Window] = []
    for window in windows:
        if window.token_ids:
            batch.append(window)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _pad(batch: list[Window], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a batch: input_ids int64 [B, S], attention_mask int64 [B, S] (1 = real token)."""
    longest = max(len(w.token_ids) for w in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, window in enumerate(batch):
        ids[row, : len(window.token_ids)] = torch.tensor(window.token_ids, dtype=torch.long)
        mask[row, : len(window.token_ids)] = 1
    return ids.to(device), mask.to(device)


def capture_routing(
    model: nn.Module,
    tokenizer,
    corpus: Corpus,
    out_dir: str | Path,
    *,
    layers: Sequence[int] | None = None,
    seq_len: int = 512,
    batch_size: int = 8,
    max_tokens: int | None = None,
    logits: bool = False,
    shard_tokens: int | None = None,
    resume: bool = False,
    progress: bool = True,
    model_meta: dict | None = None,
) -> CaptureResult:
    """Capture the routing of every real token of a corpus into a trace directory (DESIGN.md section 6).

    Documents are tokenised, cut into windows of ``seq_len`` tokens (positions restart at 0 in each
    window, as the model saw them), right-padded into batches and run through the decoder with an
    attention mask. Hooks record, per MoE layer, the experts and weights the experts module received
    (sorted by weight, descending) and optionally the raw router logits; padding rows are dropped.
    Shards are written atomically as they fill, so memory stays bounded and an interrupted capture can
    continue with ``resume=True``.

    Parameters
    ----------
    model : nn.Module
        A transformers MoE causal LM, in eval mode.
    tokenizer : transformers tokenizer
        Tokenises the documents (special tokens added as the tokenizer does).
    corpus : Corpus
        Documents; ``doc_id`` is the index in ``corpus.texts``.
    out_dir : str or Path
        Trace directory; must not hold a trace unless ``resume``.
    layers : sequence of int, optional
        Model layer indices to record (default every MoE layer).
    seq_len, batch_size : int
        Window length and windows per forward pass.
    max_tokens : int, optional
        Stop after this many tokens.
    logits : bool
        Store ``layers.L.logits float16 [t, E]``.
    shard_tokens : int, optional
        Tokens per shard (default: about 128 MiB per shard).
    resume : bool
        Continue an interrupted capture in ``out_dir`` (same model, corpus, seq_len, layers).
    progress : bool
        Show a rich progress bar with tokens/s.
    model_meta : dict, optional
        ``model`` / ``revision`` / ``tokenizer`` entries for ``trace.json`` (defaults from the config).

    Returns
    -------
    CaptureResult

    Raises
    ------
    ValueError
        Unknown layer, bad sizes, no MoE layers, or an empty corpus (EmptyInputError).
    TraceError
        ``out_dir`` holds another trace, or the trace to resume does not match this capture.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    info = find_moe_layers(model)
    selected = sorted(info.select(list(layers) if layers is not None else None))
    tokenize = tokenize_fn(tokenizer)
    total = sum(len(w.token_ids) for w in iter_windows(tokenize, corpus.texts, seq_len, max_tokens))
    config = model.config
    meta = {
        "model": (model_meta or {}).get("model", getattr(config, "_name_or_path", "") or config.model_type),
        "revision": (model_meta or {}).get("revision"),
        "family": info.family,
        "num_experts": info.num_experts,
        "top_k": info.top_k,
        "all_moe_layers": sorted(info.layers),
        "weight_convention": dict(info.rule.to_dict(),
                                  topk_weights="weights the experts module mixed with, sorted descending",
                                  logits="raw router output before softmax/sigmoid (GPT-OSS: includes router bias)"),
        "tokenizer": (model_meta or {}).get("tokenizer", getattr(tokenizer, "name_or_path", None)),
        "corpus": corpus.to_dict(),
        "seq_len": seq_len,
        "batch_size": batch_size,
        "max_tokens": max_tokens,
    }
    writer = TraceWriter(Path(out_dir), meta, selected, logits, shard_tokens=shard_tokens, resume=resume)
    skip = writer.sequences_done
    resumed = skip > 0
    device = next(model.parameters()).device
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = pad_id if pad_id is not None else (getattr(tokenizer, "eos_token_id", None) or 0)
    decoder = decoder_of(model)

    windows = iter_windows(tokenize, corpus.texts, seq_len, max_tokens)
    done_tokens = 0
    for _ in range(skip):
        done_tokens += len(next(windows).token_ids)

    bar = _progress_bar(progress)
    task = bar.add_task("capture", total=total, completed=done_tokens) if bar else None
    start, run_tokens = time.perf_counter(), 0
    try:
        if bar:
            bar.start()
        with RoutingRecorder(model, selected, logits=logits, info=info) as recorder, torch.inference_mode():
            for batch in _batches(windows, batch_size):
                input_ids, mask = _pad(batch, pad_id, device)
                decoder(input_ids=input_ids, attention_mask=mask, use_cache=False)
                routed = recorder.pop()
                keep = mask.reshape(-1).bool()
                per_layer = {
                    layer: LayerBatch(
                        topk_ids=r.topk_ids[keep].to(torch.int32).cpu().numpy(),
                        topk_weights=r.topk_weights[keep].cpu().numpy(),
                        logits=r.logits[keep].to(torch.float16).cpu().numpy() if logits else None,
                    )
                    for layer, r in routed.items()
                }
                n = int(keep.sum())
                writer.add(
                    token_ids=np.concatenate([w.token_ids for w in batch]).astype(np.int32),
                    doc_ids=np.concatenate([np.full(len(w.token_ids), w.doc_id, np.int32) for w in batch]),
                    positions=np.concatenate([np.arange(len(w.token_ids), dtype=np.int32) for w in batch]),
                    layers=per_layer,
                    num_sequences=len(batch),
                )
                run_tokens += n
                if bar:
                    bar.advance(task, n)
        final = writer.close()
    finally:
        if bar:
            bar.stop()
    seconds = time.perf_counter() - start
    return CaptureResult(
        trace_dir=str(out_dir), family=info.family, layers=selected, num_tokens=final["num_tokens"],
        num_documents=final["num_documents"], num_shards=len(final["shards"]), tokens_this_run=run_tokens,
        seconds=round(seconds, 3), tokens_per_second=round(run_tokens / seconds, 1) if seconds > 0 else 0.0,
        resumed=resumed,
    )


def _progress_bar(enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class _TokensPerSecond(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed or 0:,.0f} tok/s")

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                    _TokensPerSecond(), TimeRemainingColumn())
