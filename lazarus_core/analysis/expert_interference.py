"""Do a token's experts cooperate or interfere? Loss, KL and top-1 agreement at k = 1..K, and pair compatibility."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from lazarus_core.analysis.intervals import Interval, bootstrap_mean_ci
from lazarus_core.analysis.loss_comparison import DEFAULT_WINDOW, next_token_logprobs


# ------------------------------------------------------------------------------------------- documents
@dataclass
class Window:
    """One sequence the model sees: token ids and the trace rows they came from.

    Attributes
    ----------
    doc : int
        Document id.
    ids : list of int
        Token ids [n].
    rows : np.ndarray or None
        int64 [n], trace row of each token (None when the window was not cut from a trace).
    """

    doc: int
    ids: list[int]
    rows: np.ndarray | None = None


def trace_windows(trace, *, max_documents: int = 32, max_tokens: int = 4096, window: int = DEFAULT_WINDOW) -> list[Window]:
    """The trace's first documents cut where positions restart (the windows the capture ran), with their rows.

    Parameters
    ----------
    trace : lazarus_core.routing.Trace
    max_documents, max_tokens : int
        How much of the trace to use (the first documents, at most ``max_tokens`` tokens in all).
    window : int
        Longest window (a longer one is cut, so that a position is a router row).

    Returns
    -------
    list of Window
        Windows with at least two tokens.
    """
    doc_ids, positions, token_ids = np.asarray(trace.doc_ids), np.asarray(trace.positions), np.asarray(trace.token_ids)
    out, used = [], 0
    for doc in trace.document_ids()[:max_documents]:
        if used >= max_tokens:
            break
        rows = np.flatnonzero(doc_ids == doc)[: max_tokens - used]
        used += len(rows)
        cuts = np.flatnonzero(positions[rows] == 0)
        for piece in np.split(rows, cuts[cuts > 0]):
            for start in range(0, len(piece), window):
                part = piece[start: start + window]
                if len(part) >= 2:
                    out.append(Window(int(doc), token_ids[part].astype(np.int64).tolist(), part.astype(np.int64)))
    return out


def _as_windows(documents) -> list[Window]:
    if documents and isinstance(documents[0], Window):
        return list(documents)
    return [Window(i, list(map(int, ids))) for i, ids in enumerate(documents) if len(ids) >= 2]


@dataclass
class _Scored:
    """Per predicted token of every window: NLL float64 [m], KL vs base [m], agreement bool [m], doc [m]."""

    nll: np.ndarray
    kl: np.ndarray
    agree: np.ndarray


def _score(model, windows: list[Window], base: list[np.ndarray] | None, edits: list, layers, info) -> _Scored:
    """Run window i under ``edits[i]``; with ``base`` (log-probs per window) also KL and agreement."""
    nll, kl, agree = [], [], []
    for i, w in enumerate(windows):
        lp = next_token_logprobs(model, w.ids, edits[i], layers, info=info)[:-1]
        tgt = np.asarray(w.ids[1:])
        nll.append(-lp[np.arange(len(tgt)), tgt])
        if base is not None:
            b = base[i]
            kl.append((np.exp(b) * (b - lp)).sum(-1))
            agree.append(b.argmax(1) == lp.argmax(1))
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)  # noqa: E731
    return _Scored(cat(nll), cat(kl), cat(agree).astype(bool))


# ------------------------------------------------------------------------------------------- results
@dataclass
class TopKRow:
    """The model at ``k`` experts per token in ``scope`` against the model at its own K.

    Attributes
    ----------
    scope : str
        ``"all"`` (every MoE layer at once) or ``"layer N"``.
    layers : list of int
    k : int
    nll : float
        Mean next-token NLL at k (nats/token).
    delta_nll : Interval
        ``nll(k) - nll(K)`` with a bootstrap interval over documents (the baseline is 0: no change; the row
        k = K is the no-op, which also checks that the recomputed routing equals the model's own).
    step_delta_nll : Interval or None
        ``nll(k) - nll(k + 1)``: what the (k + 1)-th expert is worth (None at k = K).
    kl : Interval
        Mean KL(model at K || model at k) of the next-token distributions (nats), bootstrap over documents.
    top1_agreement : Interval
        Share of positions whose most likely next token is unchanged, bootstrap over documents.
    """

    scope: str
    layers: list[int]
    k: int
    nll: float
    delta_nll: Interval
    step_delta_nll: Interval | None
    kl: Interval
    top1_agreement: Interval

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("delta_nll", "step_delta_nll", "kl", "top1_agreement"):
            v = getattr(self, key)
            d[key] = v.to_dict() if v is not None else None
        return d


@dataclass
class Degraded:
    """A document or a position whose loss rises most at k (all layers).

    Attributes
    ----------
    k : int
    doc : int
    position : int or None
        Position in its window of the predicted token (None for a document row).
    delta_nll : float
        Loss change (mean over the document's tokens for a document row).
    tokens : int
        Predicted tokens (1 for a position).
    context : str
        Text (or ids) before the predicted token, the predicted token in brackets.
    """

    k: int
    doc: int
    position: int | None
    delta_nll: float
    tokens: int
    context: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PairCompatibility:
    """What one expert of a frequently co-selected pair adds when its partner is also there.

    Attributes
    ----------
    layer : int
    experts : list of int
        The pair ``[a, b]``.
    count : int
        Tokens (of the measured windows) where both are selected.
    expected : float
        Their co-selection count under independent top-k given the loads (the coactivation null).
    delta_nll : Interval
        Loss change when, at each of those tokens, the lower-weighted of the two is forced out (its mixing
        weight set to 0 at that layer and token; families that renormalise give its share to the other
        selected experts), bootstrap over documents.
    random_delta_nll : Interval
        The same for the random replacement: a random other selected expert (not a or b) forced out at the
        same tokens; with k = 2 there is none, so the lower-weighted selected expert at as many random
        other tokens of the same window.
    compatibility : Interval
        ``delta_nll - random_delta_nll`` per token, bootstrap over documents: > 0 the pair complements
        (losing a partner costs more than losing a random selected expert), < 0 it is redundant.
    control : str
        ``"other-selected-expert"`` or ``"random-tokens"`` (how the random replacement was drawn).
    """

    layer: int
    experts: list[int]
    count: int
    expected: float
    delta_nll: Interval
    random_delta_nll: Interval
    compatibility: Interval
    control: str

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("delta_nll", "random_delta_nll", "compatibility"):
            d[key] = getattr(self, key).to_dict()
        return d


@dataclass
class ExpertInterference:
    """The expert-interference report (see :func:`expert_interference`).

    Attributes
    ----------
    num_experts, top_k : int
    layers : list of int
    documents, tokens : int
        Documents and predicted tokens measured.
    nll_base : float
        Mean NLL of the model as it is (k = K).
    topk : list of TopKRow
        Every (scope, k).
    degraded_documents, degraded_positions : list of Degraded
        Largest loss increases at each k < K (all layers).
    pairs : list of PairCompatibility
    """

    num_experts: int
    top_k: int
    layers: list[int]
    documents: int
    tokens: int
    nll_base: float
    topk: list[TopKRow] = field(default_factory=list)
    degraded_documents: list[Degraded] = field(default_factory=list)
    degraded_positions: list[Degraded] = field(default_factory=list)
    pairs: list[PairCompatibility] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if not isinstance(v, list) or k == "layers"}
        for key in ("topk", "degraded_documents", "degraded_positions", "pairs"):
            out[key] = [x.to_dict() for x in getattr(self, key)]
        return out

    def tables(self) -> dict[str, list[dict]]:
        """Flat rows for CSV files."""
        def flat(d: dict) -> dict:
            out = {}
            for k, v in d.items():
                if isinstance(v, dict):
                    out.update({k: v["estimate"], f"{k}_low": v["low"], f"{k}_high": v["high"]})
                elif isinstance(v, list):
                    out[k] = " ".join(map(str, v))
                else:
                    out[k] = v
            return out

        return {"topk": [flat(r.to_dict()) for r in self.topk], "pairs": [flat(p.to_dict()) for p in self.pairs],
                "degraded_documents": [d.to_dict() for d in self.degraded_documents],
                "degraded_positions": [d.to_dict() for d in self.degraded_positions]}


# ------------------------------------------------------------------------------------------- analysis
def default_k_values(top_k: int) -> list[int]:
    """1..K when K <= 8, else the powers of two below K, K - 1 and K."""
    if top_k <= 8:
        return list(range(1, top_k + 1))
    ks = {2 ** i for i in range(int(np.log2(top_k)) + 1) if 2 ** i < top_k} | {top_k - 1, top_k}
    return sorted(ks)


def _context(ids: Sequence[int], pos: int, decode: Callable[[int], str] | None, width: int = 8) -> str:
    """Text of the window before predicted token ``pos + 1``, that token in brackets."""
    text = decode if decode is not None else (lambda i: f" {i}")
    left = "".join(text(int(i)) for i in ids[max(0, pos + 1 - width): pos + 1])
    return (left + "[" + text(int(ids[pos + 1])).strip() + "]").replace("\n", "⏎")


def _degraded(k, delta, groups, windows, decode, top) -> tuple[list[Degraded], list[Degraded]]:
    docs = []
    for d in np.unique(groups):
        m = groups == d
        docs.append(Degraded(k, int(d), None, float(delta[m].mean()), int(m.sum()), ""))
    docs.sort(key=lambda r: -r.delta_nll)
    for r in docs[:top]:
        first = next(w for w in windows if w.doc == r.doc)
        r.context = "".join((decode or (lambda i: f" {i}"))(int(i)) for i in first.ids[:24]).replace("\n", "⏎")
    offsets = np.cumsum([0] + [len(w.ids) - 1 for w in windows])
    best = np.argsort(-delta, kind="stable")[:top]
    positions = []
    for flat in best:
        wi = int(np.searchsorted(offsets, flat, side="right") - 1)
        pos = int(flat - offsets[wi])
        positions.append(Degraded(k, windows[wi].doc, pos, float(delta[flat]), 1, _context(windows[wi].ids, pos, decode)))
    return docs[:top], positions


def topk_sweep(model, documents, *, k_values: Sequence[int] | None = None, layers: Sequence[int] | None = None,
               per_layer: bool = True, info=None, decode: Callable[[int], str] | None = None, top: int = 5,
               n_boot: int = 2000, seed: int = 0, progress: Callable[[], None] | None = None):
    """Loss, KL and top-1 agreement of the final output at each k, every layer at once and one layer at a time.

    Each k is applied with :class:`lazarus_core.routing.RoutingEdit` ``top_k=k`` (what
    :func:`lazarus_core.routing.set_top_k` does), which re-routes with the family's own rule (OLMoE keeps
    the k softmax probabilities as they are; renormalising families share the whole mass over k).

    Parameters
    ----------
    model : nn.Module
    documents : sequence of Window or of sequence of int
        The held-out windows (token ids [n] each).
    k_values : sequence of int, optional
        Default :func:`default_k_values`; K itself is always measured (the no-op row).
    layers : sequence of int, optional
        MoE layers (default all); "all" applies k at every one of them.
    per_layer : bool
        Also one layer at a time.
    info : MoeModelInfo, optional
    decode : callable, optional
        Token id -> text, for the degraded inputs.
    top : int
        Degraded documents and positions listed per k.
    n_boot, seed : int
    progress : callable, optional
        Called after each (scope, k).

    Returns
    -------
    (list of TopKRow, list of Degraded, list of Degraded, nll_base float, tokens int, documents int)
    """
    from lazarus_core.routing import RoutingEdit, find_moe_layers

    info = info or find_moe_layers(model)
    layers = sorted(info.select(list(layers) if layers is not None else None))
    K = info.top_k
    ks = sorted({int(k) for k in (k_values or default_k_values(K))} | {K})
    bad = [k for k in ks if not 1 <= k <= K]
    if bad:
        raise ValueError(f"--k-values {bad} out of range: k must be between 1 and the model's top-k {K}")
    windows = _as_windows(documents)
    if not windows:
        raise ValueError("no document has two tokens to predict")
    base_lp = [next_token_logprobs(model, w.ids, None, None, info=info)[:-1] for w in windows]
    groups = np.concatenate([np.full(len(w.ids) - 1, w.doc) for w in windows])
    base_nll = np.concatenate([-lp[np.arange(len(w.ids) - 1), np.asarray(w.ids[1:])] for lp, w in zip(base_lp, windows)])
    scopes = [("all", layers)] + ([(f"layer {l}", [l]) for l in layers] if per_layer and len(layers) > 1 else [])
    rows, worst_docs, worst_pos = [], [], []
    ci = lambda v: bootstrap_mean_ci(v, groups, n_boot=n_boot, seed=seed)  # noqa: E731
    for name, scope in scopes:
        scored = {}
        for k in ks:
            scored[k] = _score(model, windows, base_lp, [RoutingEdit(top_k=k)] * len(windows), scope, info)
            if progress is not None:
                progress()
        for i, k in enumerate(ks):
            s = scored[k]
            step = ci(s.nll - scored[ks[i + 1]].nll) if i + 1 < len(ks) else None
            rows.append(TopKRow(name, list(scope), k, float(s.nll.mean()), ci(s.nll - base_nll), step, ci(s.kl),
                                ci(s.agree.astype(np.float64))))
            if name == "all" and k < K:
                d, p = _degraded(k, s.nll - base_nll, groups, windows, decode, top)
                worst_docs += d
                worst_pos += p
    return rows, worst_docs, worst_pos, float(base_nll.mean()), int(base_nll.size), int(len(np.unique(groups)))


def frequent_pairs(topk_ids: np.ndarray, num_experts: int, top: int) -> list[tuple[int, int, int, float]]:
    """The most often co-selected expert pairs of one layer, with their independent-top-k expectation.

    Parameters
    ----------
    topk_ids : np.ndarray
        int [t, k].
    num_experts : int
    top : int

    Returns
    -------
    list of (a, b, count, expected)
        a < b, most frequent first.
    """
    from lazarus_core.trigram.stats import topk_pair_null

    ids = np.asarray(topk_ids).astype(np.int64)
    t, k = ids.shape
    if k < 2 or t == 0:
        return []
    onehot = np.zeros((t, num_experts), dtype=np.float64)
    np.put_along_axis(onehot, ids, 1.0, axis=1)
    counts = onehot.T @ onehot
    expected = t * topk_pair_null(onehot.mean(0), k)
    a, b = np.triu_indices(num_experts, 1)
    order = np.argsort(-counts[a, b], kind="stable")[:top]
    return [(int(a[i]), int(b[i]), int(counts[a[i], b[i]]), float(expected[a[i], b[i]])) for i in order
            if counts[a[i], b[i]] > 0]


def pair_compatibility(model, trace, layer: int, windows: list[Window], *, pairs: int = 3, info=None,
                       base: list[np.ndarray] | None = None, n_boot: int = 2000, seed: int = 0,
                       progress: Callable[[], None] | None = None) -> list[PairCompatibility]:
    """Loss change from forcing one expert of a frequently co-selected pair out, next to a random replacement.

    See :class:`PairCompatibility` for the definition. The pair's tokens come from the trace's routing at
    ``layer`` (the trace must have been captured from ``model``); the edit is a
    :class:`lazarus_core.routing.interventions.WeightOverride` with value 0 restricted to those tokens'
    rows, so the selection of every other token is untouched.

    Parameters
    ----------
    model : nn.Module
    trace : Trace
    layer : int
    windows : list of Window
        From :func:`trace_windows` (rows needed).
    pairs : int
        How many of the most frequent pairs.
    info : MoeModelInfo, optional
    base : list of np.ndarray, optional
        Base next-token NLL per window (computed when None).
    n_boot, seed : int
    progress : callable, optional
        Called after each pair.

    Returns
    -------
    list of PairCompatibility
    """
    from lazarus_core.routing import RoutingEdit, find_moe_layers
    from lazarus_core.routing.interventions import WeightOverride

    info = info or find_moe_layers(model)
    lt = trace.layer(layer)
    ids_all, w_all = np.asarray(lt.topk_ids).astype(np.int64), np.asarray(lt.topk_weights)
    windows = [w for w in windows if w.rows is not None]
    rows_used = np.concatenate([w.rows for w in windows]) if windows else np.zeros(0, np.int64)
    k = ids_all.shape[1]
    if base is None:
        base = [(-next_token_logprobs(model, w.ids, None, None, info=info)[:-1][np.arange(len(w.ids) - 1),
                                                                              np.asarray(w.ids[1:])]) for w in windows]
    groups = np.concatenate([np.full(len(w.ids) - 1, w.doc) for w in windows]) if windows else np.zeros(0)
    base_flat = np.concatenate(base) if base else np.zeros(0)
    rng = np.random.default_rng(seed)
    out = []
    for a, b, count, expected in frequent_pairs(ids_all[rows_used], trace.num_experts, pairs):
        plan_pair, plan_ctrl = [], []
        for w in windows:
            ids, wts = ids_all[w.rows], w_all[w.rows]
            both = np.flatnonzero((ids == a).any(1) & (ids == b).any(1))
            weight_of = lambda rows, e: (wts[rows] * (ids[rows] == e)).sum(1)  # noqa: E731
            drop = np.where(weight_of(both, a) < weight_of(both, b), a, b)
            pair_edit = {e: tuple(both[drop == e].tolist()) for e in (a, b)}
            ctrl: dict[int, list[int]] = {}
            if k >= 3:
                for r in both:
                    others = [int(e) for e in ids[r] if e not in (a, b)]
                    ctrl.setdefault(int(rng.choice(others)), []).append(int(r))
            else:
                pool = np.setdiff1d(np.arange(len(w.ids)), both)
                take = rng.choice(pool, size=min(len(both), len(pool)), replace=False) if len(pool) else []
                for r in take:
                    ctrl.setdefault(int(ids[r, np.argmin(wts[r])]), []).append(int(r))
            plan_pair.append(pair_edit)
            plan_ctrl.append({e: tuple(rs) for e, rs in ctrl.items()})

        def edit_from(plans):
            return [RoutingEdit(weights=tuple(WeightOverride(e, 0.0, rows=rs) for e, rs in plan.items() if rs))
                    for plan in plans]

        d_pair = _score(model, windows, None, edit_from(plan_pair), [layer], info).nll - base_flat
        d_ctrl = _score(model, windows, None, edit_from(plan_ctrl), [layer], info).nll - base_flat
        ci = lambda v: bootstrap_mean_ci(v, groups, n_boot=n_boot, seed=seed)  # noqa: E731
        out.append(PairCompatibility(layer, [a, b], count, expected, ci(d_pair), ci(d_ctrl), ci(d_pair - d_ctrl),
                                     "other-selected-expert" if k >= 3 else "random-tokens"))
        if progress is not None:
            progress()
    return out


def expert_interference(model, documents, *, trace=None, k_values: Sequence[int] | None = None,
                        layers: Sequence[int] | None = None, per_layer: bool = True, pairs: int = 3,
                        pair_layers: Sequence[int] | None = None, info=None,
                        decode: Callable[[int], str] | None = None, top: int = 5, n_boot: int = 2000, seed: int = 0,
                        progress: Callable[[], None] | None = None) -> ExpertInterference:
    """Expert cooperation measured on the final output: the top-k sweep and pair compatibility.

    Parameters
    ----------
    model : nn.Module
        A transformers MoE causal LM.
    documents : sequence of Window or of sequence of int
        Held-out windows (:func:`trace_windows` of ``trace`` for pair compatibility).
    trace : Trace, optional
        The routing of those windows, captured from ``model`` (needed for ``pairs``).
    k_values, layers, per_layer
        See :func:`topk_sweep`.
    pairs : int
        Most frequent co-selected pairs per layer measured (0: none; needs ``trace``).
    pair_layers : sequence of int, optional
        Layers of the pair measurement (default ``layers``).
    info, decode, top, n_boot, seed, progress
        See :func:`topk_sweep`.

    Returns
    -------
    ExpertInterference
    """
    from lazarus_core.routing import find_moe_layers

    info = info or find_moe_layers(model)
    windows = _as_windows(documents)
    rows, worst_docs, worst_pos, nll_base, tokens, docs = topk_sweep(
        model, windows, k_values=k_values, layers=layers, per_layer=per_layer, info=info, decode=decode, top=top,
        n_boot=n_boot, seed=seed, progress=progress)
    chosen = sorted(info.select(list(layers) if layers is not None else None))
    result = ExpertInterference(info.num_experts, info.top_k, chosen, docs, tokens, nll_base, rows, worst_docs, worst_pos)
    if pairs and trace is not None and info.top_k >= 2:
        base = [(-next_token_logprobs(model, w.ids, None, None, info=info)[:-1][np.arange(len(w.ids) - 1),
                                                                              np.asarray(w.ids[1:])]) for w in windows]
        for layer in (pair_layers if pair_layers is not None else chosen):
            if layer in trace.layers:
                result.pairs += pair_compatibility(model, trace, layer, windows, pairs=pairs, info=info, base=base,
                                                   n_boot=n_boot, seed=seed, progress=progress)
    return result
