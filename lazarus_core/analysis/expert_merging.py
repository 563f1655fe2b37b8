"""Can similar experts be merged? Similarity by weights, routing and outputs; real merges against random pairs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from lazarus_core.analysis.intervals import Interval, bootstrap_mean_ci
from lazarus_core.analysis.loss_comparison import next_token_logprobs

MEASURES = ("weights", "deltas", "routing", "outputs")


# ------------------------------------------------------------------------------------------ similarity
def _per_expert(p: torch.Tensor, num_experts: int) -> torch.Tensor | None:
    """``p`` as ``[E, ...]`` (a view): expert-leading ``[E, ...]``, or DBRX's fused ``[E*I, H]`` as ``[E, I, H]``;
    None when ``p`` is not split by expert."""
    if not p.shape or p.shape[0] % num_experts:
        return None
    return p if p.shape[0] == num_experts else p.view(num_experts, -1, *p.shape[1:])


def expert_parameters(experts: torch.nn.Module, num_experts: int, *, biases: bool = False) -> torch.Tensor:
    """Every expert's parameters of an experts module flattened into one row.

    Parameters
    ----------
    experts : nn.Module
        A transformers experts module whose parameters have the expert as leading dimension
        (``gate_up_proj`` [E, ...], ``down_proj`` [E, ...], optional ``*_bias`` [E, ...]; DBRX ``mlp.w1`` / ``v1`` /
        ``w2`` [E*I, H], expert e's rows e*I:(e+1)*I).
    num_experts : int
    biases : bool
        Include the bias vectors (default only the weight matrices).

    Returns
    -------
    torch.Tensor
        float64 [E, P].
    """
    parts = [p.detach().double().reshape(num_experts, -1) for name, p in experts.named_parameters()
             if _per_expert(p, num_experts) is not None and (biases or "bias" not in name)]
    if not parts:
        raise ValueError("the experts module has no per-expert parameters [E, ...]")
    return torch.cat(parts, dim=1)


def _cosine(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    unit = np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)
    return unit @ unit.T


def weight_similarity(experts: torch.nn.Module, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine of the experts' flattened weights, and of their deltas from the mean expert.

    Returns
    -------
    (np.ndarray float64 [E, E], np.ndarray float64 [E, E])
        Weights cosine, deltas cosine.
    """
    w = expert_parameters(experts, num_experts).numpy()
    return _cosine(w), _cosine(w - w.mean(0, keepdims=True))


def router_probabilities(logits: np.ndarray, scoring: str = "softmax") -> np.ndarray:
    """float64 [t, E] router scores from raw logits [t, E] (the family's softmax or sigmoid)."""
    x = np.asarray(logits, dtype=np.float64)
    if scoring == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    x = x - x.max(1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(1, keepdims=True)


def routing_similarity(probs: np.ndarray) -> np.ndarray:
    """Pearson correlation over tokens of the experts' router probabilities: float64 [E, E] (NaN for a constant one)."""
    p = np.asarray(probs, dtype=np.float64)
    c = p - p.mean(0, keepdims=True)
    sd = np.sqrt((c ** 2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (c.T @ c) / np.outer(sd, sd)


def output_similarity(outputs: torch.Tensor | np.ndarray) -> np.ndarray:
    """Linear CKA between every two experts' outputs on the same tokens (outputs float [s, E, H]) -> float64 [E, E]."""
    from lazarus_core.analysis.expert_similarity import linear_cka_matrix

    return linear_cka_matrix(outputs)


def _null(measure: str, data, pairs: list[tuple[int, int]], rng: np.random.Generator) -> np.ndarray:
    """The same similarity with one expert's vector (weights) or token rows (routing, outputs) permuted."""
    from lazarus_core.analysis.expert_similarity import linear_cka

    out = []
    for a, b in pairs:
        if measure in ("weights", "deltas"):
            x, y = data[a], data[b][rng.permutation(data.shape[1])]
            out.append(float(x @ y / max(np.linalg.norm(x) * np.linalg.norm(y), 1e-300)))
        elif measure == "routing":
            out.append(float(routing_similarity(np.stack([data[:, a], data[rng.permutation(len(data)), b]], 1))[0, 1]))
        else:
            out.append(linear_cka(data[:, a], data[rng.permutation(data.shape[0]), b]))
    return np.asarray(out)


@dataclass
class SimilarityDistribution:
    """Off-diagonal values of one similarity measure at one layer, next to its permutation null.

    Attributes
    ----------
    measure : str
        ``weights`` (cosine of the flattened weights), ``deltas`` (cosine of the differences from the mean
        expert), ``routing`` (correlation of router probabilities over tokens) or ``outputs`` (linear CKA).
    mean, median, max, q05, q95 : float
    null_q95 : float
        95th percentile of the same statistic with one expert's entries (weights, deltas) or token rows
        (routing, outputs) permuted: what an unrelated pair reaches.
    above_threshold : int
        Pairs with similarity >= the threshold.
    null_above_threshold : float
        Share of the null draws >= the threshold.
    pairs : int
    independent_mean : float
        Mean expected for experts with no shared structure: ``-1 / (E - 1)`` for ``deltas`` (differences
        from the mean of E independent vectors are negatively correlated), the null's mean otherwise.
    """

    measure: str
    mean: float
    median: float
    max: float
    q05: float
    q95: float
    null_q95: float
    above_threshold: int
    null_above_threshold: float
    pairs: int
    independent_mean: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MergeCandidate:
    """One expert pair of one layer and its similarities.

    Attributes
    ----------
    layer : int
    experts : list of int
    similarity : dict[str, float]
        Every available measure.
    above_threshold : bool
        The ranking measure is >= the threshold.
    """

    layer: int
    experts: list[int]
    similarity: dict[str, float]
    above_threshold: bool

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------ merging
class MergedExperts:
    """Context manager that really merges expert pairs inside a model, and restores it on exit.

    For each pair (a, b) at a layer:

    * expert a's parameters (weights and biases) become the frequency-weighted average
      ``(f_a * W_a + f_b * W_b) / (f_a + f_b)`` (``f`` = selection counts; equal weights when both are 0);
    * a routing hook (:func:`lazarus_core.routing.interventions.rewrite_routing`) replaces a's raw logit by
      ``logsumexp(l_a, l_b)`` and removes b from the competition, then re-routes with the family's rule (:func:`lazarus_core.routing.conventions.route`).
      For softmax families the merged expert's probability is then exactly ``p_a + p_b``; the router's
      weights cannot express a logsumexp, so the hook is the exact form. Its slot freed, the next best
      expert joins the top-k (k stays the model's).

    Expert b's parameters are left as they are (it is never selected); the bytes it held are what a
    merge saves. Only the changed rows are saved and put back on exit.

    Parameters
    ----------
    model : nn.Module
    merges : sequence of (layer, a, b)
        Disjoint pairs within each layer.
    frequencies : dict[(layer, expert), float], optional
    info : MoeModelInfo, optional
    """

    def __init__(self, model, merges: Sequence[tuple[int, int, int]], frequencies: dict | None = None, *, info=None):
        from lazarus_core.routing import find_moe_layers

        self.model, self.info = model, info or find_moe_layers(model)
        self.merges = [(int(l), int(a), int(b)) for l, a, b in merges]
        self.frequencies = frequencies or {}
        by_layer: dict[int, list[tuple[int, int]]] = {}
        for l, a, b in self.merges:
            if l not in self.info.layers:
                raise ValueError(f"layer {l} is not an MoE layer: they are {sorted(self.info.layers)}")
            E = self.info.layers[l].num_experts
            if not (0 <= a < E and 0 <= b < E) or a == b:
                raise ValueError(f"cannot merge experts {a} and {b} at layer {l} ({E} experts)")
            by_layer.setdefault(l, []).append((a, b))
        for l, ps in by_layer.items():
            used = [e for p in ps for e in p]
            if len(used) != len(set(used)):
                raise ValueError(f"the merges at layer {l} are not disjoint: {ps}")
            if self.info.layers[l].num_experts - len(ps) < self.info.layers[l].top_k:
                raise ValueError(f"{len(ps)} merges at layer {l} leave fewer experts than its top-k")
        self.by_layer = by_layer
        self._saved: list = []
        self._handles: list = []

    def __enter__(self) -> "MergedExperts":
        from lazarus_core.routing.interventions import rewrite_routing

        with torch.no_grad():
            for l, ps in self.by_layer.items():
                layer = self.info.layers[l]
                for name, param in layer.experts.named_parameters():
                    p = _per_expert(param, layer.num_experts)
                    if p is None:
                        continue
                    for a, b in ps:
                        fa, fb = float(self.frequencies.get((l, a), 0.0)), float(self.frequencies.get((l, b), 0.0))
                        wa = 0.5 if fa + fb <= 0 else fa / (fa + fb)
                        self._saved.append((p, a, p[a].clone()))
                        p[a] = (wa * p[a].double() + (1.0 - wa) * p[b].double()).to(p.dtype)
                self._handles.extend(rewrite_routing(layer, self._rewrite(layer, ps)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        with torch.no_grad():
            for p, a, old in reversed(self._saved):
                p[a] = old
        self._saved, self._handles = [], []

    def _rewrite(self, layer, pairs):
        from lazarus_core.routing.conventions import route

        keep = torch.tensor([a for a, _ in pairs])
        drop = torch.tensor([b for _, b in pairs])
        rule = self.info.rule

        def rewrite(logits, old_weights, old_ids):
            x = logits.reshape(-1, logits.shape[-1]).float().clone()
            x[:, keep] = torch.logaddexp(x[:, keep], x[:, drop])
            weights, ids = route(x, rule, layer.top_k, correction_bias=layer.correction_bias, exclude=drop.tolist())
            return weights.to(old_weights.dtype), ids.to(old_ids.dtype)

        return rewrite


@dataclass
class MergeResult:
    """Held-out loss after ``merges`` merges chosen greedily by similarity, next to random pairs.

    Attributes
    ----------
    merges : int
        Experts removed.
    bytes_saved : int
        Bytes of the removed experts as stored.
    pairs : list of [layer, a, b]
        The greedy pairs.
    delta_nll : Interval
        Loss change against the unmerged model, bootstrap over documents.
    kl : Interval
        Mean KL(original || merged) of the next-token distributions.
    top1_agreement : float
    random_delta_nll : Interval
        The same number of random disjoint pairs merged the same way (pooled over the repeats, each a
        different draw; the interval resamples documents).
    random_kl : Interval
    random_pairs : list of list of [layer, a, b]
    """

    merges: int
    bytes_saved: int
    pairs: list
    delta_nll: Interval
    kl: Interval
    top1_agreement: float
    random_delta_nll: Interval
    random_kl: Interval
    random_pairs: list

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("delta_nll", "kl", "random_delta_nll", "random_kl"):
            d[key] = getattr(self, key).to_dict()
        return d


@dataclass
class ExpertMerging:
    """The expert-merging report (see :func:`expert_merging`).

    Attributes
    ----------
    threshold : float
    measure : str
        The similarity the candidates are ranked and thresholded by.
    layers : list of int
    num_experts, top_k : int
    bytes_per_expert : dict[int, int]
        Per layer, bytes of one expert as stored.
    distributions : dict[int, list of SimilarityDistribution]
        Per layer, every available measure.
    candidates : list of MergeCandidate
        Every pair, most similar (by ``measure``) first.
    mergeable_share : float
        Share of pairs above the threshold.
    nll_base : float
    documents, tokens : int
    pareto : list of MergeResult
        One row per number of merges (1, 2, 4, ...).
    """

    threshold: float
    measure: str
    layers: list[int]
    num_experts: int
    top_k: int
    bytes_per_expert: dict[int, int]
    distributions: dict[int, list[SimilarityDistribution]]
    candidates: list[MergeCandidate]
    mergeable_share: float
    nll_base: float | None = None
    documents: int = 0
    tokens: int = 0
    pareto: list[MergeResult] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "measure": self.measure, "layers": self.layers,
                "num_experts": self.num_experts, "top_k": self.top_k,
                "bytes_per_expert": {str(k): v for k, v in self.bytes_per_expert.items()},
                "distributions": {str(l): [d.to_dict() for d in ds] for l, ds in self.distributions.items()},
                "candidates": [c.to_dict() for c in self.candidates], "mergeable_share": self.mergeable_share,
                "nll_base": self.nll_base, "documents": self.documents, "tokens": self.tokens,
                "pareto": [r.to_dict() for r in self.pareto]}

    def tables(self) -> dict[str, list[dict]]:
        """Flat rows for CSV files."""
        cands = [dict(layer=c.layer, a=c.experts[0], b=c.experts[1], above_threshold=c.above_threshold, **c.similarity)
                 for c in self.candidates]
        dists = [dict(layer=l, **d.to_dict()) for l, ds in self.distributions.items() for d in ds]
        pareto = []
        for r in self.pareto:
            pareto.append(dict(merges=r.merges, bytes_saved=r.bytes_saved, delta_nll=r.delta_nll.estimate,
                               delta_nll_low=r.delta_nll.low, delta_nll_high=r.delta_nll.high, kl=r.kl.estimate,
                               top1_agreement=r.top1_agreement, random_delta_nll=r.random_delta_nll.estimate,
                               random_delta_nll_low=r.random_delta_nll.low, random_delta_nll_high=r.random_delta_nll.high,
                               random_kl=r.random_kl.estimate))
        return {"candidates": cands, "distributions": dists, "pareto": pareto}


def merge_counts(max_merges: int) -> list[int]:
    """1, 2, 4, ... below ``max_merges``, then ``max_merges``."""
    out, n = [], 1
    while n < max_merges:
        out.append(n)
        n *= 2
    return out + ([max_merges] if max_merges >= 1 else [])


def _greedy_disjoint(pairs: list[tuple[int, int, int]], limit: dict[int, int], n: int) -> list[tuple[int, int, int]]:
    """The first ``n`` pairs of an ordered list, skipping any that reuses an expert or exceeds a layer's limit."""
    used, per_layer, out = set(), {}, []
    for l, a, b in pairs:
        if len(out) == n:
            break
        if (l, a) in used or (l, b) in used or per_layer.get(l, 0) >= limit[l]:
            continue
        out.append((l, a, b))
        used |= {(l, a), (l, b)}
        per_layer[l] = per_layer.get(l, 0) + 1
    return out


def _merged_scores(model, windows, base_lp, merges, freq, info):
    nll, kl, agree = [], [], []
    with MergedExperts(model, merges, freq, info=info):
        for w, b in zip(windows, base_lp):
            lp = next_token_logprobs(model, w, None, None, info=info)[:-1]
            tgt = np.asarray(w[1:])
            nll.append(-lp[np.arange(len(tgt)), tgt])
            kl.append((np.exp(b) * (b - lp)).sum(-1))
            agree.append(b.argmax(1) == lp.argmax(1))
    return np.concatenate(nll), np.concatenate(kl), np.concatenate(agree)


def _outputs(trace, layer: int, experts, E: int, max_rows: int, fit: np.ndarray) -> np.ndarray | None:
    """Every expert's output [s, E, H] at the trace's sampled rows of the fit documents (None without activations)."""
    if not getattr(trace, "has_hidden", False) and not getattr(trace, "has_all_expert_outputs", False):
        return None
    acts = trace.activations(layer)
    keep = np.flatnonzero(fit[np.asarray(acts.sample_index)])[:max_rows]
    if acts.all_expert_outputs is not None:
        return np.asarray(acts.all_expert_outputs[keep], dtype=np.float32)
    from lazarus_core.routing.expert_outputs import each_expert_output

    hidden = torch.as_tensor(np.asarray(acts.hidden[keep], dtype=np.float32))
    dtype = next(experts.parameters()).dtype
    with torch.inference_mode():
        return each_expert_output(experts, hidden.to(dtype), E).float().numpy()


def _distribution(measure: str, off: np.ndarray, null: np.ndarray, threshold: float, pairs: int,
                  independent: float) -> SimilarityDistribution:
    """Summary of one measure's finite off-diagonal values ``off`` next to its finite null draws."""
    nan = float("nan")
    q05, q95 = (float(q) for q in np.quantile(off, [0.05, 0.95])) if off.size else (nan, nan)
    return SimilarityDistribution(
        measure, float(off.mean()) if off.size else nan, float(np.median(off)) if off.size else nan,
        float(off.max()) if off.size else nan, q05, q95, float(np.quantile(null, 0.95)) if null.size else nan,
        int((off >= threshold).sum()), float((null >= threshold).mean()) if null.size else nan, int(pairs), independent)


def expert_merging(model, trace, documents: Sequence[Sequence[int]] | None = None, *, threshold: float = 0.8,
                   measure: str = "weights", layers: Sequence[int] | None = None, max_merges: int | None = None,
                   random_repeats: int = 2, bytes_per_expert: dict[int, int] | None = None,
                   max_output_rows: int = 512, null_draws: int = 64, exclude_documents: Sequence[int] = (), info=None,
                   n_boot: int = 2000, seed: int = 0,
                   progress: Callable[[], None] | None = None) -> ExpertMerging:
    """Expert similarity (weights, deltas, routing, outputs), merge candidates, and real merges vs random pairs.

    Parameters
    ----------
    model : nn.Module
        A transformers MoE causal LM (the trace's).
    trace : Trace
        Its routing (selection counts weight the merges; ``logits`` enable the routing measure; hidden
        states or all-expert outputs enable the output measure).
    documents : sequence of sequence of int, optional
        Held-out token ids per document for the loss (None: similarity only).
    threshold : float
        Candidates are the pairs whose ``measure`` is >= it.
    measure : {"weights", "deltas", "routing", "outputs"}
        Ranks the candidates and orders the greedy merges.
    layers : sequence of int, optional
        MoE layers (default the trace's layers).
    max_merges : int, optional
        Most merges in the Pareto table (default: every layer halved, never below its top-k).
    random_repeats : int
        Random pair sets per number of merges (the baseline).
    bytes_per_expert : dict[int, int], optional
        Bytes of one expert per layer as stored (default: its parameters in the loaded dtype).
    max_output_rows : int
        Rows of the output measure.
    null_draws : int
        Permutation draws per measure and layer.
    exclude_documents : sequence of int
        Trace documents left out of the similarity and the merge frequencies (the held-out loss
        documents, so that nothing the merges are chosen from is evaluated on).
    info : MoeModelInfo, optional
    n_boot, seed : int
    progress : callable, optional
        Called after each measured merge configuration.

    Returns
    -------
    ExpertMerging

    Raises
    ------
    ValueError
        An unknown measure, one the trace cannot give, or a layer that is not in the trace.
    """
    from lazarus_core.routing import find_moe_layers

    if measure not in MEASURES:
        raise ValueError(f"--measure must be one of {', '.join(MEASURES)}, got {measure!r}")
    info = info or find_moe_layers(model)
    layers = sorted(trace.layers) if layers is None else sorted(int(l) for l in layers)
    bad = [l for l in layers if l not in trace.layers or l not in info.layers]
    if bad:
        raise ValueError(f"--layers {bad} not available: the trace's MoE layers are {sorted(trace.layers)}")
    E, K = info.num_experts, info.top_k
    rng = np.random.default_rng(seed)
    distributions, candidates, freq = {}, [], {}
    bytes_per_expert = dict(bytes_per_expert or {})
    iu = np.triu_indices(E, 1)
    fit = ~np.isin(np.asarray(trace.doc_ids), np.asarray(list(exclude_documents), dtype=np.int64))
    if not fit.any():
        raise ValueError("every trace document is held out for the loss: nothing is left to measure similarity on")
    for l in layers:
        layer = info.layers[l]
        lt = trace.layer(l)
        counts = np.bincount(np.asarray(lt.topk_ids)[fit].reshape(-1).astype(np.int64), minlength=E)
        freq.update({(l, e): float(counts[e]) for e in range(E)})
        if l not in bytes_per_expert:
            bytes_per_expert[l] = int(sum(p.numel() * p.element_size() for p in layer.experts.parameters()
                                          if _per_expert(p, E) is not None) // E)
        sims, data = {}, {}
        sims["weights"], sims["deltas"] = weight_similarity(layer.experts, E)
        flat = expert_parameters(layer.experts, E).numpy()
        data["weights"], data["deltas"] = flat, flat - flat.mean(0, keepdims=True)
        if lt.logits is not None:
            probs = router_probabilities(np.asarray(lt.logits, dtype=np.float32)[fit], info.rule.scoring)
            sims["routing"], data["routing"] = routing_similarity(probs), probs
        outs = _outputs(trace, l, layer.experts, E, max_output_rows, fit)
        if outs is not None and len(outs) >= 4:
            sims["outputs"], data["outputs"] = output_similarity(outs), outs
        if measure not in sims:
            need = "--logits" if measure == "routing" else "--hidden-states (or --all-experts)"
            raise ValueError(f"--measure {measure} needs a trace captured with {need}")
        draws = [tuple(rng.choice(E, 2, replace=False)) for _ in range(null_draws)]
        rows = []
        for name, s in sims.items():
            off = s[iu]
            off = off[np.isfinite(off)]
            null = _null(name, data[name], draws, rng)
            null = null[np.isfinite(null)]
            independent = -1.0 / (E - 1) if name == "deltas" else (float(null.mean()) if null.size else float("nan"))
            rows.append(_distribution(name, off, null, threshold, len(iu[0]), independent))
        distributions[l] = rows
        for a, b in zip(*iu):
            sim = {name: float(s[a, b]) for name, s in sims.items()}
            candidates.append(MergeCandidate(l, [int(a), int(b)], sim, bool(sim[measure] >= threshold)))
    key = lambda c: -(c.similarity[measure] if np.isfinite(c.similarity[measure]) else -np.inf)  # noqa: E731
    candidates.sort(key=key)
    result = ExpertMerging(float(threshold), measure, layers, E, K, bytes_per_expert, distributions, candidates,
                           float(np.mean([c.above_threshold for c in candidates])) if candidates else 0.0)
    if documents is None:
        return result
    windows = [list(map(int, d)) for d in documents if len(d) >= 2]
    if not windows:
        raise ValueError("no held-out document has two tokens")
    limit = {l: min(E // 2, E - info.layers[l].top_k) for l in layers}
    cap = sum(limit.values())
    max_merges = cap if max_merges is None else min(int(max_merges), cap)
    base_lp = [next_token_logprobs(model, w, None, None, info=info)[:-1] for w in windows]
    groups = np.concatenate([np.full(len(w) - 1, i) for i, w in enumerate(windows)])
    base_nll = np.concatenate([-lp[np.arange(len(w) - 1), np.asarray(w[1:])] for lp, w in zip(base_lp, windows)])
    result.nll_base, result.documents, result.tokens = float(base_nll.mean()), len(windows), int(base_nll.size)
    ordered = [(c.layer, c.experts[0], c.experts[1]) for c in candidates]
    ci = lambda v, g=groups: bootstrap_mean_ci(v, g, n_boot=n_boot, seed=seed)  # noqa: E731
    for n in merge_counts(max_merges):
        greedy = _greedy_disjoint(ordered, limit, n)
        nll, kl, agree = _merged_scores(model, windows, base_lp, greedy, freq, info)
        if progress is not None:
            progress()
        r_delta, r_kl, r_groups, r_pairs = [], [], [], []
        for rep in range(random_repeats):
            shuffled = [ordered[i] for i in rng.permutation(len(ordered))]
            pick = _greedy_disjoint(shuffled, limit, n)
            r_nll, rk, _ = _merged_scores(model, windows, base_lp, pick, freq, info)
            r_delta.append(r_nll - base_nll)
            r_kl.append(rk)
            r_groups.append(groups)
            r_pairs.append([list(p) for p in pick])
            if progress is not None:
                progress()
        rg = np.concatenate(r_groups) if r_groups else groups
        rd = np.concatenate(r_delta) if r_delta else np.full_like(base_nll, np.nan)
        rkl = np.concatenate(r_kl) if r_kl else np.full_like(base_nll, np.nan)
        saved = int(sum(bytes_per_expert[l] for l, _, _ in greedy))
        result.pareto.append(MergeResult(len(greedy), saved, [list(p) for p in greedy], ci(nll - base_nll), ci(kl),
                                         float(agree.mean()), ci(rd, rg), ci(rkl, rg), r_pairs))
    return result
