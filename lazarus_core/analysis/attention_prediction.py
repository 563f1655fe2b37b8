"""Can attention alone predict a layer's experts? Held-out linear probes vs trivial predictors, and the logit split."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from lazarus_core.analysis.attention_features import NORM_RULE, AttentionFeatures, LayerAttentionFeatures
from lazarus_core.analysis.intervals import Interval, bootstrap_mean_ci

SHARE_DEFINITION = ("share of the router-logit variance: the logits z = z_resid + z_attn (+ bias) are centred per token "
                    "over the experts (softmax/top-k see only differences between experts) and per expert over the "
                    "tokens; share_attn = sum cov(z_attn, z) / sum var(z) over (token, expert), share_resid likewise; "
                    "the two shares sum to 1 (each may fall outside [0, 1] when the parts cancel)")


# ------------------------------------------------------------------------------------------- probes
@dataclass
class LinearProbe:
    """A linear map from standardised features to class scores.

    Attributes
    ----------
    mean, scale : np.ndarray
        float32 [d], the training features' mean and standard deviation (floored).
    weight : np.ndarray
        float32 [d, C].
    bias : np.ndarray
        float32 [C].
    loss : str
        ``"softmax"`` (one distribution over C) or ``"sigmoid"`` (C independent labels).
    """

    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    loss: str

    def scores(self, x: np.ndarray) -> np.ndarray:
        """float32 [n, C] logits of ``x`` float [n, d]."""
        z = (np.asarray(x, np.float32) - self.mean) / self.scale
        return z @ self.weight + self.bias


def fit_linear_probe(x: np.ndarray, targets: np.ndarray, *, loss: str = "softmax", l2: float = 1e-3,
                     steps: int = 200, seed: int = 0) -> LinearProbe:
    """Fit a linear probe with L2 penalty by L-BFGS in torch (float32, CPU).

    Parameters
    ----------
    x : np.ndarray
        float [n, d] features (standardised inside with their own mean and std).
    targets : np.ndarray
        float [n, C]: for ``softmax``, a distribution per row (one-hot or soft); for ``sigmoid``, 0/1 labels.
    loss : {"softmax", "sigmoid"}
        Multinomial logistic regression (cross-entropy) or multi-label logistic regression (BCE).
    l2 : float
        Penalty ``l2 / 2 * ||W||^2`` added to the mean loss (the bias is not penalised).
    steps : int
        L-BFGS iterations.
    seed : int
        Seed of the (small random) initial weights.

    Returns
    -------
    LinearProbe
    """
    import torch

    if loss not in ("softmax", "sigmoid"):
        raise ValueError(f"loss must be 'softmax' or 'sigmoid', got {loss!r}")
    x = np.asarray(x, np.float32)
    t = torch.from_numpy(np.asarray(targets, np.float32))
    mean = x.mean(0)
    scale = np.maximum(x.std(0), 1e-6).astype(np.float32)
    z = torch.from_numpy((x - mean) / scale)
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(x.shape[1], t.shape[1], generator=gen) * 1e-3).requires_grad_()
    b = torch.zeros(t.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max(1, steps), history_size=20, tolerance_grad=1e-7,
                            tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = z @ w + b
        if loss == "softmax":
            data = -(t * torch.log_softmax(logits, 1)).sum(1).mean()
        else:
            data = torch.nn.functional.binary_cross_entropy_with_logits(logits, t, reduction="mean") * t.shape[1]
        total = data + 0.5 * l2 * (w * w).sum()
        total.backward()
        return total

    opt.step(closure)
    return LinearProbe(mean.astype(np.float32), scale, w.detach().numpy(), b.detach().numpy(), loss)


def split_documents(doc_ids: np.ndarray, test_fraction: float = 0.3, seed: int = 0) -> np.ndarray:
    """A seeded split of whole documents: True for tokens of held-out (test) documents.

    Documents are visited in a seeded random order and each is held out when the held-out tokens stay
    within ``test_fraction`` of all tokens (so one long document cannot take or leave the whole test
    set); at least one document stays on each side (the shortest is held out when none fits).

    Parameters
    ----------
    doc_ids : np.ndarray
        int [n], each token's document.
    test_fraction : float
        Share of the tokens held out, in (0, 1).
    seed : int

    Returns
    -------
    np.ndarray
        bool [n].

    Raises
    ------
    ValueError
        Fewer than two documents, or ``test_fraction`` outside (0, 1) (names ``--test-fraction``).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    docs, counts = np.unique(doc_ids, return_counts=True)
    if len(docs) < 2:
        raise ValueError(f"a held-out evaluation needs at least 2 documents, the data has {len(docs)}: "
                         "give more --num-tokens or a corpus with more documents")
    target = test_fraction * counts.sum()
    chosen, held = [], 0
    for i in np.random.default_rng(seed).permutation(len(docs)):
        if held + counts[i] <= target:
            chosen.append(i)
            held += counts[i]
    if not chosen:
        chosen = [int(np.argmin(counts))]
    return np.isin(doc_ids, docs[chosen[: len(docs) - 1]])


def topk_recall(scores: np.ndarray, topk_ids: np.ndarray, m: int | None = None) -> np.ndarray:
    """Per token, the share of its true experts among the ``m`` best-scored ones (default m = k).

    Parameters
    ----------
    scores : np.ndarray
        float [n, E] predicted scores.
    topk_ids : np.ndarray
        int [n, k] the experts used.

    Returns
    -------
    np.ndarray
        float64 [n] in [0, 1].
    """
    k = topk_ids.shape[1]
    m = k if m is None else m
    pred = np.argsort(-scores, axis=1, kind="stable")[:, :m]
    hit = (pred[:, :, None] == topk_ids[:, None, :]).any(1)
    return hit.sum(1) / k


def soft_targets(topk_ids: np.ndarray, topk_weights: np.ndarray, num_experts: int) -> np.ndarray:
    """float32 [n, E]: each token's top-k weights renormalised to sum 1 on its experts (uniform when they sum to 0)."""
    n, k = topk_ids.shape
    w = np.clip(np.asarray(topk_weights, np.float64), 0.0, None)
    s = w.sum(1, keepdims=True)
    w = np.where(s > 0, w / np.where(s > 0, s, 1.0), 1.0 / k)
    out = np.zeros((n, num_experts), np.float32)
    np.add.at(out, (np.repeat(np.arange(n), k), topk_ids.reshape(-1)), w.reshape(-1))
    return out


def majority_scores(train_ids: np.ndarray, n: int, num_experts: int) -> np.ndarray:
    """float64 [n, E]: the same scores for every token: the training primary counts, then the training loads.

    Its argmax is the most frequent primary expert; its top-k the most frequent primary then the most loaded.
    """
    primary = np.bincount(train_ids[:, 0], minlength=num_experts).astype(np.float64)
    score = primary * (len(train_ids) + 1) + np.bincount(train_ids.reshape(-1), minlength=num_experts)
    return np.broadcast_to(score, (n, num_experts))


def token_lookup_scores(train_tokens: np.ndarray, train_ids: np.ndarray, test_tokens: np.ndarray,
                        num_experts: int) -> np.ndarray:
    """float64 [n_test, E]: per token id, its training primary counts first, then its training loads.

    Argmax = the most frequent primary expert of that token id in the training documents; tokens never seen
    in training fall back to the majority scores.
    """
    n, k = train_ids.shape
    base = majority_scores(train_ids, 1, num_experts)[0]
    base_rank = np.argsort(np.argsort(base, kind="stable"), kind="stable") / num_experts      # in [0, 1)
    vocab, inverse = np.unique(train_tokens, return_inverse=True)
    primary = np.zeros((len(vocab), num_experts))
    np.add.at(primary, (inverse, train_ids[:, 0]), 1.0)
    load = np.zeros((len(vocab), num_experts))
    np.add.at(load, (np.repeat(inverse, k), train_ids.reshape(-1)), 1.0)
    table = primary + (load + base_rank[None, :]) / (k * n + 2.0)     # primary count, then load, then the layer's order
    pos = np.searchsorted(vocab, test_tokens)
    pos = np.clip(pos, 0, len(vocab) - 1)
    seen = vocab[pos] == test_tokens
    return np.where(seen[:, None], table[pos], base[None, :])


# ------------------------------------------------------------------------------------ decomposition
@dataclass
class LogitDecomposition:
    """The router logits of one layer split into the residual stream's and the attention output's parts.

    Attributes
    ----------
    attention_share, residual_share : Interval
        Covariance shares of the (expert- and token-centred) logit variance (see :data:`SHARE_DEFINITION`),
        intervals by a bootstrap over documents; they sum to 1.
    attention_alone, residual_alone, cross_term : float
        var(z_attn) / var(z), var(z_resid) / var(z), 2 cov(z_attn, z_resid) / var(z) (sum to 1).
    random_router_attention_share : Interval
        Baseline: the attention share under random routers with the same row norms (mean over draws, 2.5-97.5%
        range of the draws): what the magnitudes of a and r alone would give.
    attention_norm_share : float
        sum ||g a / rms||^2 / (sum ||g a / rms||^2 + sum ||g r / rms||^2): the attention part's share of the energy.
    reconstruction_error : float
        max |z_resid + z_attn + b - recorded logits| / max |recorded logits| (0 = an exact split).
    tokens : int
    norm_rule, definition : str
    """

    attention_share: Interval
    residual_share: Interval
    attention_alone: float
    residual_alone: float
    cross_term: float
    random_router_attention_share: Interval
    attention_norm_share: float
    reconstruction_error: float | None
    tokens: int
    norm_rule: str = NORM_RULE
    definition: str = SHARE_DEFINITION

    def to_dict(self) -> dict:
        return {"attention_share": self.attention_share.to_dict(), "residual_share": self.residual_share.to_dict(),
                "attention_alone": self.attention_alone, "residual_alone": self.residual_alone,
                "cross_term": self.cross_term,
                "random_router_attention_share": self.random_router_attention_share.to_dict(),
                "attention_norm_share": self.attention_norm_share, "reconstruction_error": self.reconstruction_error,
                "tokens": self.tokens, "norm_rule": self.norm_rule, "definition": self.definition}


def _centre(z: np.ndarray) -> np.ndarray:
    z = z - z.mean(1, keepdims=True)
    return z - z.mean(0, keepdims=True)


def _shares(zr: np.ndarray, za: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per token: var (sum over experts of z^2), cov(z_attn, z), cov(z_resid, z) of centred parts (float64 [n])."""
    zr, za = _centre(zr.astype(np.float64)), _centre(za.astype(np.float64))
    z = zr + za
    return (z * z).sum(1), (za * z).sum(1), (zr * z).sum(1)


def logit_decomposition(residual: np.ndarray, attention: np.ndarray, inv_rms: np.ndarray, norm_weight: np.ndarray,
                        router_weight: np.ndarray, router_bias: np.ndarray | None = None, *,
                        logits: np.ndarray | None = None, doc_ids: np.ndarray | None = None,
                        random_routers: int = 20, seed: int = 0) -> LogitDecomposition:
    """Split router logits into the residual input's and the attention output's contributions.

    With the post-attention RMSNorm linearised at each token (its 1/rms fixed, see
    :data:`~lazarus_core.analysis.attention_features.NORM_RULE`), ``z = W (g * (r + a) / rms) + b`` is exactly
    ``z_resid + z_attn + b`` with ``z_resid = W (g * r / rms)``, ``z_attn = W (g * a / rms)``.

    Parameters
    ----------
    residual, attention : np.ndarray
        float [n, H], r and a.
    inv_rms : np.ndarray
        float [n], 1 / rms(r + a).
    norm_weight : np.ndarray
        float [H], g.
    router_weight : np.ndarray
        float [E, H], W.
    router_bias : np.ndarray, optional
        float [E], b.
    logits : np.ndarray, optional
        float [n, E], the recorded logits (for ``reconstruction_error``).
    doc_ids : np.ndarray, optional
        int [n], documents (the bootstrap unit; tokens when None).
    random_routers : int
        Random-router draws of the baseline.
    seed : int

    Returns
    -------
    LogitDecomposition
    """
    s = np.asarray(inv_rms, np.float64)[:, None] * np.asarray(norm_weight, np.float64)[None, :]
    xr = np.asarray(residual, np.float64) * s
    xa = np.asarray(attention, np.float64) * s
    w = np.asarray(router_weight, np.float64)
    zr, za = xr @ w.T, xa @ w.T
    err = None
    if logits is not None:
        full = zr + za + (0.0 if router_bias is None else np.asarray(router_bias, np.float64))
        err = float(np.abs(full - logits).max() / max(float(np.abs(logits).max()), 1e-12))
    var, cov_a, cov_r = _shares(zr, za)
    ratio_a = np.divide(cov_a, var, out=np.zeros_like(var), where=var > 0)
    ratio_r = np.divide(cov_r, var, out=np.zeros_like(var), where=var > 0)
    a_share = bootstrap_mean_ci(ratio_a, doc_ids, weights=var, seed=seed)
    r_share = bootstrap_mean_ci(ratio_r, doc_ids, weights=var, seed=seed)
    zr_c, za_c = _centre(zr), _centre(za)
    total = float(var.sum()) or 1.0
    rng = np.random.default_rng(seed)
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    draws = []
    for _ in range(random_routers):
        g = rng.standard_normal(w.shape)
        g *= norms / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
        v, ca, _ = _shares(xr @ g.T, xa @ g.T)
        draws.append(float(ca.sum() / max(v.sum(), 1e-300)))
    draws = np.asarray(draws) if draws else np.array([np.nan])
    rand = Interval(float(np.mean(draws)), float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975)), 0.95,
                    "random-routers", int(random_routers))
    ea, er = float((xa * xa).sum()), float((xr * xr).sum())
    return LogitDecomposition(a_share, r_share, float((za_c ** 2).sum() / total), float((zr_c ** 2).sum() / total),
                              float(2 * (za_c * zr_c).sum() / total), rand, ea / max(ea + er, 1e-300), err, len(var))


# -------------------------------------------------------------------------------------- prediction
PREDICTORS = ("majority", "token_lookup", "attention_probe", "residual_probe", "router_input_probe")


@dataclass
class PredictorScore:
    """One predictor's held-out scores at one layer.

    Attributes
    ----------
    name : str
        ``majority`` (the most frequent primary / most loaded experts of the training documents),
        ``token_lookup`` (per token id, its most frequent training primary / experts), ``attention_probe``,
        ``residual_probe``, ``router_input_probe`` (linear probes on a, r, and h = the router's input).
    accuracy : Interval
        Share of held-out tokens whose primary (slot-0) expert is predicted; bootstrap over held-out documents.
    topk_recall : Interval
        Mean share of a token's k experts among the predictor's k best-scored ones.
    """

    name: str
    accuracy: Interval
    topk_recall: Interval

    def to_dict(self) -> dict:
        return {"name": self.name, "accuracy": self.accuracy.to_dict(), "topk_recall": self.topk_recall.to_dict()}


@dataclass
class LayerAttentionPrediction:
    """Attention-only routing prediction at one layer, its baselines and the logit decomposition.

    Attributes
    ----------
    layer, num_experts, top_k : int
    train_tokens, test_tokens, train_documents, test_documents : int
    predictors : list of PredictorScore
        In :data:`PREDICTORS` order (those that could be formed).
    attention_gain : Interval
        Paired accuracy difference, attention probe minus the better of majority and token lookup (per held-out
        token, bootstrap over documents): above 0 means attention beats the trivial predictors.
    best_baseline : str
        The baseline ``attention_gain`` is measured against.
    decomposition : LogitDecomposition or None
    """

    layer: int
    num_experts: int
    top_k: int
    train_tokens: int
    test_tokens: int
    train_documents: int
    test_documents: int
    predictors: list[PredictorScore]
    attention_gain: Interval
    best_baseline: str
    decomposition: LogitDecomposition | None = None

    def predictor(self, name: str) -> PredictorScore:
        return next(p for p in self.predictors if p.name == name)

    def to_dict(self) -> dict:
        return {"layer": self.layer, "num_experts": self.num_experts, "top_k": self.top_k,
                "train_tokens": self.train_tokens, "test_tokens": self.test_tokens,
                "train_documents": self.train_documents, "test_documents": self.test_documents,
                "predictors": {p.name: p.to_dict() for p in self.predictors},
                "attention_gain": self.attention_gain.to_dict(), "best_baseline": self.best_baseline,
                "decomposition": None if self.decomposition is None else self.decomposition.to_dict()}


def predict_layer(layer: int, attention: np.ndarray, topk_ids: np.ndarray, token_ids: np.ndarray, doc_ids: np.ndarray,
                  test: np.ndarray, *, num_experts: int, topk_weights: np.ndarray | None = None,
                  residual: np.ndarray | None = None, router_input: np.ndarray | None = None, l2: float = 1e-3,
                  steps: int = 200, seed: int = 0) -> LayerAttentionPrediction:
    """Held-out prediction of one layer's primary expert and top-k set from attention features and baselines.

    Parameters
    ----------
    layer : int
    attention : np.ndarray
        float [n, H], the attention output at each token (the probe's features).
    topk_ids : np.ndarray
        int [n, k], the experts used, sorted by weight (slot 0 = primary).
    token_ids, doc_ids : np.ndarray
        int [n] each.
    test : np.ndarray
        bool [n], held-out tokens (whole documents: :func:`split_documents`).
    num_experts : int
    topk_weights : np.ndarray, optional
        float [n, k]: probe targets are these weights renormalised over the k (default k, k-1, ..., 1 by slot, so
        that the primary stays the most likely).
    residual, router_input : np.ndarray, optional
        float [n, H]: features of the residual and router-input probes (skipped when None).
    l2, steps, seed
        Probe penalty, L-BFGS iterations and seed (:func:`fit_linear_probe`).

    Returns
    -------
    LayerAttentionPrediction
    """
    topk_ids = np.asarray(topk_ids, np.int64)
    test = np.asarray(test, bool)
    train = ~test
    if not train.any() or not test.any():
        raise ValueError("predict_layer needs tokens on both sides of the train/test split")
    k = topk_ids.shape[1]
    weights = (np.broadcast_to(np.arange(k, 0, -1, dtype=np.float32), topk_ids.shape) if topk_weights is None
               else topk_weights)
    targets = soft_targets(topk_ids[train], weights[train], num_experts)
    y, groups, n_test = topk_ids[test], doc_ids[test], int(test.sum())

    def score(name, s):
        correct = (np.argmax(s, 1) == y[:, 0]).astype(np.float64)
        return PredictorScore(name, bootstrap_mean_ci(correct, groups, seed=seed),
                              bootstrap_mean_ci(topk_recall(s, y), groups, seed=seed)), correct

    results, correct = [], {}
    for name, s in (("majority", majority_scores(topk_ids[train], n_test, num_experts)),
                    ("token_lookup", token_lookup_scores(token_ids[train], topk_ids[train], token_ids[test],
                                                         num_experts))):
        r, c = score(name, s)
        results.append(r)
        correct[name] = c
    for name, x in (("attention_probe", attention), ("residual_probe", residual), ("router_input_probe", router_input)):
        if x is None:
            continue
        x = np.asarray(x, np.float32)
        probe = fit_linear_probe(x[train], targets, loss="softmax", l2=l2, steps=steps, seed=seed)
        r, c = score(name, probe.scores(x[test]))
        results.append(r)
        correct[name] = c
    best = max(("majority", "token_lookup"), key=lambda n: correct[n].mean())
    gain = bootstrap_mean_ci(correct["attention_probe"] - correct[best], groups, seed=seed)
    return LayerAttentionPrediction(layer, num_experts, topk_ids.shape[1], int(train.sum()), n_test,
                                    len(np.unique(doc_ids[train])), len(np.unique(groups)), results, gain, best)


@dataclass
class AttentionPrediction:
    """Attention-based routing prediction at every analysed layer.

    Attributes
    ----------
    layers : list of LayerAttentionPrediction
    routing_agreement : float or None
        Share of tokens whose recomputed primary expert equals the trace's (1.0 = the same model and tokens).
    test_fraction, l2 : float
    steps, seed : int
    labels : str
        Where the expert labels come from (``trace`` or ``forward``).
    """

    layers: list[LayerAttentionPrediction]
    routing_agreement: float | None
    test_fraction: float
    l2: float
    steps: int
    seed: int
    labels: str = "forward"
    definitions: dict = field(default_factory=lambda: {"norm_rule": NORM_RULE, "share": SHARE_DEFINITION})

    def to_dict(self) -> dict:
        return {"layers": [l.to_dict() for l in self.layers], "routing_agreement": self.routing_agreement,
                "test_fraction": self.test_fraction, "l2": self.l2, "steps": self.steps, "seed": self.seed,
                "labels": self.labels, "definitions": self.definitions}

    def tables(self) -> dict[str, list[dict]]:
        """CSV tables: ``predictors`` (one row per layer and predictor) and ``decomposition`` (one per layer)."""
        pred, dec = [], []
        for l in self.layers:
            for p in l.predictors:
                pred.append({"layer": l.layer, "predictor": p.name, "accuracy": p.accuracy.estimate,
                             "accuracy_low": p.accuracy.low, "accuracy_high": p.accuracy.high,
                             "topk_recall": p.topk_recall.estimate, "topk_recall_low": p.topk_recall.low,
                             "topk_recall_high": p.topk_recall.high, "test_tokens": l.test_tokens})
            if l.decomposition is not None:
                d = l.decomposition
                dec.append({"layer": l.layer, "attention_share": d.attention_share.estimate,
                            "attention_share_low": d.attention_share.low, "attention_share_high": d.attention_share.high,
                            "residual_share": d.residual_share.estimate, "attention_alone": d.attention_alone,
                            "residual_alone": d.residual_alone, "cross_term": d.cross_term,
                            "random_router_attention_share": d.random_router_attention_share.estimate,
                            "attention_norm_share": d.attention_norm_share,
                            "reconstruction_error": d.reconstruction_error})
        return {"predictors": pred, "decomposition": dec}


def attention_prediction(features: AttentionFeatures, *, labels: dict[int, np.ndarray] | None = None,
                         label_weights: dict[int, np.ndarray] | None = None, test_fraction: float = 0.3,
                         l2: float = 1e-3, steps: int = 200, seed: int = 0, decompose: bool = True,
                         progress: Callable[[int], None] | None = None) -> AttentionPrediction:
    """Attention-only prediction of the experts at every layer of ``features`` (one seeded document split).

    Parameters
    ----------
    features : AttentionFeatures
        From :func:`~lazarus_core.analysis.attention_features.attention_features_for_trace`.
    labels : dict[int, np.ndarray], optional
        Layer -> int [t, k] experts to predict (e.g. the trace's at ``features.rows``); default the routing
        recorded in the same forward pass.
    label_weights : dict[int, np.ndarray], optional
        Layer -> float [t, k] their weights (the probe's soft targets).
    test_fraction, l2, steps, seed
        See :func:`split_documents` and :func:`fit_linear_probe`.
    decompose : bool
        Also split the router logits (:func:`logit_decomposition`).
    progress : callable, optional
        Called with the number of layers done.

    Returns
    -------
    AttentionPrediction
    """
    test = split_documents(features.doc_ids, test_fraction, seed)
    agreement = None
    if labels is not None:
        agree = [np.mean(labels[l][:, 0] == f.topk_ids[:, 0]) for l, f in features.layers.items()]
        agreement = float(np.mean(agree))
    out = []
    for i, (l, f) in enumerate(sorted(features.layers.items())):
        ids = f.topk_ids if labels is None else np.asarray(labels[l], np.int64)
        w = f.topk_weights if label_weights is None else label_weights[l]
        res = predict_layer(l, f.attention, ids, features.token_ids, features.doc_ids, test,
                            num_experts=f.router_weight.shape[0], topk_weights=w, residual=f.residual,
                            router_input=f.router_input, l2=l2, steps=steps, seed=seed)
        if decompose:
            res.decomposition = decompose_layer(f, features.doc_ids, seed=seed)
        out.append(res)
        if progress is not None:
            progress(i + 1)
    return AttentionPrediction(out, agreement, test_fraction, l2, steps, seed, "forward" if labels is None else "trace")


def decompose_layer(f: LayerAttentionFeatures, doc_ids: np.ndarray, *, seed: int = 0) -> LogitDecomposition:
    """:func:`logit_decomposition` of one layer's recorded features."""
    return logit_decomposition(f.residual, f.attention, f.inv_rms, f.norm_weight, f.router_weight, f.router_bias,
                               logits=f.logits, doc_ids=doc_ids, seed=seed)


def layers_per_pass(tokens: int, hidden: int, budget_bytes: int = 2 << 30) -> int:
    """How many layers' features fit in ``budget_bytes`` at once (at least 1).

    Recording holds four float32 [t, H] arrays per layer (r, a, the norm input and h).
    """
    return max(1, int(budget_bytes // max(1, 4 * 4 * tokens * hidden)))


__all__ = ["LinearProbe", "fit_linear_probe", "split_documents", "topk_recall", "soft_targets", "majority_scores",
           "token_lookup_scores", "LogitDecomposition", "logit_decomposition", "PredictorScore",
           "LayerAttentionPrediction", "predict_layer", "AttentionPrediction", "attention_prediction",
           "decompose_layer", "layers_per_pass", "PREDICTORS", "SHARE_DEFINITION"]
