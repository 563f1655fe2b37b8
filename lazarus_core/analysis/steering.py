"""Steer a model by changing one expert's post-softmax routing weight, and measure what it does to the next token."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from lazarus_core.routing.interventions import RoutingEdit, RoutingIntervention, WeightOverride, renormalises
from lazarus_core.routing.locate import MoeModelInfo, find_moe_layers

MODES = ("boost", "ablate")


@dataclass
class TokenProb:
    """One candidate next token and its probability."""

    token_id: int
    token: str
    prob: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SweepPoint:
    """The next-token change for one steering value.

    Attributes
    ----------
    value : float
        The expert's weight (mode boost) at the target position(s).
    kl : float
        KL(base || steered) of the next-token distribution at the last prompt position (nats).
    kl_other_experts : float
        The same edit applied to other experts of the layer, mean KL (the baseline: how much any
        expert's weight change moves the distribution).
    top_token : TokenProb
        Most likely next token after the edit.
    base_top_prob : float
        Probability, after the edit, of the token that was most likely before it.
    """

    value: float
    kl: float
    kl_other_experts: float
    top_token: TokenProb
    base_top_prob: float

    def to_dict(self) -> dict:
        return {"value": self.value, "kl": self.kl, "kl_other_experts": self.kl_other_experts,
                "top_token": self.top_token.to_dict(), "base_top_prob": self.base_top_prob}


@dataclass
class SteeringResult:
    """What changing one expert's routing weight does to a prompt's next token and its continuation.

    Attributes
    ----------
    layer, expert : int
    mode : {"boost", "ablate"}
    value : float
        The weight the expert gets (0 for ablate).
    target_idx : int or None
        The position edited (None: every position, generated ones included).
    renormalised : bool
        Whether the family keeps the k weights' total (the others share what is left) or leaves them.
    prompt_ids : list of int
    weight_before : list of float
        The expert's weight at each edited prompt position before the edit (0 where not selected).
    top_before, top_after : list of TokenProb
        Most likely next tokens at the last prompt position, before and after.
    kl : float
        KL(base || steered) of that distribution (nats); 0 means the edit changed nothing.
    kl_other_experts : float
        Mean KL of the same edit on other experts of the layer (the baseline; NaN when none was run).
    other_experts : list of int
        The experts of that baseline.
    top1_changed : bool
    continuation_before, continuation_after : str
        Greedy continuations (``max_new_tokens`` tokens), without and with the edit.
    sweep : list of SweepPoint
    """

    layer: int
    expert: int
    mode: str
    value: float
    target_idx: int | None
    renormalised: bool
    prompt_ids: list[int]
    weight_before: list[float]
    top_before: list[TokenProb]
    top_after: list[TokenProb]
    kl: float
    kl_other_experts: float
    other_experts: list[int]
    top1_changed: bool
    continuation_before: str
    continuation_after: str
    continuation_before_ids: list[int] = field(default_factory=list)
    continuation_after_ids: list[int] = field(default_factory=list)
    sweep: list[SweepPoint] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("top_before", "top_after", "sweep")}
        d["top_before"] = [t.to_dict() for t in self.top_before]
        d["top_after"] = [t.to_dict() for t in self.top_after]
        d["sweep"] = [s.to_dict() for s in self.sweep]
        return d


def steering_edit(expert: int, mode: str, value: float | None = None, target_idx: int | None = None) -> RoutingEdit:
    """The :class:`RoutingEdit` of a steering change: one :class:`WeightOverride` (boost: weight = value; ablate: 0)."""
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    v = 0.0 if mode == "ablate" else float(value)
    rows = None if target_idx is None else (int(target_idx),)
    return RoutingEdit(weights=(WeightOverride(int(expert), v, rows=rows),))


def _logprobs_last(model, ids: list[int], edit: RoutingEdit | None, layer: int, info: MoeModelInfo) -> np.ndarray:
    import torch

    device = next(model.parameters()).device
    ctx = RoutingIntervention(model, edit, [layer], info=info) if edit is not None else _null()
    with ctx, torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0, -1]
    return torch.log_softmax(logits.double(), -1).cpu().numpy()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _greedy(model, ids: list[int], steps: int, edit: RoutingEdit | None, layer: int, info: MoeModelInfo,
            eos: int | None) -> list[int]:
    """Greedy decoding without a KV cache (every step re-runs the sequence, so a row is always a position)."""
    seq = list(ids)
    for _ in range(steps):
        nxt = int(np.argmax(_logprobs_last(model, seq, edit, layer, info)))
        seq.append(nxt)
        if eos is not None and nxt == eos:
            break
    return seq[len(ids):]


def _kl(p_log: np.ndarray, q_log: np.ndarray) -> float:
    return float(max(0.0, (np.exp(p_log) * (p_log - q_log)).sum()))


def _top(logp: np.ndarray, n: int, name) -> list[TokenProb]:
    order = np.argsort(-logp, kind="stable")[:n]
    return [TokenProb(int(i), name(int(i)), float(np.exp(logp[i]))) for i in order]


def _weights_at(model, ids: list[int], layer: int, expert: int, info: MoeModelInfo) -> np.ndarray:
    """float32 [n] the expert's mixing weight at every position (0 where not selected)."""
    import torch

    from lazarus_core.routing.recorder import RoutingRecorder

    device = next(model.parameters()).device
    with RoutingRecorder(model, [layer], info=info) as rec, torch.inference_mode():
        model(input_ids=torch.tensor([ids], device=device), use_cache=False)
        r = rec.pop()[layer]
    w = (r.topk_weights * (r.topk_ids == expert)).sum(-1)
    return w.cpu().numpy().astype(np.float32)


def steer(model, prompt: str | Sequence[int], layer: int, expert: int, *, mode: str = "boost",
          value: float | None = None, target_idx: int | None = None, tokenizer=None, sweep: Sequence[float] = (),
          max_new_tokens: int = 8, top: int = 5, baseline_experts: int = 4, seed: int = 0,
          info: MoeModelInfo | None = None) -> SteeringResult:
    """Change one expert's post-softmax routing weight at one layer and compare the next token and continuation.

    The edit is a forward hook on the router (:class:`lazarus_core.routing.RoutingIntervention` with a
    :class:`lazarus_core.routing.interventions.WeightOverride`): the router's own selection is kept
    and the expert's mixing weight is set to ``value`` (``mode="boost"``) or 0 (``mode="ablate"``);
    an expert that was not selected is added as an extra slot. In families whose k weights are
    normalised (Mixtral, GPT-OSS, Qwen3, DeepSeek) the other selected experts share what is left of
    the total in their old proportions; in OLMoE (no renormalisation) they keep their weights.

    Parameters
    ----------
    model : nn.Module
        A transformers MoE causal LM.
    prompt : str or sequence of int
        The prompt (a string needs ``tokenizer``) or its token ids [n].
    layer : int
        MoE layer (model layer index).
    expert : int
        Expert of that layer.
    mode : {"boost", "ablate"}
    value : float, optional
        Boost: the expert's new weight (default: the routing's total, ``routed_scaling_factor``, i.e.
        all of the mass in a renormalising family). Ignored for ablate.
    target_idx : int, optional
        Edit only this prompt position (negative counts from the end); default every position,
        including generated ones.
    tokenizer : transformers tokenizer, optional
        Encodes a string prompt and names tokens (ids are shown otherwise).
    sweep : sequence of float
        Boost values to sweep (next-token KL and top token for each).
    max_new_tokens : int
        Length of the greedy continuations.
    top : int
        Next tokens listed before and after.
    baseline_experts : int
        Other experts (seeded random choice) given the same edit for the KL baseline (0: none).
    seed : int
    info : MoeModelInfo, optional

    Returns
    -------
    SteeringResult

    Raises
    ------
    ValueError
        Unknown mode, a negative value, a layer that is not an MoE layer (names ``--layer``), an
        expert out of range (``--expert``), a target position beyond the prompt (``--target-idx``), or
        an empty prompt.
    """
    info = info or find_moe_layers(model)
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if layer not in info.layers:
        raise ValueError(f"--layer {layer} is not an MoE layer: the MoE layers are {sorted(info.layers)}")
    n_experts = info.layers[layer].num_experts
    if not 0 <= expert < n_experts:
        raise ValueError(f"--expert {expert} is out of range: layer {layer} has {n_experts} experts (0..{n_experts - 1})")
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer (or give token ids)")
        if not prompt.strip():
            raise ValueError("the prompt is empty (-p)")
        ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    else:
        ids = [int(i) for i in prompt]
    if not ids:
        raise ValueError("the prompt is empty (-p)")
    if target_idx is not None:
        if not -len(ids) <= target_idx < len(ids):
            raise ValueError(f"--target-idx {target_idx} is out of range: the prompt has {len(ids)} tokens "
                             f"(0..{len(ids) - 1})")
        target_idx = target_idx % len(ids)
    total = float(info.rule.routed_scaling_factor)
    if mode == "boost" and value is None:
        value = total
    value = 0.0 if mode == "ablate" else float(value)
    for v in (value, *sweep):
        if v < 0:
            raise ValueError(f"--value must be >= 0 (a post-softmax weight), got {v}")

    def name(i: int) -> str:
        return tokenizer.decode([i]) if tokenizer is not None else str(i)

    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    rng = np.random.default_rng(seed)
    others = [e for e in range(n_experts) if e != expert]
    others = sorted(rng.choice(others, size=min(baseline_experts, len(others)), replace=False).tolist()) if others else []

    base = _logprobs_last(model, ids, None, layer, info)
    before = _weights_at(model, ids, layer, expert, info)

    def measure(v: float, e: int = expert) -> np.ndarray:
        return _logprobs_last(model, ids, steering_edit(e, "boost", v, target_idx), layer, info)

    def other_kl(v: float) -> float:
        kls = [_kl(base, measure(v, e)) for e in others]
        return float(np.mean(kls)) if kls else float("nan")

    after = measure(value)
    edit = steering_edit(expert, "boost", value, target_idx)
    cont_before = _greedy(model, ids, max_new_tokens, None, layer, info, eos)
    cont_after = _greedy(model, ids, max_new_tokens, edit, layer, info, eos)
    base_top = int(np.argmax(base))
    points = []
    for v in sweep:
        lp = measure(float(v))
        points.append(SweepPoint(float(v), _kl(base, lp), other_kl(float(v)), _top(lp, 1, name)[0],
                                 float(np.exp(lp[base_top]))))
    edited_rows = list(range(len(ids))) if target_idx is None else [target_idx]
    return SteeringResult(
        layer=layer, expert=expert, mode=mode, value=value, target_idx=target_idx,
        renormalised=renormalises(info.rule), prompt_ids=ids, weight_before=[float(before[r]) for r in edited_rows],
        top_before=_top(base, top, name), top_after=_top(after, top, name), kl=_kl(base, after),
        kl_other_experts=other_kl(value), other_experts=others, top1_changed=int(np.argmax(after)) != base_top,
        continuation_before=tokenizer.decode(cont_before, skip_special_tokens=True) if tokenizer is not None
        else " ".join(map(str, cont_before)),
        continuation_after=tokenizer.decode(cont_after, skip_special_tokens=True) if tokenizer is not None
        else " ".join(map(str, cont_after)),
        continuation_before_ids=cont_before, continuation_after_ids=cont_after, sweep=points)
