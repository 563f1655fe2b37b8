"""One expert's profile from a routing trace: load, tokens, trigrams, domains, weights, logits, co-activation, loss impact."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from lazarus_core.analysis.intervals import Interval, bootstrap_mean_ci, wilson_interval


@dataclass
class Enrichment:
    """How often the expert receives one kind of token (a token id, a trigram, a domain) against a baseline.

    Attributes
    ----------
    key : str
        What the row is about (token text, trigram name ``PREV→CUR→NEXT``, domain label).
    count : int
        Tokens of that kind.
    routed : int
        Of them, tokens with the expert in their top-k.
    share : Interval
        ``routed / count`` (Wilson interval, or a bootstrap over documents for domains).
    baseline : float
        The share expected without specialisation: the expert's share of all tokens of the layer
        (tokens, trigrams) or the uniform share k / E (domains).
    lift : float
        ``share / baseline``.
    lift_vs_type : float or None
        Trigrams only: share over the expert's share among tokens of the trigram's current type (beyond
        the token type itself, which fixes the middle of the trigram).
    """

    key: str
    count: int
    routed: int
    share: Interval
    baseline: float
    lift: float
    lift_vs_type: float | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["share"] = self.share.to_dict()
        return d


@dataclass
class LogitContext:
    """A corpus position where the expert's raw router logit is among the highest.

    Attributes
    ----------
    row : int
        Token index in the trace.
    doc : int
    logit : float
        The expert's raw router logit there.
    rank : int
        Rank of that logit among the layer's experts at this token (0 = highest).
    selected : bool
        The expert is in the token's top-k.
    token : str
    context : str
        Text around the token, the token in brackets.
    """

    row: int
    doc: int
    logit: float
    rank: int
    selected: bool
    token: str
    context: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CoActivation:
    """How often another expert shares a token's top-k with the profiled one.

    Attributes
    ----------
    expert : int
    count : int
        Tokens with both experts in their top-k.
    expected : float
        Expected count if the k experts of each token were k distinct picks made independently given
        the experts' loads: ``n * P(e and b)`` from the conditional-Poisson null of
        :func:`lazarus_core.trigram.stats.topk_pair_null` (exact for top-k without replacement; uniform
        routing gives ``n k (k - 1) / (E (E - 1))``, not ``n (k / E)^2``). Over b the expectations sum to
        the observed total ``n_e (k - 1)``.
    ratio : float
        ``count / expected``.
    share : Interval
        ``count / n_e`` with its Wilson interval (divide by ``expected / n_e`` for the ratio's).
    """

    expert: int
    count: int
    expected: float
    ratio: float
    share: Interval

    def to_dict(self) -> dict:
        d = asdict(self)
        d["share"] = self.share.to_dict()
        return d


@dataclass
class LossImpact:
    """Next-token loss change from ablating the expert at its layer, against ablating other experts.

    Attributes
    ----------
    documents, tokens : int
        Documents and predicted tokens the loss was measured on.
    nll_base : float
        Mean NLL without an intervention (nats/token).
    delta_nll : Interval
        Loss increase from ablating the expert, with a bootstrap interval over documents.
    includes_zero : bool
    baseline_experts : list of int
        The (seeded, random) other experts ablated for the baseline.
    baseline_deltas : list of float
        Their loss increases.
    baseline_mean : float
        Mean of ``baseline_deltas``: what ablating an arbitrary expert of the layer costs.
    rank_among_baseline : int
        How many of the baseline experts cost more than this one (0 = it costs the most).
    """

    documents: int
    tokens: int
    nll_base: float
    delta_nll: Interval
    includes_zero: bool
    baseline_experts: list[int]
    baseline_deltas: list[float]
    baseline_mean: float
    rank_among_baseline: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["delta_nll"] = self.delta_nll.to_dict()
        return d


@dataclass
class ExpertProfile:
    """One expert of one layer, described from a routing trace (see :func:`expert_profile`).

    Attributes
    ----------
    layer, expert, num_experts, top_k, tokens, documents : int
    load : Interval
        Share of tokens whose top-k holds the expert (Wilson interval).
    load_documents : Interval
        The same share with a bootstrap interval over documents (tokens of a document are not independent).
    uniform_load : float
        ``k / E``, the share under uniform routing.
    load_ratio : float
        ``load / uniform_load``.
    primary_share : Interval
        Share of tokens where it is the primary (slot 0) expert (Wilson); baseline ``1 / E``.
    mean_weight : Interval or None
        Mean mixing weight when selected (bootstrap over documents); None when never selected.
    mean_weight_layer : float
        Mean mixing weight of every selected slot of the layer (the baseline).
    top_tokens, top_trigrams, domains : list of Enrichment
    logit_mean : float or None
        The expert's mean raw router logit over the trace (baseline of ``top_logit_contexts``).
    top_logit_contexts : list of LogitContext or None
        None when the trace has no logits.
    coactivated : list of CoActivation
        Every other expert, highest ratio first.
    loss : LossImpact or None
        None when no model was given.
    """

    layer: int
    expert: int
    num_experts: int
    top_k: int
    tokens: int
    documents: int
    load: Interval
    load_documents: Interval
    uniform_load: float
    load_ratio: float
    primary_share: Interval
    uniform_primary_share: float
    mean_weight: Interval | None
    mean_weight_layer: float
    top_tokens: list[Enrichment] = field(default_factory=list)
    top_trigrams: list[Enrichment] = field(default_factory=list)
    domains: list[Enrichment] = field(default_factory=list)
    logit_mean: float | None = None
    top_logit_contexts: list[LogitContext] | None = None
    coactivated: list[CoActivation] = field(default_factory=list)
    loss: LossImpact | None = None

    def to_dict(self) -> dict:
        out = {}
        for k, v in self.__dict__.items():
            if isinstance(v, list):
                out[k] = [x.to_dict() for x in v]
            elif v is None or isinstance(v, (int, float, str)):
                out[k] = v
            else:
                out[k] = v.to_dict()
        return out

    def tables(self) -> dict[str, list[dict]]:
        """Flat rows per section, for CSV files."""
        def flat(rows):
            out = []
            for r in rows:
                d = r.to_dict()
                share = d.pop("share", None)
                if share:
                    d.update({"share": share["estimate"], "share_low": share["low"], "share_high": share["high"]})
                out.append(d)
            return out

        tables = {"tokens": flat(self.top_tokens), "trigrams": flat(self.top_trigrams), "domains": flat(self.domains),
                  "coactivation": flat(self.coactivated)}
        if self.top_logit_contexts is not None:
            tables["logit_contexts"] = [c.to_dict() for c in self.top_logit_contexts]
        return tables


def _selected(topk_ids: np.ndarray, expert: int) -> np.ndarray:
    """bool [t, k] slots holding the expert."""
    return np.asarray(topk_ids) == expert


def _enrichment(keys: np.ndarray, hit: np.ndarray, baseline: float, names, *, min_count: int, top: int,
                type_share: dict | None = None, type_of=None) -> list[Enrichment]:
    """Rows for the keys with at least ``min_count`` tokens, ranked by the lower end of the share's Wilson interval.

    Ranking by the interval's lower end (not the raw share) keeps a key seen twice, both times routed
    to the expert, from outranking one seen fifty times with a share of 0.9.
    """
    uniq, inv, counts = np.unique(keys, return_inverse=True, return_counts=True)
    routed = np.bincount(inv, weights=hit.astype(np.float64), minlength=len(uniq)).astype(np.int64)
    keep = np.flatnonzero((counts >= min_count) & (routed > 0))
    shares = {int(i): wilson_interval(int(routed[i]), int(counts[i])) for i in keep}
    order = sorted(shares, key=lambda i: (-shares[i].low, -counts[i]))[:top]
    rows = []
    for i in order:
        share = shares[i]
        lvt = None
        if type_share is not None:
            ts = type_share.get(int(type_of(int(uniq[i]))))
            lvt = float(share.estimate / ts) if ts else None
        rows.append(Enrichment(names(int(uniq[i])), int(counts[i]), int(routed[i]), share, baseline,
                               float(share.estimate / baseline) if baseline > 0 else float("nan"), lvt))
    return rows


def _context(decoder, token_ids: np.ndarray, doc_ids: np.ndarray, row: int, width: int) -> tuple[str, str]:
    doc = doc_ids[row]
    lo, hi = max(0, row - width), min(len(token_ids), row + 3)
    left = [i for i in range(lo, row) if doc_ids[i] == doc]
    right = [i for i in range(row + 1, hi) if doc_ids[i] == doc]
    text = (lambda i: decoder.text(int(token_ids[i]))) if decoder is not None else (lambda i: f" {int(token_ids[i])}")
    tok = text(row)
    ctx = "".join(text(i) for i in left) + "[" + tok.strip() + "]" + "".join(text(i) for i in right)
    return tok, ctx.replace("\n", "⏎")


def coactivation(topk_ids: np.ndarray, expert: int, num_experts: int) -> list[CoActivation]:
    """Co-selection counts of ``expert`` with every other expert, next to their independent-top-k expectation.

    Parameters
    ----------
    topk_ids : np.ndarray
        int [t, k] experts per token.
    expert : int
    num_experts : int

    Returns
    -------
    list of CoActivation
        One per other expert, highest ratio first (see :class:`CoActivation` for the expectation).
    """
    from lazarus_core.trigram.stats import topk_pair_null

    ids = np.asarray(topk_ids)
    t, k = ids.shape
    onehot = np.zeros((t, num_experts), dtype=bool)
    np.put_along_axis(onehot, ids.astype(np.int64), True, axis=1)
    has = onehot[:, expert]
    n_e = int(has.sum())
    with_e = onehot[has].sum(0)
    load = onehot.sum(0) / max(t, 1)
    pair = topk_pair_null(load, k) if t and k > 1 else np.zeros((num_experts, num_experts))
    rows = []
    for b in range(num_experts):
        if b == expert:
            continue
        expected = float(t * pair[expert, b])
        count = int(with_e[b])
        share = wilson_interval(count, n_e) if n_e else Interval(float("nan"), float("nan"), float("nan"), 0.95, "wilson", 0)
        rows.append(CoActivation(b, count, expected, float(count / expected) if expected > 0 else float("nan"), share))
    rows.sort(key=lambda r: -(r.ratio if np.isfinite(r.ratio) else -1.0))
    return rows


def _doc_windows(trace, max_documents: int, max_tokens: int) -> list[list[int]]:
    """Token ids of the trace's first documents, cut where positions restart (the windows the model saw)."""
    token_ids, doc_ids, positions = trace.token_ids, trace.doc_ids, trace.positions
    out, used = [], 0
    for doc in trace.document_ids()[:max_documents]:
        rows = np.flatnonzero(doc_ids == doc)
        if used >= max_tokens:
            break
        rows = rows[: max_tokens - used]
        used += len(rows)
        out.append((rows, positions[rows]))
    docs = []
    for rows, pos in out:
        cuts = np.flatnonzero(pos == 0)
        pieces = np.split(rows, cuts[cuts > 0])
        docs.append([token_ids[p].tolist() for p in pieces if len(p)])
    return docs


def loss_impact(model, trace, layer: int, expert: int, *, max_documents: int = 32, max_tokens: int = 4096,
                baseline_experts: int = 4, seed: int = 0, n_boot: int = 2000) -> LossImpact:
    """Loss change from ablating ``expert`` at ``layer`` over the trace's documents, vs ablating random others.

    Ablation uses :func:`lazarus_core.routing.ablate_experts` (the expert leaves the competition and the
    family's rule picks and weights the rest).

    Parameters
    ----------
    model : nn.Module
        The model the trace was captured from.
    trace : Trace
    layer, expert : int
    max_documents, max_tokens : int
        How much of the trace to run (the first documents).
    baseline_experts : int
        Other experts (seeded random choice) ablated for the baseline.
    seed, n_boot
        Seeds and bootstrap replicates.

    Returns
    -------
    LossImpact
    """
    from lazarus_core.analysis.loss_comparison import document_nll
    from lazarus_core.routing import ablate_experts

    docs = _doc_windows(trace, max_documents, max_tokens)

    def nll_per_doc() -> list[np.ndarray]:
        return [np.concatenate(document_nll(model, windows)) for windows in docs]

    base = nll_per_doc()
    with ablate_experts(model, [expert], [layer]):
        ablated = nll_per_doc()
    groups = np.concatenate([np.full(len(b), i) for i, b in enumerate(base)])
    delta = np.concatenate(ablated) - np.concatenate(base)
    if delta.size == 0:
        raise ValueError("the trace's documents are too short to measure a loss (each needs two tokens)")
    ci = bootstrap_mean_ci(delta, groups, n_boot=n_boot, seed=seed)
    rng = np.random.default_rng(seed)
    others = [e for e in range(trace.num_experts) if e != expert]
    chosen = sorted(rng.choice(others, size=min(baseline_experts, len(others)), replace=False).tolist())
    deltas = []
    base_flat = np.concatenate(base)
    for e in chosen:
        with ablate_experts(model, [e], [layer]):
            deltas.append(float((np.concatenate(nll_per_doc()) - base_flat).mean()))
    return LossImpact(sum(1 for b in base if len(b)), int(delta.size), float(base_flat.mean()), ci, ci.includes_zero,
                      chosen, deltas, float(np.mean(deltas)) if deltas else float("nan"),
                      int(sum(d > ci.estimate for d in deltas)))


def expert_profile(trace, layer: int, expert: int, *, tokenizer=None, classifier=None,
                   doc_labels: dict[int, str] | None = None, model=None, view: str = "semantic", top: int = 10,
                   min_count: int = 3, contexts: int = 5, context_width: int = 8, loss_documents: int = 32,
                   loss_tokens: int = 4096, baseline_experts: int = 4, seed: int = 0,
                   n_boot: int = 2000) -> ExpertProfile:
    """Describe one expert of one layer from a routing trace.

    Parameters
    ----------
    trace : lazarus_core.routing.Trace
        The routing (logits needed for ``top_logit_contexts``).
    layer : int
        Captured MoE layer (model layer index).
    expert : int
        Expert of that layer (0 <= expert < E).
    tokenizer : transformers tokenizer, optional
        Names tokens and, with ``classifier``, labels trigrams (without it tokens show as ids and
        there are no trigrams).
    classifier : lazarus_core.tokens.TokenClassifier, optional
    doc_labels : dict[int, str], optional
        Document id -> domain label (no domains without it).
    model : nn.Module, optional
        The model the trace was captured from; enables ``loss``.
    view : {"semantic", "structural"}
        Token-type view of the trigrams.
    top : int
        Rows of the token and trigram tables.
    min_count : int
        Fewest occurrences of a token id or trigram to be listed.
    contexts, context_width : int
        Highest-logit contexts shown and tokens of left context each.
    loss_documents, loss_tokens, baseline_experts : int
        Size of the loss measurement and number of other experts in its baseline.
    seed, n_boot : int

    Returns
    -------
    ExpertProfile

    Raises
    ------
    ValueError
        The layer was not captured (names ``--layer``) or the expert is out of range (``--expert``).
    """
    if layer not in trace.layers:
        raise ValueError(f"--layer {layer} is not in the trace: its layers are {sorted(trace.layers)}")
    E, k = trace.num_experts, trace.top_k
    if not 0 <= expert < E:
        raise ValueError(f"--expert {expert} is out of range: layer {layer} has {E} experts (0..{E - 1})")
    lt = trace.layer(layer)
    ids, weights = np.asarray(lt.topk_ids), np.asarray(lt.topk_weights)
    token_ids, doc_ids = np.asarray(trace.token_ids), np.asarray(trace.doc_ids)
    t = len(token_ids)
    slots = _selected(ids, expert)
    hit = slots.any(1)
    n_hit = int(hit.sum())
    load = wilson_interval(n_hit, t)
    load_docs = bootstrap_mean_ci(hit.astype(np.float64), doc_ids, n_boot=n_boot, seed=seed)
    uniform = k / E
    primary = wilson_interval(int(slots[:, 0].sum()), t)
    w_sel = (weights * slots).sum(1)
    mean_weight = (bootstrap_mean_ci(w_sel[hit], doc_ids[hit], n_boot=n_boot, seed=seed) if n_hit else None)

    decoder = None
    if tokenizer is not None:
        from lazarus_core.tokens import PieceDecoder

        decoder = PieceDecoder(tokenizer)
    name_token = (lambda i: repr(decoder.text(i))[1:-1]) if decoder is not None else str
    share_layer = n_hit / t
    tokens = _enrichment(token_ids, hit, share_layer, name_token, min_count=min_count, top=top)

    trigrams: list[Enrichment] = []
    if tokenizer is not None and classifier is not None:
        from lazarus_core.tokens import NUM_TYPES, trigram_name
        from lazarus_core.trigram.labels import label_tokens

        labels = label_tokens(token_ids, doc_ids, np.asarray(trace.positions), tokenizer, classifier)
        types = labels.types(view).astype(np.int64)
        tri = labels.trigrams(view)
        type_counts = np.bincount(types, minlength=NUM_TYPES)
        type_hits = np.bincount(types, weights=hit.astype(np.float64), minlength=NUM_TYPES)
        type_share = {i: type_hits[i] / type_counts[i] for i in range(NUM_TYPES) if type_counts[i]}
        trigrams = _enrichment(tri, hit, share_layer, trigram_name, min_count=min_count, top=top,
                               type_share=type_share, type_of=lambda tid: (tid // NUM_TYPES) % NUM_TYPES)

    domains: list[Enrichment] = []
    if doc_labels:
        label_of = np.array([doc_labels.get(int(d), "") for d in doc_ids], dtype=object)
        for lab in sorted({l for l in label_of if l}):
            mask = label_of == lab
            share = bootstrap_mean_ci(hit[mask].astype(np.float64), doc_ids[mask], n_boot=n_boot, seed=seed)
            domains.append(Enrichment(str(lab), int(mask.sum()), int(hit[mask].sum()), share, uniform,
                                      float(share.estimate / uniform)))
        domains.sort(key=lambda d: -d.lift)

    logit_mean = None
    top_ctx = None
    if lt.logits is not None:
        logits = np.asarray(lt.logits, dtype=np.float32)
        col = logits[:, expert]
        logit_mean = float(col.mean())
        best = np.argsort(-col, kind="stable")[:contexts]
        top_ctx = []
        for r in best:
            tok, ctx = _context(decoder, token_ids, doc_ids, int(r), context_width)
            top_ctx.append(LogitContext(int(r), int(doc_ids[r]), float(col[r]), int((logits[r] > col[r]).sum()),
                                        bool(hit[r]), tok, ctx))

    loss = None
    if model is not None:
        loss = loss_impact(model, trace, layer, expert, max_documents=loss_documents, max_tokens=loss_tokens,
                           baseline_experts=baseline_experts, seed=seed, n_boot=n_boot)

    return ExpertProfile(layer=layer, expert=expert, num_experts=E, top_k=k, tokens=t,
                         documents=int(len(np.unique(doc_ids))), load=load, load_documents=load_docs,
                         uniform_load=uniform, load_ratio=float(load.estimate / uniform), primary_share=primary,
                         uniform_primary_share=1.0 / E, mean_weight=mean_weight,
                         mean_weight_layer=float(weights.mean()), top_tokens=tokens, top_trigrams=trigrams,
                         domains=domains, logit_mean=logit_mean, top_logit_contexts=top_ctx,
                         coactivated=coactivation(ids, expert, E), loss=loss)
