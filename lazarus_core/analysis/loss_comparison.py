"""Next-token loss and KL of a model with and without a routing intervention, with a bootstrap interval over documents."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from lazarus_core.analysis.intervals import Interval, bootstrap_mean_ci
from lazarus_core.routing.locate import MoeModelInfo

DEFAULT_WINDOW = 512
MIN_BOOTSTRAP_DOCUMENTS = 5     # fewer documents: resample tokens (a bootstrap over 2-4 units is degenerate)


def intervention(model, edit, layers: Sequence[int] | None = None, *, info: MoeModelInfo | None = None):
    """Context manager applying a :class:`lazarus_core.routing.RoutingEdit` (a no-op when ``edit`` is None)."""
    from lazarus_core.routing import RoutingIntervention

    if edit is None:
        return contextlib.nullcontext()
    return RoutingIntervention(model, edit, layers, info=info)


def next_token_logprobs(model, ids: Sequence[int], edit=None, layers: Sequence[int] | None = None, *,
                        info: MoeModelInfo | None = None) -> np.ndarray:
    """Log-probabilities of the next token at each position of one sequence, teacher forced.

    Parameters
    ----------
    model : nn.Module
        A transformers MoE causal LM.
    ids : sequence of int
        Token ids [n].
    edit : RoutingEdit, optional
        Routing intervention active during the forward pass.
    layers : sequence of int, optional
        MoE layers the edit applies to (default all).
    info : MoeModelInfo, optional

    Returns
    -------
    np.ndarray
        float64 [n, V]; row i is the distribution of token i + 1.
    """
    import torch

    device = next(model.parameters()).device
    with intervention(model, edit, layers, info=info), torch.inference_mode():
        logits = model(input_ids=torch.tensor([list(ids)], device=device), use_cache=False).logits[0]
    return torch.log_softmax(logits.double(), -1).cpu().numpy()


def _windows(ids: Sequence[int], window: int) -> list[list[int]]:
    ids = list(ids)
    return [ids[i: i + window] for i in range(0, len(ids), window)]


def document_nll(model, token_id_lists: Sequence[Sequence[int]], edit=None, layers: Sequence[int] | None = None, *,
                 info: MoeModelInfo | None = None, window: int = DEFAULT_WINDOW) -> list[np.ndarray]:
    """Per-token negative log-likelihood of each document's own next tokens (teacher forcing).

    A document longer than ``window`` tokens is cut into windows that the model sees separately (as
    a capture does); the first token of each window has no prediction.

    Parameters
    ----------
    model : nn.Module
        A transformers MoE causal LM.
    token_id_lists : sequence of sequence of int
        One token-id list per document.
    edit : RoutingEdit, optional
        Routing intervention active during the forward passes.
    layers : sequence of int, optional
        MoE layers the edit applies to (default all).
    info : MoeModelInfo, optional
    window : int
        Longest sequence given to the model at once.

    Returns
    -------
    list of np.ndarray
        Per document float64 [n_predicted] NLL in nats (n_predicted = tokens minus one per window;
        empty for a one-token document).
    """
    return [_per_token(model, ids, edit, layers, info, window, with_base=False)[0] for ids in token_id_lists]


def _per_token(model, ids, edit, layers, info, window, *, with_base: bool):
    """Per predicted token of one document: NLL float64 [m] (with_base: [2, m], base then edited), KL [m], agreement bool [m]."""
    nll, kl, agree = [], [], []
    for w in _windows(ids, window):
        if len(w) < 2:
            continue
        tgt = np.asarray(w[1:])
        rows = np.arange(len(tgt))
        edited = next_token_logprobs(model, w, edit, layers, info=info)[:-1]
        nll.append(-edited[rows, tgt])
        if with_base:
            base = next_token_logprobs(model, w, None, None, info=info)[:-1]
            kl.append((np.exp(base) * (base - edited)).sum(-1))
            agree.append(base.argmax(1) == edited.argmax(1))
            nll[-1] = np.stack([-base[rows, tgt], nll[-1]])
    empty = np.zeros(0)
    if not with_base:
        return (np.concatenate(nll) if nll else empty), None, None
    if not nll:
        return np.zeros((2, 0)), empty, np.zeros(0, bool)
    return np.concatenate(nll, axis=1), np.concatenate(kl), np.concatenate(agree)


def ratio_interval(delta: Interval) -> Interval:
    """The perplexity ratio's interval from the loss delta's: ``exp`` of the estimate and bounds.

    ``exp(mean NLL delta)`` is exactly ``perplexity_edit / perplexity_base``; ``exp`` is monotone, so
    the percentile bootstrap interval of the delta maps onto the ratio's (1 = no change).
    """
    return Interval(float(np.exp(delta.estimate)), float(np.exp(delta.low)), float(np.exp(delta.high)), delta.level,
                    delta.method, delta.n_units)


@dataclass
class DocumentDelta:
    """One document's loss change under an intervention, with a bootstrap interval over its tokens.

    Attributes
    ----------
    document : int
        Index of the document in the input.
    tokens : int
        Predicted tokens.
    nll_base, nll_edit, delta_nll : float
        Mean NLL (nats/token) without and with the edit, and the difference (baseline 0).
    delta_nll_ci : Interval
        Bootstrap interval of ``delta_nll`` over the document's tokens.
    includes_zero : bool
        ``delta_nll_ci`` covers 0.
    perplexity_ratio_ci : Interval
        ``exp`` of ``delta_nll_ci`` (1 = no change).
    """

    document: int
    tokens: int
    nll_base: float
    nll_edit: float
    delta_nll: float
    delta_nll_ci: Interval
    includes_zero: bool
    perplexity_ratio_ci: Interval

    def to_dict(self) -> dict:
        d = asdict(self)
        d["delta_nll_ci"] = self.delta_nll_ci.to_dict()
        d["perplexity_ratio_ci"] = self.perplexity_ratio_ci.to_dict()
        return d


@dataclass
class LossComparison:
    """Next-token loss of a set of documents with and without an intervention.

    Attributes
    ----------
    edit : dict
        The intervention (``RoutingEdit.to_dict()``; empty for none).
    layers : list of int or None
        Layers it applied to (None: all MoE layers).
    tokens : int
        Predicted tokens.
    documents : int
        Documents with at least one predicted token.
    nll_base, nll_edit : float
        Mean negative log-likelihood (nats/token) of the documents' own next tokens.
    delta_nll : float
        ``nll_edit - nll_base`` (the baseline is 0: no change).
    delta_nll_ci : Interval
        Bootstrap interval of ``delta_nll`` over documents (over tokens when there are fewer than
        ``MIN_BOOTSTRAP_DOCUMENTS``).
    includes_zero : bool
        ``delta_nll_ci`` covers 0: the change is not distinguishable from none.
    perplexity_ratio : float
        ``exp(delta_nll)`` = perplexity with the edit / without (1 = no change).
    perplexity_ratio_ci : Interval
        ``exp`` of ``delta_nll_ci``'s estimate and bounds.
    kl : float
        Mean KL(base || edited) of the next-token distributions (nats; baseline 0).
    kl_ci : Interval
        Bootstrap interval of ``kl`` (same units as ``delta_nll_ci``).
    top1_agreement : float
        Share of positions where both predict the same most likely token (baseline 1).
    top1_agreement_ci : Interval
        Bootstrap interval of ``top1_agreement``.
    per_document : list of DocumentDelta or None
        Each document's delta with an interval over its tokens (when asked for).
    """

    edit: dict
    layers: list[int] | None
    tokens: int
    nll_base: float
    nll_edit: float
    delta_nll: float
    perplexity_ratio: float
    kl: float
    top1_agreement: float
    documents: int = 0
    delta_nll_ci: Interval | None = None
    includes_zero: bool = True
    perplexity_ratio_ci: Interval | None = None
    kl_ci: Interval | None = None
    top1_agreement_ci: Interval | None = None
    per_document: list[DocumentDelta] | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("delta_nll_ci", "perplexity_ratio_ci", "kl_ci", "top1_agreement_ci"):
            value = getattr(self, key)
            d[key] = value.to_dict() if value is not None else None
        d["per_document"] = [x.to_dict() for x in self.per_document] if self.per_document is not None else None
        return d


def loss_comparison(model, token_id_lists: Sequence[Sequence[int]], edit, layers: Sequence[int] | None = None, *,
                    info: MoeModelInfo | None = None, window: int = DEFAULT_WINDOW, n_boot: int = 2000,
                    level: float = 0.95, seed: int = 0, per_document: bool = False) -> LossComparison:
    """Compare the documents' next-token loss with and without ``edit`` (teacher forcing).

    Parameters
    ----------
    model : nn.Module
        A transformers MoE causal LM.
    token_id_lists : sequence of sequence of int
        One token-id list per document (prompt).
    edit : RoutingEdit or None
        The intervention (None: compares the model with itself, delta exactly 0).
    layers : sequence of int, optional
        MoE layers the edit applies to (default all).
    info : MoeModelInfo, optional
    window : int
        Longest sequence given to the model at once.
    n_boot, level, seed
        Bootstrap replicates, coverage and seed of the intervals: over documents, or over tokens when
        there are fewer than ``MIN_BOOTSTRAP_DOCUMENTS`` (5) documents with a prediction (a bootstrap
        over two to four units cannot give an interval; resampling tokens ignores their correlation
        within a document, the intervals' ``method`` says which was used).
    per_document : bool
        Also give each document's delta with a bootstrap interval over its tokens.

    Returns
    -------
    LossComparison

    Raises
    ------
    ValueError
        No document has two tokens.
    """
    nll, kls, agrees, groups = [], [], [], []
    for doc, ids in enumerate(token_id_lists):
        pair, kl, agree = _per_token(model, ids, edit, layers, info, window, with_base=True)
        if pair.shape[1] == 0:
            continue
        nll.append(pair)
        kls.append(kl)
        agrees.append(agree)
        groups.append(np.full(pair.shape[1], doc))
    if not nll:
        raise ValueError("the prompts are too short: each needs at least two tokens")
    pair, kl, agree, group = np.concatenate(nll, 1), np.concatenate(kls), np.concatenate(agrees), np.concatenate(groups)
    delta = pair[1] - pair[0]
    boot = dict(n_boot=n_boot, level=level, seed=seed)
    if len(nll) < MIN_BOOTSTRAP_DOCUMENTS:
        group = None                # tokens are the unit (documents too few to resample)
    ci = bootstrap_mean_ci(delta, group, **boot)
    docs = None
    if per_document:
        docs = []
        for p, g in zip(nll, groups):
            d_ci = bootstrap_mean_ci(p[1] - p[0], None, **boot)
            docs.append(DocumentDelta(int(g[0]), int(p.shape[1]), float(p[0].mean()), float(p[1].mean()),
                                      float((p[1] - p[0]).mean()), d_ci, d_ci.includes_zero, ratio_interval(d_ci)))
    nb, ne = float(pair[0].mean()), float(pair[1].mean())
    return LossComparison(edit.to_dict() if edit is not None else {}, list(layers) if layers is not None else None,
                          int(len(delta)), nb, ne, float(delta.mean()), float(np.exp(delta.mean())), float(kl.mean()),
                          float(agree.mean()), documents=len(nll), delta_nll_ci=ci, includes_zero=ci.includes_zero,
                          perplexity_ratio_ci=ratio_interval(ci), kl_ci=bootstrap_mean_ci(kl, group, **boot),
                          top1_agreement_ci=bootstrap_mean_ci(agree.astype(np.float64), group, **boot),
                          per_document=docs)


@dataclass
class Generation:
    """A greedy continuation and the routing at one layer of every token fed to the model.

    Attributes
    ----------
    text : str
        The decoded new tokens.
    new_ids : list of int
    topk_ids : np.ndarray
        int64 [n, k] at the recorded layer (prompt tokens first, then the fed-back new tokens).
    topk_weights : np.ndarray
        float32 [n, k].
    """

    text: str
    new_ids: list[int]
    topk_ids: np.ndarray
    topk_weights: np.ndarray

    def to_dict(self) -> dict:
        return {"text": self.text, "new_token_ids": self.new_ids, "topk_ids": self.topk_ids.tolist(),
                "topk_weights": self.topk_weights.tolist()}


def generate(model, tokenizer, ids: Sequence[int], max_new_tokens: int, layer: int, edit=None,
             layers: Sequence[int] | None = None, *, info: MoeModelInfo | None = None) -> Generation:
    """Greedy continuation of ``ids`` (with ``edit`` active), recording the routing at ``layer``.

    Parameters
    ----------
    model : nn.Module
    tokenizer : transformers tokenizer
        Decodes the new tokens; its pad (or eos) id pads.
    ids : sequence of int
        Prompt token ids [n].
    max_new_tokens : int
    layer : int
        MoE layer whose routing is recorded.
    edit : RoutingEdit, optional
    layers : sequence of int, optional
        MoE layers the edit applies to (default all).
    info : MoeModelInfo, optional

    Returns
    -------
    Generation
    """
    import torch

    from lazarus_core.routing.recorder import RoutingRecorder

    ids = list(ids)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with intervention(model, edit, layers, info=info), RoutingRecorder(model, [layer], info=info) as rec, \
            torch.inference_mode():
        out = model.generate(torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                             device=device), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        routed = rec.pop()[layer]
    new = out[0, len(ids):].tolist()
    return Generation(tokenizer.decode(new, skip_special_tokens=True), new, routed.topk_ids.cpu().numpy(),
                      routed.topk_weights.cpu().numpy())
