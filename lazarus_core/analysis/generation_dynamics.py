"""Routing during generation: step-to-step stability, expert handoffs and phase changes, each against shuffled steps."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from lazarus_core.analysis.intervals import Interval, bootstrap_mean_ci, wilson_interval

DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "12 + 7 =",
    "Once upon a time, there was a",
    "The opposite of hot is",
    "import os\nimport sys\n",
)


# ------------------------------------------------------------------------------------------ generating
@dataclass
class Generation:
    """One prompt's continuation and the routing of every generation step.

    Step s is the forward pass that produced new token s (for s = 0, the prompt's last position; for
    s > 0, new token s - 1 fed back), so ``routing[layer][s]`` is the routing that chose token s.

    Attributes
    ----------
    prompt : str
    answer : str or None
        The expected answer, when the prompts file gives one.
    text : str
        The decoded continuation.
    new_token_ids : list of int
    correct : bool or None
        The continuation matches ``answer`` (None without one).
    routing : dict[int, np.ndarray]
        Layer -> int64 [steps, k] experts of each step, sorted by weight (slot 0 = primary).
    """

    prompt: str
    answer: str | None
    text: str
    new_token_ids: list[int]
    correct: bool | None
    routing: dict[int, np.ndarray]

    @property
    def steps(self) -> int:
        return len(self.new_token_ids)

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "answer": self.answer, "text": self.text, "new_token_ids": self.new_token_ids,
                "correct": self.correct, "steps": self.steps,
                "routing": {str(l): np.asarray(r).tolist() for l, r in self.routing.items()}}


def answer_matches(text: str, answer: str, match: str = "prefix") -> bool:
    """``answer`` (stripped, case-folded) starts the continuation (``prefix``) or occurs in it (``contains``)."""
    got, want = " ".join(text.split()).casefold(), " ".join(str(answer).split()).casefold()
    if match == "prefix":
        return got.startswith(want)
    if match == "contains":
        return want in got
    raise ValueError(f"--match must be prefix or contains, got {match!r}")


def generate_with_routing(model, tokenizer, prompt_ids: Sequence[int], max_new_tokens: int, layers: list[int], *,
                          temperature: float = 0.0, seed: int = 0, info=None, stop_at_eos: bool = True
                          ) -> tuple[list[int], dict[int, np.ndarray]]:
    """Greedy (``temperature=0``) or seeded sampled continuation, with the routing of every step.

    A manual decoding loop with the KV cache: each forward call is recorded by a
    :class:`lazarus_core.routing.RoutingRecorder`, and the last row of the call is the step's routing.

    Parameters
    ----------
    model : nn.Module
    tokenizer : transformers tokenizer
        Its eos id stops generation (with ``stop_at_eos``).
    prompt_ids : sequence of int
        Prompt token ids [n], n >= 1.
    max_new_tokens : int
    layers : list of int
        MoE layers to record.
    temperature : float
        0: greedy; > 0: sample from ``softmax(logits / temperature)`` with a generator seeded by ``seed``.
    seed : int
    info : MoeModelInfo, optional
    stop_at_eos : bool

    Returns
    -------
    (list of int, dict[int, np.ndarray])
        New token ids [steps] and, per layer, int64 [steps, k] experts sorted by weight.
    """
    import torch

    from lazarus_core.routing.recorder import RoutingRecorder

    device = next(model.parameters()).device
    eos = getattr(tokenizer, "eos_token_id", None) if stop_at_eos else None
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    new, steps = [], {l: [] for l in layers}
    with RoutingRecorder(model, list(layers), info=info) as rec, torch.inference_mode():
        out = model(input_ids=torch.tensor([list(prompt_ids)], device=device), use_cache=True)
        for _ in range(max_new_tokens):
            routed = rec.pop()
            for l in layers:
                steps[l].append(routed[l].topk_ids[-1].cpu().numpy().astype(np.int64))
            logits = out.logits[0, -1].float().cpu()
            if temperature > 0:
                tok = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))
            else:
                tok = int(logits.argmax())
            new.append(tok)
            if eos is not None and tok == eos:
                break
            out = model(input_ids=torch.tensor([[tok]], device=device), use_cache=True, **_cache_of(out))
        rec.pop()
    k = max((len(s[0]) for s in steps.values() if s), default=0)
    return new, {l: (np.stack(s) if s else np.zeros((0, k), np.int64)) for l, s in steps.items()}


def _cache_of(out) -> dict:
    """The KV cache of a forward output as the keyword the model takes back (``cache``, or the older ``past_key_values``)."""
    cache = getattr(out, "cache", None)
    return {"cache": cache} if cache is not None else {"past_key_values": out.past_key_values}


# ------------------------------------------------------------------------------------------ statistics
def _multi_hot(ids: np.ndarray, num_experts: int) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    out = np.zeros((len(ids), num_experts), dtype=np.float64)
    if ids.size:
        np.put_along_axis(out, ids, 1.0, axis=1)
    return out


def step_jaccard(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """float64 [steps - 1]: Jaccard similarity of consecutive steps' top-k sets (int [steps, k])."""
    x = _multi_hot(ids, num_experts)
    if len(x) < 2:
        return np.zeros(0)
    inter = (x[:-1] * x[1:]).sum(1)
    union = x[:-1].sum(1) + x[1:].sum(1) - inter
    return inter / np.maximum(union, 1)


def change_point(series: np.ndarray, *, permutations: int = 200, level: float = 0.95, min_segment: int = 2,
                 rng: np.random.Generator | None = None) -> "ChangePoint | None":
    """Largest mean shift of a step series, against the same series with its steps shuffled.

    The statistic is ``max_tau tau (n - tau) / n * ||mean(x[:tau]) - mean(x[tau:])||^2`` over split
    points with at least ``min_segment`` steps on each side (the multivariate two-sample mean
    difference, CUSUM-scaled); the threshold is its ``level`` quantile over shuffled copies of the
    series (a stationary series is exchangeable, so its order carries no information).

    Parameters
    ----------
    series : np.ndarray
        float [n] or [n, d] (e.g. the Jaccard series, or each step's multi-hot expert vector).
    permutations : int
    level : float
    min_segment : int
    rng : np.random.Generator, optional

    Returns
    -------
    ChangePoint or None
        None when the series is shorter than ``2 * min_segment``.
    """
    x = np.asarray(series, dtype=np.float64)
    x = x[:, None] if x.ndim == 1 else x
    n = len(x)
    if n < 2 * min_segment:
        return None
    rng = rng or np.random.default_rng(0)
    perms = np.stack([rng.permutation(n) for _ in range(permutations)]) if permutations else np.zeros((0, n), int)
    stacked = np.concatenate([x[None], x[perms]], 0)                     # [1 + P, n, d]
    csum = np.cumsum(stacked, axis=1)
    tau = np.arange(min_segment, n - min_segment + 1)
    left = csum[:, tau - 1] / tau[None, :, None]
    right = (csum[:, -1:] - csum[:, tau - 1]) / (n - tau)[None, :, None]
    stat = (tau * (n - tau) / n)[None, :] * ((left - right) ** 2).sum(-1)  # [1 + P, taus]
    best = stat.max(1)
    observed, null = float(best[0]), best[1:]
    threshold = float(np.quantile(null, level)) if permutations else float("nan")
    p = float((1 + (null >= observed - 1e-12).sum()) / (1 + permutations))
    return ChangePoint(observed, int(tau[int(stat[0].argmax())]), threshold, p, bool(permutations and observed > threshold))


@dataclass
class ChangePoint:
    """A change-point test of one step series.

    Attributes
    ----------
    statistic : float
        Largest scaled mean difference (see :func:`change_point`).
    location : int
        The split with the largest difference (steps before it form the first segment).
    threshold : float
        The statistic's ``level`` quantile over shuffled series.
    p_value : float
        Share of shuffled series at least as extreme (with the +1 correction).
    detected : bool
        ``statistic > threshold``.
    """

    statistic: float
    location: int
    threshold: float
    p_value: float
    detected: bool

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LayerDynamics:
    """Routing dynamics of one layer over every generation.

    Attributes
    ----------
    layer : int
    transitions : int
        Consecutive step pairs pooled over the generations.
    jaccard : Interval or None
        Mean top-k Jaccard of consecutive steps, bootstrap interval over generations.
    jaccard_shuffled : dict
        The same with each generation's steps shuffled: ``mean``, ``low``, ``high`` (2.5 / 97.5%
        quantiles over permutations).
    jaccard_p : float or None
        Share of shuffles with a mean Jaccard at least the observed one.
    handoff : list of list of int
        ``[a][b]``: steps whose primary expert is a followed by a step whose primary is b.
    handoff_expected : list of list of float
        Row total times column total over all transitions (independence given the marginals).
    self_handoff, self_handoff_expected : float
        Share of transitions keeping the primary expert, observed and expected.
    handoff_chi2 : float
        Pearson's statistic of ``handoff`` against ``handoff_expected``.
    handoff_p : float or None
        Its permutation p (steps shuffled within each generation).
    phases : list of dict
        Per generation: ``generation``, ``usage`` (change point of the multi-hot expert series) and
        ``jaccard`` (change point of the Jaccard series), each a ChangePoint or None (too short).
    phase_detected_share : float or None
        Share of generations with a detected usage change; about ``1 - level`` when routing is stationary.
    correctness : dict or None
        With answers: correct vs incorrect generations' load difference (see :func:`routing_dynamics`).
    """

    layer: int
    transitions: int
    jaccard: Interval | None
    jaccard_shuffled: dict
    jaccard_p: float | None
    handoff: list[list[int]]
    handoff_expected: list[list[float]]
    self_handoff: float
    self_handoff_expected: float
    handoff_chi2: float
    handoff_p: float | None
    phases: list[dict] = field(default_factory=list)
    phase_detected_share: float | None = None
    correctness: dict | None = None

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["jaccard"] = None if self.jaccard is None else self.jaccard.to_dict()
        d["phases"] = [{"generation": p["generation"],
                        **{key: (None if p[key] is None else p[key].to_dict()) for key in ("usage", "jaccard")}}
                       for p in self.phases]
        return d


@dataclass
class GenerationDynamics:
    """Result of :func:`generation_dynamics` / :func:`routing_dynamics`.

    Attributes
    ----------
    num_experts, top_k : int
    temperature : float
        0 for greedy decoding.
    seed, permutations : int
    level : float
        Quantile of the permutation thresholds.
    accuracy : Interval or None
        Share of correct generations (Wilson), with answers.
    generations : list of Generation
    layers : list of LayerDynamics
    """

    num_experts: int
    top_k: int
    temperature: float
    seed: int
    permutations: int
    level: float
    accuracy: Interval | None
    generations: list[Generation]
    layers: list[LayerDynamics]

    def to_dict(self) -> dict:
        return {"num_experts": self.num_experts, "top_k": self.top_k, "temperature": self.temperature,
                "seed": self.seed, "permutations": self.permutations, "level": self.level,
                "accuracy": None if self.accuracy is None else self.accuracy.to_dict(),
                "generations": [g.to_dict() for g in self.generations], "layers": [l.to_dict() for l in self.layers]}

    def tables(self) -> dict[str, list[dict]]:
        """Flat rows for CSV files: one per layer, and one per generation step and layer."""
        layers = []
        for l in self.layers:
            row = {"layer": l.layer, "transitions": l.transitions,
                   "jaccard": None if l.jaccard is None else l.jaccard.estimate,
                   "jaccard_low": None if l.jaccard is None else l.jaccard.low,
                   "jaccard_high": None if l.jaccard is None else l.jaccard.high,
                   "jaccard_shuffled": l.jaccard_shuffled.get("mean"), "jaccard_p": l.jaccard_p,
                   "self_handoff": l.self_handoff, "self_handoff_expected": l.self_handoff_expected,
                   "handoff_chi2": l.handoff_chi2, "handoff_p": l.handoff_p,
                   "phase_detected_share": l.phase_detected_share}
            if l.correctness:
                row.update(load_l1_difference=l.correctness.get("load_l1_difference"),
                           load_p=l.correctness.get("p_value"))
            layers.append(row)
        steps = [{"generation": g_i, "step": s, "layer": l, "token_id": g.new_token_ids[s],
                  "experts": " ".join(str(int(e)) for e in r[s])}
                 for g_i, g in enumerate(self.generations) for l, r in g.routing.items() for s in range(len(r))]
        return {"layers": layers, "steps": steps}


def _pooled_jaccard(series: list[np.ndarray]) -> float:
    total = sum(len(s) for s in series)
    return float(sum(s.sum() for s in series) / total) if total else float("nan")


def _handoff(primaries: list[np.ndarray], num_experts: int) -> np.ndarray:
    h = np.zeros((num_experts, num_experts), dtype=np.int64)
    for p in primaries:
        if len(p) > 1:
            np.add.at(h, (p[:-1], p[1:]), 1)
    return h


def _chi2(h: np.ndarray) -> tuple[float, np.ndarray]:
    total = h.sum()
    if total == 0:
        return 0.0, np.zeros(h.shape)
    expected = np.outer(h.sum(1), h.sum(0)) / total
    ok = expected > 0
    return float(((h - expected)[ok] ** 2 / expected[ok]).sum()), expected


def routing_dynamics(generations: list[Generation], num_experts: int, *, layers: list[int] | None = None,
                     permutations: int = 200, level: float = 0.95, seed: int = 0, n_boot: int = 2000,
                     temperature: float = 0.0) -> GenerationDynamics:
    """Step-to-step routing statistics of generations, each next to the same steps shuffled.

    Per layer: the consecutive-step top-k Jaccard (pooled over generations, bootstrap interval over
    generations) against the mean over ``permutations`` shuffles of each generation's steps (with its
    2.5-97.5% range and a permutation p); the handoff matrix of primary experts against its
    expectation under independence given the marginals (Pearson's statistic, permutation p); per
    generation a change-point test (:func:`change_point`) of the multi-hot expert series and of the
    Jaccard series; with answers, the L1 distance between correct and incorrect generations' mean
    loads (each generation's share of steps holding each expert) with a label-permutation p.

    Parameters
    ----------
    generations : list of Generation
        Routing per layer of every step (``routing[layer]`` int [steps, k]).
    num_experts : int
    layers : list of int, optional
        Layers to analyse (default those of the first generation).
    permutations, level, seed, n_boot : int, float, int, int
    temperature : float
        Recorded in the result.

    Returns
    -------
    GenerationDynamics
    """
    if not generations:
        raise ValueError("no generations: give at least one prompt (-p or --prompts)")
    layers = sorted(generations[0].routing) if layers is None else list(layers)
    rng = np.random.default_rng(seed)
    k = next((int(np.shape(g.routing[l])[1]) for g in generations for l in layers if len(g.routing[l])), 0)
    labelled = [g.correct for g in generations if g.correct is not None]
    accuracy = wilson_interval(int(sum(labelled)), len(labelled)) if labelled else None
    out_layers = []
    for layer in layers:
        ids = [np.asarray(g.routing[layer], dtype=np.int64) for g in generations]
        series = [step_jaccard(x, num_experts) for x in ids]
        groups = np.concatenate([np.full(len(s), i) for i, s in enumerate(series)]) if series else np.zeros(0)
        flat = np.concatenate(series) if series else np.zeros(0)
        jac = bootstrap_mean_ci(flat, groups, n_boot=n_boot, seed=seed) if flat.size else None
        primaries = [x[:, 0] if len(x) else np.zeros(0, np.int64) for x in ids]
        hand = _handoff(primaries, num_experts)
        chi2, expected = _chi2(hand)
        total = int(hand.sum())
        null_jac, null_chi2 = [], []
        for _ in range(permutations if total else 0):
            shuffled = [x[rng.permutation(len(x))] for x in ids]
            null_jac.append(_pooled_jaccard([step_jaccard(x, num_experts) for x in shuffled]))
            null_chi2.append(_chi2(_handoff([x[:, 0] if len(x) else np.zeros(0, np.int64) for x in shuffled],
                                            num_experts))[0])
        null_jac, null_chi2 = np.asarray(null_jac), np.asarray(null_chi2)
        shuffled_summary = ({"mean": float(null_jac.mean()), "low": float(np.quantile(null_jac, 0.025)),
                             "high": float(np.quantile(null_jac, 0.975))} if null_jac.size else {})
        jac_p = (float((1 + (null_jac >= flat.mean() - 1e-12).sum()) / (1 + null_jac.size))
                 if null_jac.size and flat.size else None)
        chi2_p = float((1 + (null_chi2 >= chi2 - 1e-9).sum()) / (1 + null_chi2.size)) if null_chi2.size else None
        phases = []
        for g_i, (x, s) in enumerate(zip(ids, series)):
            phases.append({"generation": g_i,
                           "usage": change_point(_multi_hot(x, num_experts), permutations=permutations, level=level,
                                                 rng=rng),
                           "jaccard": change_point(s, permutations=permutations, level=level, rng=rng)})
        tested = [p["usage"] for p in phases if p["usage"] is not None]
        res = LayerDynamics(layer, total, jac, shuffled_summary, jac_p, hand.tolist(), expected.tolist(),
                            float(np.trace(hand) / total) if total else float("nan"),
                            float(np.trace(expected) / total) if total else float("nan"), chi2, chi2_p, phases,
                            float(np.mean([c.detected for c in tested])) if tested else None)
        res.correctness = _correctness(ids, [g.correct for g in generations], series, num_experts, permutations, rng)
        out_layers.append(res)
    return GenerationDynamics(num_experts, k, float(temperature), seed, permutations, level, accuracy,
                              list(generations), out_layers)


def _correctness(ids, correct, series, num_experts, permutations, rng) -> dict | None:
    """Correct vs incorrect generations: mean-load L1 distance and mean-Jaccard difference, label-permutation p."""
    keep = [i for i, c in enumerate(correct) if c is not None and len(ids[i])]
    labels = np.array([bool(correct[i]) for i in keep])
    if len(keep) < 2 or labels.all() or not labels.any():
        return None if not keep else {"correct": int(labels.sum()), "incorrect": int((~labels).sum()),
                                      "load_l1_difference": None, "p_value": None,
                                      "note": "needs both correct and incorrect generations"}
    loads = np.stack([_multi_hot(ids[i], num_experts).mean(0) for i in keep])     # [G, E]
    jac = np.array([series[i].mean() if len(series[i]) else np.nan for i in keep])

    def stats(lab):
        d = float(np.abs(loads[lab].mean(0) - loads[~lab].mean(0)).sum())
        j = float(np.nanmean(jac[lab]) - np.nanmean(jac[~lab])) if np.isfinite(jac[lab]).any() and \
            np.isfinite(jac[~lab]).any() else float("nan")
        return d, j

    d_obs, j_obs = stats(labels)
    null = np.array([stats(rng.permutation(labels)) for _ in range(permutations)]) if permutations else np.zeros((0, 2))
    p_d = float((1 + (null[:, 0] >= d_obs - 1e-12).sum()) / (1 + len(null))) if len(null) else None
    p_j = (float((1 + (np.abs(null[:, 1]) >= abs(j_obs) - 1e-12).sum()) / (1 + len(null)))
           if len(null) and np.isfinite(j_obs) else None)
    return {"correct": int(labels.sum()), "incorrect": int((~labels).sum()),
            "load_correct": loads[labels].mean(0).tolist(), "load_incorrect": loads[~labels].mean(0).tolist(),
            "load_l1_difference": d_obs, "load_l1_shuffled": float(null[:, 0].mean()) if len(null) else None,
            "p_value": p_d, "jaccard_difference": j_obs, "jaccard_p": p_j}


def generation_dynamics(model, tokenizer, prompts: Sequence[str], *, answers: Sequence[str | None] | None = None,
                        layers: list[int] | None = None, max_new_tokens: int = 24, temperature: float = 0.0,
                        seed: int = 0, permutations: int = 200, level: float = 0.95, match: str = "prefix",
                        info=None, n_boot: int = 2000, progress: Callable[[int], None] | None = None
                        ) -> GenerationDynamics:
    """Generate from each prompt, recording the routing of every step, and analyse it (:func:`routing_dynamics`).

    Parameters
    ----------
    model : nn.Module
    tokenizer : transformers tokenizer
    prompts : sequence of str
        Non-empty prompts.
    answers : sequence of (str or None), optional
        Expected answers, one per prompt (None: no answer for that prompt).
    layers : list of int, optional
        MoE layers (default all).
    max_new_tokens : int
    temperature : float
        0 for greedy; > 0 samples with ``seed`` (the generator restarts at ``seed + prompt index``).
    seed, permutations, level, n_boot
    match : {"prefix", "contains"}
        How a continuation is checked against its answer (:func:`answer_matches`).
    info : MoeModelInfo, optional
    progress : callable, optional
        Called with the prompt index after each generation.

    Returns
    -------
    GenerationDynamics

    Raises
    ------
    ValueError
        No prompts, an empty prompt, ``max_new_tokens < 2``, a negative temperature or a layer that is
        not an MoE layer.
    """
    from lazarus_core.routing import find_moe_layers

    if not prompts:
        raise ValueError("no prompts: give -p PROMPT or --prompts FILE")
    if any(not str(p).strip() for p in prompts):
        raise ValueError("--prompt: a prompt is empty")
    if max_new_tokens < 2:
        raise ValueError(f"--max-new-tokens must be at least 2 (steps to compare), got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {temperature}")
    answer_matches("", "", match)
    info = info or find_moe_layers(model)
    available = sorted(info.layers)
    layers = available if layers is None else list(layers)
    bad = [l for l in layers if l not in available]
    if bad:
        raise ValueError(f"--layers {','.join(map(str, bad))} is out of range: the MoE layers are {available}")
    answers = list(answers) if answers is not None else [None] * len(prompts)
    gens = []
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        ids = tokenizer(prompt)["input_ids"]
        if not ids:
            raise ValueError(f"--prompt {prompt!r} encodes to no tokens")
        new, routing = generate_with_routing(model, tokenizer, ids, max_new_tokens, layers, temperature=temperature,
                                             seed=seed + i, info=info)
        text = tokenizer.decode(new, skip_special_tokens=True)
        correct = None if answer is None else answer_matches(text, answer, match)
        gens.append(Generation(str(prompt), answer, text, new, correct, routing))
        if progress is not None:
            progress(i)
    return routing_dynamics(gens, info.num_experts, layers=layers, permutations=permutations, level=level, seed=seed,
                            n_boot=n_boot, temperature=temperature)
