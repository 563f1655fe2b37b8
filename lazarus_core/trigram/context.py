"""How a token's routing depends on its context: occurrences of a token in a trace and their expert agreement."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class Occurrence:
    """One occurrence of the token: trace row, document, position in the document, and its trigram."""

    row: int
    doc: int
    position: int
    trigram: str
    context: str

    def to_dict(self) -> dict:
        return asdict(self)


def find_occurrences(trace, decoder, classifier, token: str, view: str = "semantic", width: int = 40) -> list[Occurrence]:
    """Every occurrence of the word or token ``token`` in a trace (the last piece of a multi-piece word).

    Parameters
    ----------
    trace : lazarus_core.routing.Trace
    decoder : lazarus_core.tokens.PieceDecoder
    classifier : lazarus_core.tokens.TokenClassifier
    token : str
        The word (``127``, ``as``) or exact token text (leading space ignored).
    view : str
    width : int
        Characters of context kept either side for display.
    """
    want = token.strip()
    out: list[Occurrence] = []
    doc_ids = trace.doc_ids
    token_ids = trace.token_ids
    cuts = np.flatnonzero(np.diff(doc_ids) != 0) + 1
    bounds = np.concatenate([[0], cuts, [len(doc_ids)]])
    for a, b in zip(bounds[:-1], bounds[1:]):
        types = decoder.classify_ids(classifier, token_ids[a:b])
        tri = types.trigrams(view)
        text_so_far = ""
        starts = []
        for t in types.tokens:
            starts.append(len(text_so_far))
            text_so_far += t
        for i, (word, piece) in enumerate(zip(types.words, types.tokens)):
            last_piece = (i + 1 == len(types.words) or types.words[i + 1] != word
                          or types.tokens[i + 1][:1].isspace())
            hit_word = word == want and last_piece
            if hit_word or (piece.strip() == want and word != want):
                left = text_so_far[max(0, starts[i] - width):starts[i]]
                right = text_so_far[starts[i] + len(piece):starts[i] + len(piece) + width]
                out.append(Occurrence(int(a + i), int(doc_ids[a]), i, tri[i],
                                      (left + "[" + piece.strip() + "]" + right).replace("\n", "⏎")))
    return out


def _mean_pairwise_jaccard(sets: np.ndarray, num_experts: int) -> float:
    """Mean Jaccard index over all pairs of rows of ``sets`` (int [n, k] expert ids)."""
    n = len(sets)
    if n < 2:
        return float("nan")
    onehot = np.zeros((n, num_experts), dtype=np.float64)
    np.put_along_axis(onehot, sets.astype(np.int64), 1.0, axis=1)
    inter = onehot @ onehot.T
    size = onehot.sum(1)
    union = size[:, None] + size[None, :] - inter
    iu = np.triu_indices(n, 1)
    return float((inter[iu] / union[iu]).mean())


@dataclass
class LayerContextDependence:
    """Routing of one token's occurrences at one layer.

    Attributes
    ----------
    distinct_primary : int
        Distinct primary experts over the occurrences.
    consistency : float
        Mean pairwise Jaccard of the occurrences' top-k sets.
    baseline : float
        The same for random token pairs of the trace (what "no token identity" gives).
    primary_by_token, primary_by_trigram : float
        Leave-one-out accuracy of predicting an occurrence's primary expert by the modal primary of the
        token's other occurrences, and of the other occurrences with the same trigram (how much the
        trigram context adds over the token alone).
    """

    layer: int
    occurrences: int
    distinct_primary: int
    consistency: float
    baseline: float
    primary_by_token: float
    primary_by_trigram: float
    primaries: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def context_dependence(topk_ids: np.ndarray, rows: list[int], trigrams: list[str], num_experts: int, *, layer: int,
                       baseline_pairs: int = 2000, seed: int = 0) -> LayerContextDependence:
    """Agreement of a token's routing over its occurrences at one layer, against random token pairs.

    Parameters
    ----------
    topk_ids : np.ndarray
        int [N, k] of the layer (whole trace).
    rows : list of int
        Trace rows of the occurrences.
    trigrams : list of str
        Trigram of each occurrence.
    """
    ids = np.asarray(topk_ids)
    sets = ids[rows]
    prim = sets[:, 0]
    rng = np.random.default_rng(seed)
    sample = ids[rng.integers(0, len(ids), min(len(ids), max(2, int(np.sqrt(2 * baseline_pairs)) + 1)))]
    n = len(rows)
    # Leave-one-out: predict each occurrence's primary expert from the OTHER occurrences, either all of
    # them (the token alone) or those with the same trigram (falling back to all when it has none).
    total = np.bincount(prim, minlength=num_experts)

    def loo_hits(counts: np.ndarray) -> int:
        # occurrences (counted per expert) whose expert is the argmax once they are left out
        hits = 0
        for e in np.flatnonzero(counts):
            rest = counts.copy()
            rest[e] -= 1
            if rest.sum() == 0:                       # alone in its group: fall back to the token's others
                rest = total.copy()
                rest[e] -= 1
            hits += int(counts[e]) * int(rest.sum() > 0 and rest.argmax() == e)
        return hits

    hit_token = loo_hits(total)
    tri_codes = np.unique(np.asarray(trigrams, dtype=object), return_inverse=True)[1] if n else np.zeros(0, int)
    hit_tri = sum(loo_hits(np.bincount(prim[tri_codes == g], minlength=num_experts)) for g in np.unique(tri_codes))
    return LayerContextDependence(int(layer), n, int(len(set(prim.tolist()))), _mean_pairwise_jaccard(sets, num_experts),
                                  _mean_pairwise_jaccard(sample, num_experts),
                                  hit_token / n if n else float("nan"), hit_tri / n if n else float("nan"),
                                  prim.tolist())
