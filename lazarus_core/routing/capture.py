"""Run a model over a corpus in padded batches and stream its routing, token by token, into a trace directory."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from lazarus_core.distributed import World, current_world, on_every_rank, split_contiguous
from lazarus_core.routing.corpus import Corpus, Window, corpus_from_iterable, iter_windows
from lazarus_core.routing.locate import find_moe_layers
from lazarus_core.routing.recorder import RoutingRecorder
from lazarus_core.routing.trace_format import ACTIVATION_DTYPES, META_FILE, TraceError
from lazarus_core.routing.trace_merge import merge_trace_parts
from lazarus_core.routing.trace_writer import LayerBatch, TraceWriter

PARTS_DIR = ".parts"  # a distributed capture's per-rank traces, inside the output directory until merged


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
    if not isinstance(inner, nn.Module):
        inner = getattr(model, "transformer", None)  # DBRX: DbrxForCausalLM.transformer
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
    corpus: Corpus | Iterable[str],
    out_dir: str | Path,
    *,
    layers: Sequence[int] | None = None,
    seq_len: int = 512,
    batch_size: int = 8,
    max_tokens: int | None = None,
    logits: bool = False,
    hidden_states: bool = False,
    expert_outputs: bool = False,
    all_experts: bool = False,
    sample_tokens: int | None = None,
    activation_dtype: str = "fp16",
    seed: int = 0,
    shard_tokens: int | None = None,
    resume: bool = False,
    progress: bool = True,
    model_meta: dict | None = None,
    world: World | None = None,
) -> CaptureResult:
    """Capture the routing of every real token of a corpus into a trace directory (DESIGN.md section 6).

    Documents are tokenised, cut into windows of ``seq_len`` tokens (positions restart at 0 in each
    window, as the model saw them), right-padded into batches and run through the decoder with an
    attention mask. Hooks record, per MoE layer, the experts and weights the experts module received
    (sorted by weight, descending) and optionally the raw router logits; padding rows are dropped.
    Shards are written atomically as they fill, so memory stays bounded and an interrupted capture can
    continue with ``resume=True``.

    On request it also stores activations (trace format version 2) at a seeded uniform sample of the
    tokens (all tokens without ``sample_tokens``): the router input, each selected expert's output
    before weighting, and every expert's output. Expert outputs cost extra expert evaluations
    (k per sampled token for ``expert_outputs``, E for ``all_experts``); the model's own forward is
    unchanged.

    Parameters
    ----------
    model : nn.Module
        A transformers MoE causal LM, in eval mode.
    tokenizer : transformers tokenizer
        Tokenises the documents (special tokens added as the tokenizer does).
    corpus : Corpus or iterable of str
        Documents; ``doc_id`` is the index in ``corpus.texts`` (an iterable of texts, e.g. a
        generator or a ``datasets`` column, is read once into a :class:`Corpus`; empty texts skipped).
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
    hidden_states : bool
        Store ``layers.L.hidden [s, H]``, the router input.
    expert_outputs : bool
        Store ``layers.L.expert_outputs [s, k, H]``, each selected expert's output before weighting
        (slots in ``topk_ids`` order).
    all_experts : bool
        Store ``layers.L.all_expert_outputs [s, E, H]`` (needs ``sample_tokens``).
    sample_tokens : int, optional
        Keep activations at this many tokens, drawn uniformly without replacement with ``seed``
        (``layers.L.sample_index`` holds their indices in the shard). None: every token.
    activation_dtype : {"fp16", "bf16", "fp32"}
        Storage dtype of the activations.
    seed : int
        Seed of the token sample.
    shard_tokens : int, optional
        Tokens per shard (default: about 128 MiB per shard).
    resume : bool
        Continue an interrupted capture in ``out_dir`` (same model, corpus, seq_len, layers).
    progress : bool
        Show a rich progress bar with tokens/s.
    model_meta : dict, optional
        ``model`` / ``revision`` / ``tokenizer`` entries for ``trace.json`` (defaults from the config).
    world : World, optional
        The torch.distributed job (default: :func:`lazarus_core.distributed.current_world`, which joins
        torchrun's process group). With several ranks the documents are cut into contiguous ranges of
        about equal tokens, one per rank; each rank captures its range into
        ``out_dir/.parts/rank-R-of-W`` (a resumable trace), and rank 0 merges the parts into one trace in
        document order, with ``"distributed": {"world_size", "assignment": {rank: [first_doc, last_doc]}}``
        in ``trace.json``. Token rows, sampled activations and ``doc_ids`` equal a single-process capture.
        A rank that dies leaves its part; rerunning with ``resume=True`` finishes it and merges.

    Returns
    -------
    CaptureResult

    Raises
    ------
    ValueError
        Unknown layer, bad sizes, no MoE layers, or an empty corpus (EmptyInputError).
    TraceError
        ``out_dir`` holds another trace, or the trace to resume does not match this capture.
    lazarus_core.distributed.RankFailed
        A rank of a distributed capture failed (raised on every rank, naming it; the parts are kept).
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if activation_dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"--activation-dtype must be one of {', '.join(ACTIVATION_DTYPES)}, got {activation_dtype!r}")
    if sample_tokens is not None and sample_tokens < 1:
        raise ValueError(f"--sample-tokens must be >= 1, got {sample_tokens}")
    if all_experts and sample_tokens is None:
        raise ValueError("--all-experts needs --sample-tokens N: it stores E x H values per sampled token")
    if not isinstance(corpus, Corpus):
        corpus = corpus_from_iterable(corpus)
    info = find_moe_layers(model)
    selected = sorted(info.select(list(layers) if layers is not None else None))
    tokenize = tokenize_fn(tokenizer)
    doc_tokens = np.zeros(len(corpus.texts), dtype=np.int64)
    for w in iter_windows(tokenize, corpus.texts, seq_len, max_tokens):
        doc_tokens[w.doc_id] += len(w.token_ids)
    total = int(doc_tokens.sum())
    world = world if world is not None else current_world(next(model.parameters()).device)
    docs = range(len(corpus.texts))
    token_offset, final_dir = 0, Path(out_dir)
    if world.distributed:
        ranges = split_contiguous(doc_tokens.tolist(), world.world_size)
        docs = ranges[world.rank]
        token_offset = int(doc_tokens[:docs.start].sum())
        merged_meta = final_dir / META_FILE
        if merged_meta.is_file():
            raise TraceError(f"{merged_meta} already exists; choose another output directory"
                             + ("" if not resume else " (that trace is complete: nothing to resume)"))
        out_dir = final_dir / PARTS_DIR / f"rank-{world.rank:05d}-of-{world.world_size:05d}"
        stale = [p for p in (final_dir / PARTS_DIR).glob("rank-*") if not p.name.endswith(f"-of-{world.world_size:05d}")]
        if stale:
            raise TraceError(f"{final_dir / PARTS_DIR} holds parts of a capture with another number of ranks "
                             f"({stale[0].name}); rerun with that many ranks, or delete {final_dir / PARTS_DIR}")
    config = model.config
    wants_activations = hidden_states or expert_outputs or all_experts
    sampled = _sample(total, sample_tokens, seed) if wants_activations else None
    activations = None
    if wants_activations:
        activations = {"hidden": hidden_states, "expert_outputs": expert_outputs, "all_expert_outputs": all_experts,
                       "dtype": activation_dtype, "sample_tokens": sample_tokens, "seed": seed,
                       "sample_fraction": round(len(sampled) / max(total, 1), 6),
                       "expert_outputs_meaning": "each selected expert's output before its routing weight"}
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
        "hidden_size": int(getattr(config, "hidden_size", 0) or 0) or None,
    }
    def capture_mine() -> CaptureResult | None:
        if world.distributed and resume and (Path(out_dir) / META_FILE).is_file() and \
                json.loads((Path(out_dir) / META_FILE).read_text()).get("complete"):
            return None  # this rank's part finished in an earlier run: only the merge is left
        return _capture_part(model, tokenizer, corpus, Path(out_dir), meta, selected, info, docs=docs,
                             token_offset=token_offset, total=int(doc_tokens[docs.start:docs.stop].sum()),
                             sampled=sampled, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens,
                             logits=logits, hidden_states=hidden_states, expert_outputs=expert_outputs,
                             all_experts=all_experts, activation_dtype=activation_dtype, shard_tokens=shard_tokens,
                             resume=resume, progress=progress and world.is_root, activations=activations)

    part = on_every_rank(world, "distributed capture (the ranks' parts are kept; rerun with --resume)", capture_mine)
    if not world.distributed:
        return part
    merged = None
    if world.is_root:
        parts = [final_dir / PARTS_DIR / f"rank-{r:05d}-of-{world.world_size:05d}" for r in range(world.world_size)]
        assignment = {str(r): [rng.start, rng.stop - 1] for r, rng in enumerate(ranges)}
        merged = merge_trace_parts(parts, final_dir, extra_meta={"distributed": {
            "world_size": world.world_size, "assignment": assignment,
            "assignment_meaning": "rank -> [first_doc, last_doc] of its contiguous document range"}})
        if not any((final_dir / PARTS_DIR).iterdir()):
            (final_dir / PARTS_DIR).rmdir()
    merged = world.broadcast(merged)
    runs = world.gather((part.tokens_this_run, part.seconds) if part else (0, 0.0))
    runs = world.broadcast(runs)
    run_tokens, seconds = sum(r[0] for r in runs), max(r[1] for r in runs)
    return CaptureResult(
        trace_dir=str(final_dir), family=info.family, layers=selected, num_tokens=merged["num_tokens"],
        num_documents=merged["num_documents"], num_shards=len(merged["shards"]), tokens_this_run=run_tokens,
        seconds=seconds,
        tokens_per_second=round(run_tokens / seconds, 1) if seconds > 0 else 0.0, resumed=bool(resume))


def _capture_part(model, tokenizer, corpus: Corpus, out_dir: Path, meta: dict, selected: list[int], info, *,
                  docs: range, token_offset: int, total: int, sampled, seq_len: int, batch_size: int,
                  max_tokens: int | None, logits: bool, hidden_states: bool, expert_outputs: bool, all_experts: bool,
                  activation_dtype: str, shard_tokens: int | None, resume: bool, progress: bool,
                  activations: dict | None) -> CaptureResult:
    """Capture the documents ``docs`` (whose first token is token ``token_offset`` of the whole capture)
    into the trace directory ``out_dir``."""
    writer = TraceWriter(Path(out_dir), meta, selected, logits, shard_tokens=shard_tokens, resume=resume,
                         activations=activations)
    skip = writer.sequences_done
    resumed = skip > 0
    device = next(model.parameters()).device
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = pad_id if pad_id is not None else (getattr(tokenizer, "eos_token_id", None) or 0)
    decoder = decoder_of(model)

    tokenize = tokenize_fn(tokenizer)
    windows = (w for w in iter_windows(tokenize, corpus.texts, seq_len, max_tokens) if w.doc_id in docs)
    done_tokens = token_offset  # global token index of the next token (the activation sample is global)
    for _ in range(skip):
        done_tokens += len(next(windows).token_ids)

    bar = _progress_bar(progress)
    task = bar.add_task("capture", total=total, completed=done_tokens - token_offset) if bar else None
    start, run_tokens = time.perf_counter(), 0
    try:
        if bar:
            bar.start()
        with RoutingRecorder(model, selected, logits=logits, info=info, hidden_states=hidden_states,
                             expert_outputs=expert_outputs, all_experts=all_experts) as recorder, torch.inference_mode():
            for batch in _batches(windows, batch_size):
                input_ids, mask = _pad(batch, pad_id, device)
                keep = mask.reshape(-1).bool()
                n = int(keep.sum())
                local = None
                if sampled is not None:  # sampled tokens of this batch, as indices among its n real tokens
                    lo, hi = np.searchsorted(sampled, [done_tokens, done_tokens + n])
                    local = sampled[lo:hi] - done_tokens
                    recorder.activation_rows = torch.nonzero(keep).reshape(-1)[torch.from_numpy(local)]
                decoder(input_ids=input_ids, attention_mask=mask, use_cache=False)
                routed = recorder.pop()
                act_dtype = getattr(torch, ACTIVATION_DTYPES[activation_dtype])
                per_layer = {
                    layer: LayerBatch(
                        topk_ids=r.topk_ids[keep].to(torch.int32).cpu().numpy(),
                        topk_weights=r.topk_weights[keep].cpu().numpy(),
                        logits=r.logits[keep].to(torch.float16).cpu().numpy() if logits else None,
                        sample_index=local,
                        hidden=None if r.hidden is None else r.hidden.to(act_dtype).cpu(),
                        expert_outputs=None if r.expert_outputs is None else r.expert_outputs.to(act_dtype).cpu(),
                        all_expert_outputs=None if r.all_expert_outputs is None else r.all_expert_outputs.to(act_dtype).cpu(),
                    )
                    for layer, r in routed.items()
                }
                writer.add(
                    token_ids=np.concatenate([w.token_ids for w in batch]).astype(np.int32),
                    doc_ids=np.concatenate([np.full(len(w.token_ids), w.doc_id, np.int32) for w in batch]),
                    positions=np.concatenate([np.arange(len(w.token_ids), dtype=np.int32) for w in batch]),
                    layers=per_layer,
                    num_sequences=len(batch),
                )
                run_tokens += n
                done_tokens += n
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


def _sample(total: int, sample_tokens: int | None, seed: int) -> np.ndarray:
    """Ascending global token indices of the activation sample (every token when ``sample_tokens`` is None)."""
    if sample_tokens is None or sample_tokens >= total:
        return np.arange(total, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(total, size=sample_tokens, replace=False)).astype(np.int64)


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
