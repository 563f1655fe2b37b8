"""Cold experts: which experts a layer rarely uses, what triggers them, and whether removing them costs held-out loss."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from lazarus_core.analysis.expert_profile import Enrichment, LogitContext, _context, _doc_windows, _enrichment
from lazarus_core.analysis.intervals import Interval, bootstrap_mean_ci, wilson_interval

DEFAULT_TOLERANCE = 0.01
"""Loss increase (nats/token) an ablation may cost and still count as harmless."""


def default_threshold(num_experts: int) -> float:
    """A quarter of the uniform share ``1 / E`` (see :func:`activation_shares` for what a share is)."""
    return 0.25 / num_experts


def activation_shares(topk_ids: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Each expert's share of the layer's routing slots.

    ``share[e] = n_e / (t k)``, where ``n_e`` counts tokens whose top-k holds e: the share of all t k
    (token, slot) pairs that go to e. The shares sum to 1; uniform routing gives ``1 / E`` each. (The
    share of *tokens* routed to e, ``n_e / t``, is ``k`` times larger.)

    Parameters
    ----------
    topk_ids : np.ndarray
        int [t, k], k distinct experts per token.
    num_experts : int

    Returns
    -------
    (counts int64 [E], shares float64 [E])
    """
    ids = np.asarray(topk_ids)
    counts = np.bincount(ids.reshape(-1).astype(np.int64), minlength=num_experts)[:num_experts]
    return counts, counts / max(ids.size, 1)


def expected_cold_uniform(tokens: int, num_experts: int, top_k: int, threshold: float) -> float:
    """Cold experts expected if routing were uniform: ``E * P(Binomial(t, k / E) < threshold * t * k)``."""
    from lazarus_core.trigram.stats import binom_sf

    if tokens == 0:
        return 0.0
    cut = threshold * tokens * top_k                   # cold: n_e < cut
    below = int(np.ceil(cut))                          # n_e <= below - 1
    return float(num_experts * (1.0 - binom_sf(below, tokens, top_k / num_experts)))


@dataclass
class Ablation:
    """Held-out loss change from ablating a set of experts (nats/token), with a bootstrap interval over documents.

    Attributes
    ----------
    experts : dict[int, list[int]]
        Layer -> experts ablated there.
    delta_nll : Interval
    prunable : bool
        ``delta_nll.high <= tolerance``: the interval excludes harm beyond the tolerance.
    tokens, documents : int
    """

    experts: dict[int, list[int]]
    delta_nll: Interval
    prunable: bool
    tokens: int
    documents: int

    def to_dict(self) -> dict:
        d = self.delta_nll
        return {"experts": {str(l): e for l, e in self.experts.items()}, "delta_nll": d.estimate, "ci_low": d.low,
                "ci_high": d.high, "prunable": self.prunable, "tokens": self.tokens, "documents": self.documents}


@dataclass
class ColdExpert:
    """One cold expert of one layer.

    Attributes
    ----------
    expert : int
    count : int
        Tokens whose top-k holds it.
    share : float
        Its share of the layer's routing slots (:func:`activation_shares`).
    share_ci : Interval
        Wilson interval of ``share`` (``count / t`` divided by k).
    top_tokens, top_trigrams : list of Enrichment
        What triggers it, with lift against the expert's share of all the layer's tokens.
    logit_mean : float or None
        Its mean raw router logit (baseline of ``top_logit_contexts``).
    top_logit_contexts : list of LogitContext or None
        The corpus positions with its highest router logit (None without logits in the trace).
    ablation : Ablation or None
        Ablating it alone (None without a model).
    """

    expert: int
    count: int
    share: float
    share_ci: Interval
    top_tokens: list[Enrichment] = field(default_factory=list)
    top_trigrams: list[Enrichment] = field(default_factory=list)
    logit_mean: float | None = None
    top_logit_contexts: list[LogitContext] | None = None
    ablation: Ablation | None = None

    def to_dict(self) -> dict:
        return {"expert": self.expert, "count": self.count, "share": self.share, "share_ci": self.share_ci.to_dict(),
                "top_tokens": [r.to_dict() for r in self.top_tokens],
                "top_trigrams": [r.to_dict() for r in self.top_trigrams], "logit_mean": self.logit_mean,
                "top_logit_contexts": (None if self.top_logit_contexts is None
                                       else [c.to_dict() for c in self.top_logit_contexts]),
                "ablation": None if self.ablation is None else self.ablation.to_dict()}


@dataclass
class LayerColdExperts:
    """The activation distribution of one layer and its cold experts.

    Attributes
    ----------
    layer, tokens : int
    shares : list of float
        Every expert's share of the routing slots, by expert id (the activation frequency distribution).
    uniform_share : float
        ``1 / E``.
    effective_experts : float
        ``exp(entropy(shares))``: E for uniform routing, 1 when one expert takes every slot.
    gini : float
        Gini coefficient of the shares (0 for uniform routing).
    expected_cold_uniform : float
        Cold experts expected at this many tokens if routing were uniform (the null count).
    cold_experts : list of ColdExpert
        Coldest first.
    all_cold : Ablation or None
        Ablating every cold expert of the layer at once.
    random_control : list of Ablation
        Ablating as many random non-cold experts of the layer (one entry per draw).
    random_single : list of Ablation
        Ablating one random non-cold expert (one entry per draw): the control of each cold expert's own
        ablation (the same entries as ``random_control`` when the layer has one cold expert).
    skipped : str or None
        Why an ablation was not measured (e.g. too few experts would remain).
    """

    layer: int
    tokens: int
    shares: list[float]
    uniform_share: float
    effective_experts: float
    gini: float
    expected_cold_uniform: float
    cold_experts: list[ColdExpert] = field(default_factory=list)
    all_cold: Ablation | None = None
    random_control: list[Ablation] = field(default_factory=list)
    random_single: list[Ablation] = field(default_factory=list)
    skipped: str | None = None

    def to_dict(self) -> dict:
        return {"layer": self.layer, "tokens": self.tokens, "shares": self.shares, "uniform_share": self.uniform_share,
                "effective_experts": self.effective_experts, "gini": self.gini,
                "expected_cold_uniform": self.expected_cold_uniform, "num_cold": len(self.cold_experts),
                "cold_experts": [c.to_dict() for c in self.cold_experts],
                "all_cold": None if self.all_cold is None else self.all_cold.to_dict(),
                "random_control": [a.to_dict() for a in self.random_control],
                "random_single": [a.to_dict() for a in self.random_single], "skipped": self.skipped}


@dataclass
class ColdExperts:
    """Result of :func:`cold_experts`.

    Attributes
    ----------
    threshold : float
        An expert is cold when its share of the routing slots is below this.
    tolerance : float
        Loss increase (nats/token) an ablation may cost and still be prunable.
    num_experts, top_k, tokens, documents : int
    layers : list of LayerColdExperts
    num_cold : int
    cold_fraction : float
        Cold experts over all experts of the analysed layers.
    expected_cold_uniform : float
        The same count expected under uniform routing.
    num_prunable : int
        Cold experts whose own ablation is prunable.
    nll_base : float or None
        Held-out loss without ablation (nats/token).
    prune_all : Ablation or None
        Every cold expert of every layer ablated at once.
    prune_all_random : list of Ablation
        As many random non-cold experts per layer, ablated at once (one entry per draw).
    """

    threshold: float
    tolerance: float
    num_experts: int
    top_k: int
    tokens: int
    documents: int
    layers: list[LayerColdExperts]
    nll_base: float | None = None
    prune_all: Ablation | None = None
    prune_all_random: list[Ablation] = field(default_factory=list)

    @property
    def num_cold(self) -> int:
        return sum(len(l.cold_experts) for l in self.layers)

    @property
    def num_prunable(self) -> int:
        return sum(1 for l in self.layers for c in l.cold_experts if c.ablation is not None and c.ablation.prunable)

    def to_dict(self) -> dict:
        total = self.num_experts * len(self.layers)
        return {"threshold": self.threshold, "tolerance": self.tolerance, "num_experts": self.num_experts,
                "top_k": self.top_k, "tokens": self.tokens, "documents": self.documents, "num_cold": self.num_cold,
                "cold_fraction": self.num_cold / total if total else 0.0,
                "expected_cold_uniform": sum(l.expected_cold_uniform for l in self.layers),
                "num_prunable": self.num_prunable, "nll_base": self.nll_base,
                "prune_all": None if self.prune_all is None else self.prune_all.to_dict(),
                "prune_all_random": [a.to_dict() for a in self.prune_all_random],
                "layers": [l.to_dict() for l in self.layers]}

    def tables(self) -> dict[str, list[dict]]:
        """Flat rows for CSV files: every expert's share, and every cold expert with its ablation."""
        shares = [{"layer": l.layer, "expert": e, "share": s, "uniform_share": l.uniform_share,
                   "cold": s < self.threshold} for l in self.layers for e, s in enumerate(l.shares)]
        cold = []
        for l in self.layers:
            for c in l.cold_experts:
                row = {"layer": l.layer, "expert": c.expert, "count": c.count, "share": c.share,
                       "share_low": c.share_ci.low, "share_high": c.share_ci.high,
                       "top_tokens": " ".join(r.key for r in c.top_tokens[:5])}
                if c.ablation is not None:
                    a = c.ablation.to_dict()
                    row.update(delta_nll=a["delta_nll"], ci_low=a["ci_low"], ci_high=a["ci_high"], prunable=a["prunable"])
                cold.append(row)
        return {"shares": shares, "cold_experts": cold}


def _key_index(keys: np.ndarray) -> tuple[np.ndarray, int]:
    """(index of each row's key int64 [t], number of distinct keys), computed once per trace."""
    _, inverse = np.unique(np.asarray(keys), return_inverse=True)
    return inverse.reshape(-1), int(inverse.max()) + 1 if inverse.size else 0


def _rows_sharing_a_key(hit: np.ndarray, inverse: np.ndarray, n_keys: int) -> np.ndarray:
    """bool [t]: rows whose key occurs in some ``hit`` row (the others have no routed token, so the enrichment
    table, which lists keys with at least one, is the same on these rows alone; a cold expert's are few)."""
    return np.bincount(inverse[hit], minlength=n_keys)[inverse] > 0


def _gini(x: np.ndarray) -> float:
    x = np.sort(np.asarray(x, dtype=np.float64))
    n = len(x)
    if n == 0 or x.sum() <= 0:
        return 0.0
    return float((2 * np.arange(1, n + 1) - n - 1) @ x / (n * x.sum()))


class _LossMeter:
    """Per-token held-out NLL of the trace's first documents, once without an edit, then per ablation set."""

    def __init__(self, model, trace, max_documents: int, max_tokens: int, tolerance: float, n_boot: int, seed: int):
        from lazarus_core.analysis.loss_comparison import document_nll
        from lazarus_core.routing import find_moe_layers

        self.model, self.tolerance, self.n_boot, self.seed = model, tolerance, n_boot, seed
        self.info = find_moe_layers(model)
        self.docs = _doc_windows(trace, max_documents, max_tokens)
        self._nll = document_nll
        base = self._per_doc()
        self.groups = np.concatenate([np.full(len(b), i) for i, b in enumerate(base)]) if base else np.zeros(0)
        self.base = np.concatenate(base) if base else np.zeros(0)
        if self.base.size == 0:
            raise ValueError("the trace's documents are too short to measure a loss (each needs two tokens)")
        self.documents = sum(1 for b in base if len(b))

    def _per_doc(self) -> list[np.ndarray]:
        return [np.concatenate(self._nll(self.model, windows, info=self.info)) for windows in self.docs]

    def can_ablate(self, layer: int, n: int) -> bool:
        moe = self.info.layers[layer]
        return moe.num_experts - n >= moe.top_k

    def ablate(self, experts: dict[int, list[int]]) -> Ablation:
        from lazarus_core.routing import ablate_experts

        with contextlib.ExitStack() as stack:
            for layer, es in experts.items():
                if es:
                    stack.enter_context(ablate_experts(self.model, [int(e) for e in es], [layer]))
            delta = np.concatenate(self._per_doc()) - self.base
        ci = bootstrap_mean_ci(delta, self.groups, n_boot=self.n_boot, seed=self.seed)
        return Ablation({int(l): sorted(int(e) for e in es) for l, es in experts.items()}, ci,
                        bool(ci.high <= self.tolerance), int(delta.size), self.documents)


def cold_experts(trace, *, layers: list[int] | None = None, threshold: float | None = None,
                 tolerance: float = DEFAULT_TOLERANCE, model=None, tokenizer=None, classifier=None,
                 view: str = "semantic", top: int = 5, min_count: int = 2, contexts: int = 3, context_width: int = 8,
                 loss_documents: int = 16, loss_tokens: int = 4096, baseline_draws: int = 2, seed: int = 0,
                 n_boot: int = 2000, progress: Callable[[str], None] | None = None) -> ColdExperts:
    """Find each layer's cold experts, what triggers them, and what ablating them costs against random non-cold experts.

    Parameters
    ----------
    trace : lazarus_core.routing.Trace
        The routing of a corpus (held-out documents); logits enable ``top_logit_contexts``.
    layers : list of int, optional
        Captured layers to analyse (default all).
    threshold : float, optional
        Cold: share of the layer's routing slots (``n_e / (t k)``) strictly below this. Default
        :func:`default_threshold`, ``1 / (4 E)``: a quarter of the uniform share.
    tolerance : float
        A cold expert is prunable when the upper end of its ablation's 95% interval over documents is
        at most this loss increase (nats/token).
    model : nn.Module, optional
        The model the trace was captured from; enables every ablation.
    tokenizer, classifier : optional
        Name the trigger tokens and label trigrams.
    view : {"semantic", "structural"}
    top, min_count : int
        Rows of the token / trigram tables and fewest occurrences for a row.
    contexts, context_width : int
        Highest-logit contexts per cold expert and their left context in tokens.
    loss_documents, loss_tokens : int
        Size of the held-out loss measurement (the trace's first documents).
    baseline_draws : int
        Random non-cold sets ablated per layer (and for the whole model) as the control.
    seed, n_boot : int
    progress : callable, optional
        Called with a short description before each ablation.

    Returns
    -------
    ColdExperts

    Raises
    ------
    ValueError
        A layer not in the trace (names ``--layers``) or a threshold outside (0, 1].
    """
    chosen = sorted(trace.layers) if layers is None else list(layers)
    bad = [l for l in chosen if l not in trace.layers]
    if bad:
        raise ValueError(f"--layers {','.join(map(str, bad))} is not in the trace: its layers are {sorted(trace.layers)}")
    E, k = trace.num_experts, trace.top_k
    threshold = default_threshold(E) if threshold is None else float(threshold)
    if not 0 < threshold <= 1:
        raise ValueError(f"--threshold must be in (0, 1] (a share of the routing slots), got {threshold}")
    token_ids, doc_ids = np.asarray(trace.token_ids), np.asarray(trace.doc_ids)
    t = len(token_ids)
    decoder = None
    if tokenizer is not None:
        from lazarus_core.tokens import PieceDecoder

        decoder = PieceDecoder(tokenizer)
    name_token = (lambda i: repr(decoder.text(i))[1:-1]) if decoder is not None else str
    trigram_ids = None
    if tokenizer is not None and classifier is not None:
        from lazarus_core.trigram.labels import label_tokens

        labels = label_tokens(token_ids, doc_ids, np.asarray(trace.positions), tokenizer, classifier)
        trigram_ids = labels.trigrams(view)
    token_index = _key_index(token_ids)
    trigram_index = None if trigram_ids is None else _key_index(trigram_ids)

    out_layers = []
    for layer in chosen:
        lt = trace.layer(layer)
        ids = np.asarray(lt.topk_ids)
        counts, shares = activation_shares(ids, E)
        nz = shares[shares > 0]
        eff = float(np.exp(-(nz * np.log(nz)).sum())) if nz.size else 0.0
        layer_res = LayerColdExperts(layer, t, [float(s) for s in shares], 1.0 / E, eff, _gini(shares),
                                     expected_cold_uniform(t, E, k, threshold))
        logits = None if lt.logits is None else np.asarray(lt.logits)
        for e in np.argsort(shares, kind="stable"):
            if shares[e] >= threshold:
                break
            e = int(e)
            hit = (ids == e).any(1)
            n_hit = int(hit.sum())
            tok_ci = wilson_interval(n_hit, t)
            share_ci = Interval(tok_ci.estimate / k, tok_ci.low / k, tok_ci.high / k, tok_ci.level, "wilson", t)
            share_layer = n_hit / t
            cold = ColdExpert(e, int(counts[e]), float(shares[e]), share_ci)
            if n_hit:
                rows = _rows_sharing_a_key(hit, *token_index)
                cold.top_tokens = _enrichment(token_ids[rows], hit[rows], share_layer, name_token, min_count=min_count,
                                              top=top)
                if trigram_ids is not None:
                    from lazarus_core.tokens import trigram_name

                    rows = _rows_sharing_a_key(hit, *trigram_index)
                    cold.top_trigrams = _enrichment(trigram_ids[rows], hit[rows], share_layer, trigram_name,
                                                    min_count=min_count, top=top)
            if logits is not None:
                col = logits[:, e].astype(np.float32)
                cold.logit_mean = float(col.mean())
                best = np.argpartition(-col, min(contexts, t - 1))[:contexts] if t > contexts else np.arange(t)
                best = best[np.argsort(-col[best], kind="stable")]
                cold.top_logit_contexts = []
                for r in best:
                    tok, ctx = _context(decoder, token_ids, doc_ids, int(r), context_width)
                    cold.top_logit_contexts.append(LogitContext(int(r), int(doc_ids[r]), float(col[r]),
                                                                int((logits[r].astype(np.float32) > col[r]).sum()),
                                                                bool(hit[r]), tok, ctx))
            layer_res.cold_experts.append(cold)
        out_layers.append(layer_res)

    result = ColdExperts(threshold, float(tolerance), E, k, t, int(len(np.unique(doc_ids))) if t else 0, out_layers)
    if model is None or result.num_cold == 0:
        return result
    meter = _LossMeter(model, trace, loss_documents, loss_tokens, tolerance, n_boot, seed)
    result.nll_base = float(meter.base.mean())
    rng = np.random.default_rng(seed)
    say = progress or (lambda _msg: None)
    prune, prune_random_sets = {}, [dict() for _ in range(baseline_draws)]
    for lr in out_layers:
        cold_ids = [c.expert for c in lr.cold_experts]
        if not cold_ids:
            continue
        if not meter.can_ablate(lr.layer, 1):
            lr.skipped = f"ablating one expert would leave fewer than k = {k} experts"
            continue
        for c in lr.cold_experts:
            say(f"layer {lr.layer}: ablating E{c.expert}")
            c.ablation = meter.ablate({lr.layer: [c.expert]})
        warm = [e for e in range(E) if e not in cold_ids]
        if len(cold_ids) > 1:
            for d in range(baseline_draws):
                pick = [int(rng.choice(warm))]
                say(f"layer {lr.layer}: ablating one random non-cold expert (draw {d + 1})")
                lr.random_single.append(meter.ablate({lr.layer: pick}))
        if not meter.can_ablate(lr.layer, len(cold_ids)):
            lr.skipped = (f"ablating all {len(cold_ids)} cold experts would leave fewer than k = {k} experts")
            continue
        prune[lr.layer] = cold_ids
        say(f"layer {lr.layer}: ablating all {len(cold_ids)} cold experts")
        lr.all_cold = meter.ablate({lr.layer: cold_ids})
        if len(warm) < len(cold_ids):
            lr.skipped = f"only {len(warm)} non-cold experts: no random control of {len(cold_ids)}"
            continue
        for d in range(baseline_draws):
            pick = sorted(int(x) for x in rng.choice(warm, size=len(cold_ids), replace=False))
            prune_random_sets[d][lr.layer] = pick
            say(f"layer {lr.layer}: ablating {len(pick)} random non-cold experts (draw {d + 1})")
            lr.random_control.append(meter.ablate({lr.layer: pick}))
        if len(cold_ids) == 1:
            lr.random_single = list(lr.random_control)
    if prune:
        say("ablating every cold expert of the model")
        result.prune_all = meter.ablate(prune)
        for d, sets in enumerate(prune_random_sets):
            if sets and set(sets) == set(prune):
                say(f"ablating random non-cold experts in every layer (draw {d + 1})")
                result.prune_all_random.append(meter.ablate(sets))
    return result
