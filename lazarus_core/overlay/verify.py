"""Does an overlay hold up? Reconstruction error of every expert, then, on real text, each MoE block's output
on the hidden states the original model really produces, the final logits' KL divergence, perplexity of
original vs overlay, and top-1 next-token agreement, with PASS/FAIL against documented thresholds; an overlay
larger than the experts it replaces FAILS whatever its accuracy, and one made from another model is refused."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lazarus_core.models.checkpoint import PROJECTIONS, MoeCheckpoint
from lazarus_core.ops.overlay_moe import overlay_moe_forward
from lazarus_core.overlay.fingerprint import check_source
from lazarus_core.overlay.format import read_config, read_layer
from lazarus_core.overlay.sizes import expert_bytes_as_stored

# PASS needs both (docs/overlay_format.md): the acceptance bar of issue 9.
MAX_PERPLEXITY_INCREASE = 0.01   # overlay perplexity / original perplexity - 1
MIN_TOP1_AGREEMENT = 0.99        # share of positions whose argmax next token agrees


def thresholds() -> dict[str, float]:
    return {"max_perplexity_increase": MAX_PERPLEXITY_INCREASE, "min_top1_agreement": MIN_TOP1_AGREEMENT}


def verdict(report: "VerifyReport") -> bool:
    """PASS (True) needs all three: perplexity increase <= ``MAX_PERPLEXITY_INCREASE``, top-1 agreement >=
    ``MIN_TOP1_AGREEMENT``, and an overlay no larger than the source experts it replaces (``size_ratio >= 1``)."""
    return report.perplexity_increase <= MAX_PERPLEXITY_INCREASE and report.top1_agreement >= MIN_TOP1_AGREEMENT \
        and report.size_ratio >= 1


def agreement_interval(agree: int, count: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a share ``agree / count`` (95 % for the default ``z``).

    Parameters
    ----------
    agree, count : int
        Positions that agree, positions scored (``0 <= agree <= count``, ``count > 0``).
    z : float
        Normal quantile of the interval.

    Returns
    -------
    (float, float)
        Lower and upper bound, within [0, 1]. The positions of one text are not independent draws (neighbouring
        tokens share context), so the interval understates the uncertainty of a short sample, never overstates it.
    """
    if count <= 0 or not 0 <= agree <= count:
        raise ValueError(f"agreement_interval needs 0 <= agree <= count and count > 0, got {agree} of {count}")
    p = agree / count
    centre = (p + z * z / (2 * count)) / (1 + z * z / count)
    half = z * math.sqrt(p * (1 - p) / count + z * z / (4 * count * count)) / (1 + z * z / count)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class ReconstructionError:
    layer: int
    projection: str
    rank: int
    mean: float
    max: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class VerifyReport:
    """Result of :func:`verify_overlay`; ``to_dict()`` is the JSON of moe-overlay-verify."""

    model: str
    overlay: str
    reconstruction: list[ReconstructionError]
    tokens: int = 0
    text_source: str = ""
    block_output_error: dict[str, float] = field(default_factory=dict)
    logit_kl: float | None = None
    perplexity_original: float | None = None
    perplexity_overlay: float | None = None
    top1_agreement: float | None = None
    top1_agreement_ci95: tuple[float, float] | None = None  # Wilson interval (agreement_interval)
    source_expert_bytes: int = 0  # the overlay's layers' routed experts as stored in the source
    overlay_bytes: int = 0        # the overlay's tensors as stored in its shards
    thresholds: dict = field(default_factory=thresholds)
    passed: bool | None = None
    seconds: float = 0.0

    @property
    def perplexity_increase(self) -> float | None:
        if self.perplexity_original is None or self.perplexity_overlay is None:
            return None
        return self.perplexity_overlay / self.perplexity_original - 1.0

    @property
    def size_ratio(self) -> float:
        """Source expert bytes / overlay bytes (below 1: the overlay is larger than what it replaces)."""
        return self.source_expert_bytes / self.overlay_bytes if self.overlay_bytes else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["perplexity_increase"] = self.perplexity_increase
        d["size_ratio"] = self.size_ratio
        d["verdict"] = None if self.passed is None else ("PASS" if self.passed else "FAIL")
        return d


def reconstruction_errors(ckpt: MoeCheckpoint, overlay: str | Path, config: dict | None = None
                          ) -> list[ReconstructionError]:
    """Relative Frobenius error ``||W_e - (base + A[e] B[e])|| / ||W_e||`` of the STORED overlay (after its
    dtype rounding) against the source experts, mean and max over experts, per (layer, projection)."""
    config = config or read_config(overlay)
    out = []
    for layer in config["moe_layers"]:
        f = read_layer(overlay, config, int(layer))
        for p in PROJECTIONS:
            base = f.base_fp32(p)
            errs = []
            for e, w in ckpt.iter_experts(int(layer), p, reuse=True):
                rec = base + f.a[p][e].float() @ f.b[p][e].float()
                norm = float(w.norm())
                errs.append(float((w - rec).norm()) / norm if norm > 0 else float((w - rec).norm()))
            out.append(ReconstructionError(int(layer), p, int(f.a[p].shape[2]), sum(errs) / len(errs), max(errs)))
    return out


def overlay_bytes_on_disk(overlay: str | Path, config: dict) -> int:
    """Bytes of the overlay's tensors as stored in its layer shards (from the safetensors headers)."""
    from lazarus_core.models.safetensors_file import SafetensorsFile

    total = 0
    for entry in config["layers"].values():
        f = SafetensorsFile(Path(overlay) / entry["shard"])
        try:
            total += sum(info.nbytes for info in f.tensors.values())
        finally:
            f.close()
    return total


def heldout_text(root: Path | None = None, max_chars: int = 200_000) -> tuple[str, str]:
    """Held-out evaluation text: the model's shipped ``heldout.jsonl`` (built-in models) when ``root`` has one,
    else the built-in corpus's held-out split; returns (text, description)."""
    import json

    docs: list[str] = []
    shipped = root / "heldout.jsonl" if root is not None else None
    if shipped is not None and shipped.is_file():
        docs = [json.loads(line)["text"] for line in shipped.read_text().splitlines() if line.strip()]
        source = f"{shipped} (held-out split)"
    else:
        from lazarus_core.demo.corpus import build_corpus

        docs, source = build_corpus().heldout, "built-in corpus, held-out split"
    text, total = [], 0
    for doc in docs:
        text.append(doc)
        total += len(doc)
        if total >= max_chars:
            break
    return "\n\n".join(text), source


def _windows(ids: list[int], seq_len: int, max_tokens: int) -> list[torch.Tensor]:
    ids = ids[:max_tokens]
    return [torch.tensor(ids[i:i + seq_len]) for i in range(0, len(ids) - 1, seq_len) if len(ids[i:i + seq_len]) > 1]


def _capture_experts(model: torch.nn.Module):
    """Hooks on every experts module: record (layer, hidden, ids, weights, output) of each call."""
    from lazarus_core.overlay.load import experts_modules

    records: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    handles = []
    for layer, module in experts_modules(model).items():
        def hook(mod, args, kwargs, output, layer=layer):
            names = ("hidden_states", "top_k_index", "top_k_weights")
            vals = list(args) + [kwargs[n] for n in names[len(args):] if n in kwargs]
            h = vals[0].shape[-1]  # rows [T, H] (DBRX's experts take and return [B, S, H])
            records.append((layer, vals[0].detach().reshape(-1, h), vals[1].detach(), vals[2].detach(),
                            output.detach().reshape(-1, h)))
        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    return records, handles


def verify_overlay(model: str, overlay: str | Path, *, text: str | None = None, text_source: str = "",
                   max_tokens: int = 2048, seq_len: int = 128, backend: str = "auto", revision: str | None = None,
                   outputs: bool = True, force: bool = False) -> VerifyReport:
    """Verify ``overlay`` against its source ``model``.

    Parameters
    ----------
    model : str
        Source model (directory or built-in alias).
    overlay : str or Path
    text : str, optional
        Evaluation text (default: the built-in corpus's held-out split).
    text_source : str
        Where ``text`` came from (recorded).
    max_tokens, seq_len : int
        Tokens evaluated, in windows of ``seq_len`` (each window scored independently).
    backend : str
        Kernel backend of the overlay forward.
    revision : str, optional
    outputs : bool
        False: reconstruction errors and size only (no model run).
    force : bool
        Verify an overlay whose source fingerprint does not match ``model`` (a loud warning instead of the error).

    Returns
    -------
    VerifyReport
        ``passed`` is False when the overlay misses a threshold or is larger than the source experts it replaces
        (``size_ratio < 1``); None with ``outputs=False`` (no verdict without the model run; the size is reported).

    Raises
    ------
    OverlaySourceMismatch
        The overlay was made from another checkpoint (without ``force``), or its structure does not fit ``model``.
    """
    from lazarus_core.models import open_moe_checkpoint
    from lazarus_core.overlay.load import load_model as load_overlay_model
    from lazarus_core.overlay.load import load_overlay_layers
    from lazarus_core.routing.loading import load_model as load_original

    t0 = time.perf_counter()
    config = read_config(overlay)
    ckpt = open_moe_checkpoint(model, revision=revision)
    check_source(ckpt, config, force=force, overlay=overlay, all_bytes=True)  # it reads every expert anyway
    stored = expert_bytes_as_stored(ckpt, [int(layer) for layer in config["moe_layers"]])
    report = VerifyReport(model=model, overlay=str(overlay), reconstruction=reconstruction_errors(ckpt, overlay, config),
                          source_expert_bytes=sum(stored.values()),
                          overlay_bytes=overlay_bytes_on_disk(overlay, config))
    if not outputs:
        report.seconds = time.perf_counter() - t0
        return report
    original, tokenizer, source = load_original(model, revision=revision)
    if tokenizer is None:
        raise ValueError(f"{model} ships no tokenizer; moe-overlay-verify needs one to score text")
    if text is None:
        text, text_source = heldout_text(source.root)
    windows = _windows(tokenizer(text)["input_ids"], seq_len, max_tokens)
    if not windows:
        raise ValueError("the evaluation text has fewer than 2 tokens")
    ov_model = load_overlay_model(model, overlay=overlay, backend=backend, force=force)
    layers = load_overlay_layers(overlay)
    records, handles = _capture_experts(original)
    nll_o = nll_v = kl = 0.0
    agree = count = 0
    err_num: dict[int, float] = {}
    err_den: dict[int, float] = {}
    try:
        with torch.no_grad():
            for ids in windows:
                records.clear()
                lo = original(ids[None]).logits[0, :-1].float()
                lv = ov_model(ids[None]).logits[0, :-1].float()
                target = ids[1:]
                lpo, lpv = lo.log_softmax(-1), lv.log_softmax(-1)
                nll_o += float(-lpo.gather(1, target[:, None]).sum())
                nll_v += float(-lpv.gather(1, target[:, None]).sum())
                kl += float((lpo.exp() * (lpo - lpv)).sum())
                agree += int((lo.argmax(-1) == lv.argmax(-1)).sum())
                count += target.numel()
                for layer, x, tid, tw, y in records:  # the block on the hidden states the original produced
                    yv = overlay_moe_forward(x, tid, tw, layers[layer], backend=backend)
                    err_num[layer] = err_num.get(layer, 0.0) + float((yv.float() - y.float()).square().sum())
                    err_den[layer] = err_den.get(layer, 0.0) + float(y.float().square().sum())
    finally:
        for h in handles:
            h.remove()
    report.tokens = count
    report.text_source = text_source
    report.block_output_error = {str(k): math.sqrt(err_num[k] / err_den[k]) if err_den[k] > 0 else 0.0
                                 for k in sorted(err_num)}
    report.logit_kl = kl / count
    report.perplexity_original = math.exp(nll_o / count)
    report.perplexity_overlay = math.exp(nll_v / count)
    report.top1_agreement = agree / count
    report.top1_agreement_ci95 = agreement_interval(agree, count)
    report.passed = verdict(report)
    report.seconds = time.perf_counter() - t0
    return report
