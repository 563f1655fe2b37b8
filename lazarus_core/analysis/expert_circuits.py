"""Cross-layer expert circuits: chains of (layer, expert) a token follows over consecutive MoE layers, against independence."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from lazarus_core.analysis.intervals import Interval, wilson_interval

_CHAIN_IDS = 1 << 23      # chain ids per bincount call (memory: 32 MB of int32 ids)


# ----------------------------------------------------------------------------------------- counting
def _torch_ids(ids: np.ndarray):
    """int32 torch view of a [t, k] id array (copied only when it is not C-contiguous int32 and writable)."""
    import torch

    return torch.from_numpy(np.require(ids, np.int32, ["C", "W"]))


def pair_counts(a_ids: np.ndarray, b_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """Tokens with expert i in their top-k at one layer and expert j at the next.

    Parameters
    ----------
    a_ids, b_ids : np.ndarray
        int [t, k] top-k experts of the same t tokens at two layers (k distinct per row).
    num_experts : int

    Returns
    -------
    np.ndarray
        int64 [E, E]: ``counts[i, j] = #{tokens: i in top-k(a) and j in top-k(b)}``, one ``bincount``
        over the k^2 chain ids ``i * E + j`` of each token (in token chunks).
    """
    import torch

    E = num_experts
    t, k = np.shape(a_ids)
    total = torch.zeros(E * E, dtype=torch.int64)
    chunk = max(1, _CHAIN_IDS // max(k * k, 1))
    for s in range(0, t, chunk):
        a, b = _torch_ids(a_ids[s:s + chunk]), _torch_ids(b_ids[s:s + chunk])
        ids = torch.add((a * E)[:, :, None], b[:, None, :]).reshape(-1)
        total += torch.bincount(ids, minlength=E * E)
    return total.numpy().reshape(E, E)


def consecutive_pair_counts(layer_ids: list[np.ndarray], num_experts: int) -> list[np.ndarray]:
    """:func:`pair_counts` of every consecutive pair of layers: int64 [E, E] for layers (0, 1), (1, 2), ..."""
    return [pair_counts(layer_ids[i], layer_ids[i + 1], num_experts) for i in range(len(layer_ids) - 1)]


def triple_counts(a_ids: np.ndarray, b_ids: np.ndarray, c_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """Tokens with expert i at one layer, j at the next and l at the one after.

    Parameters
    ----------
    a_ids, b_ids, c_ids : np.ndarray
        int [t, k] top-k experts of the same tokens at three layers.
    num_experts : int

    Returns
    -------
    np.ndarray
        int64 [E, E, E], one ``bincount`` over the k^3 chain ids ``(i * E + j) * E + l`` of each token
        (in token chunks, so memory stays at a chunk's ids; the k^2 prefixes ``(i * E + j) * E`` are
        formed first, so the k^3 ids are written in one pass).
    """
    import torch

    E = num_experts
    t, k = np.shape(a_ids)
    total = torch.zeros(E ** 3, dtype=torch.int64)
    chunk = max(1, _CHAIN_IDS // max(k ** 3, 1))
    for s in range(0, t, chunk):
        a, b, c = (_torch_ids(x[s:s + chunk]) for x in (a_ids, b_ids, c_ids))
        prefix = torch.add((a * (E * E))[:, :, None], (b * E)[:, None, :]).reshape(len(a), -1, 1)
        ids = torch.add(prefix, c[:, None, :]).reshape(-1)
        total += torch.bincount(ids, minlength=E ** 3)
    return total.numpy().reshape(E, E, E)


def poisson_sf(count: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``P(X >= count)`` for ``X ~ Poisson(mean)``, element-wise (float64; 1 where count <= 0).

    It is the regularised lower incomplete gamma ``P(count, mean)`` (torch's ``gammainc``).
    """
    import torch

    count = np.asarray(count, dtype=np.float64)
    mean = np.asarray(mean, dtype=np.float64)
    out = np.ones(np.broadcast(count, mean).shape)
    live = count > 0
    if live.any():
        c = torch.from_numpy(np.ascontiguousarray(np.broadcast_to(count, out.shape)[live]))
        m = torch.from_numpy(np.ascontiguousarray(np.broadcast_to(mean, out.shape)[live]))
        p = torch.special.gammainc(c, m).numpy()
        out[live] = np.where(np.broadcast_to(mean, out.shape)[live] <= 0, 0.0, p)
    return out


@dataclass
class ChainTable:
    """Every chain of one window of consecutive layers: observed and expected counts, p-values.

    Attributes
    ----------
    layers : tuple of int
        The window's layers, in order.
    counts : np.ndarray
        int64 [E] * length: tokens that follow the chain.
    expected : np.ndarray
        float64, same shape: ``n * prod_h P(e_h in top-k at layer h)``.
    prefix : np.ndarray
        int64, same shape: tokens that follow the chain up to its last hop (the consistency denominator).
    last_load : np.ndarray
        float64 [E]: load of the last hop's experts (consistency under independence).
    markov : np.ndarray or None
        Length 3: ``c12[i, j] * c23[j, l] / n2(j)``, the count expected if the third hop depended only
        on the second (None for length 2).
    p : np.ndarray
        float64, same shape: Poisson upper tail of ``counts`` at ``expected``.
    """

    layers: tuple[int, ...]
    counts: np.ndarray
    expected: np.ndarray
    prefix: np.ndarray
    last_load: np.ndarray
    markov: np.ndarray | None
    p: np.ndarray


def chain_tables(layer_ids: list[np.ndarray], layers: list[int], num_experts: int, length: int) -> list[ChainTable]:
    """Observed and expected counts of every chain over each window of ``length`` consecutive layers.

    The null: a token's k experts at one layer are k distinct picks, and its picks at different layers
    are independent given each layer's loads ``pi_l(e)`` (the share of tokens holding e in their top-k).
    A chain takes one expert per layer, so its indicator is a product of one indicator per layer and
    ``E[count] = n * prod_h pi_h(e_h)`` exactly (without-replacement picks within a layer change the
    law of pairs inside a layer, not of one expert per layer). The p-value is the Poisson upper tail
    at that mean: under the permutation null (each layer's rows shuffled, loads kept) the count is
    hypergeometric, whose variance is below the Poisson's, so the test is conservative.

    Parameters
    ----------
    layer_ids : list of np.ndarray
        int [t, k] top-k experts of the same t tokens, one per layer, in layer order.
    layers : list of int
        Layer indices of ``layer_ids``.
    num_experts : int
    length : {2, 3}

    Returns
    -------
    list of ChainTable
        One per window ``layers[i : i + length]``.
    """
    if length not in (2, 3):
        raise ValueError(f"--length must be 2 or 3, got {length}")
    if len(layer_ids) < length:
        raise ValueError(f"--length {length} needs at least {length} MoE layers, got {len(layer_ids)}")
    E = num_experts
    t = len(layer_ids[0])
    loads = [np.bincount(np.asarray(ids).reshape(-1), minlength=E)[:E].astype(np.float64) for ids in layer_ids]
    pairs = consecutive_pair_counts(layer_ids, E)
    tables = []
    for i in range(len(layer_ids) - length + 1):
        pi = [loads[i + h] / max(t, 1) for h in range(length)]
        if length == 2:
            counts = pairs[i]
            expected = t * np.outer(pi[0], pi[1])
            prefix = np.broadcast_to(loads[i][:, None], counts.shape).astype(np.int64)
            markov = None
        else:
            counts = triple_counts(layer_ids[i], layer_ids[i + 1], layer_ids[i + 2], E)
            expected = t * pi[0][:, None, None] * pi[1][None, :, None] * pi[2][None, None, :]
            prefix = np.broadcast_to(pairs[i][:, :, None], counts.shape).astype(np.int64)
            n_mid = loads[i + 1]
            markov = pairs[i][:, :, None] * pairs[i + 1][None, :, :] / np.maximum(n_mid, 1)[None, :, None]
        tables.append(ChainTable(tuple(layers[i:i + length]), counts, expected, prefix, pi[-1], markov,
                                 poisson_sf(counts, expected)))
    return tables


def significant_chains(tables: list[ChainTable], alpha: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """Benjamini-Hochberg over every chain of every window; returns (number significant and over-represented, q per table)."""
    from lazarus_core.trigram.stats import benjamini_hochberg

    flat = np.concatenate([tb.p.reshape(-1) for tb in tables]) if tables else np.zeros(0)
    q = benjamini_hochberg(flat)
    out, start = [], 0
    n_sig = 0
    for tb in tables:
        size = tb.p.size
        qt = q[start:start + size].reshape(tb.p.shape)
        start += size
        n_sig += int(((qt < alpha) & (tb.counts > tb.expected)).sum())
        out.append(qt)
    return n_sig, out


def permute_rows(layer_ids: list[np.ndarray], seed: int) -> list[np.ndarray]:
    """Each layer's rows shuffled independently (loads kept, the alignment of a token across layers broken)."""
    rng = np.random.default_rng(seed)
    return [np.asarray(ids)[rng.permutation(len(ids))] for ids in layer_ids]


# ------------------------------------------------------------------------------------------ results
@dataclass
class Served:
    """What a chain's tokens are: one token type, domain or token, against its share among all tokens.

    Attributes
    ----------
    kind : {"type", "domain", "token"}
    key : str
    count : int
        Chain tokens of that kind.
    share : float
        ``count / chain tokens``.
    baseline : float
        Share of that kind among all tokens.
    lift : float
        ``share / baseline``.
    """

    kind: str
    key: str
    count: int
    share: float
    baseline: float
    lift: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Circuit:
    """One over-represented chain of (layer, expert) over consecutive MoE layers.

    Attributes
    ----------
    path : list of [layer, expert]
    count : int
        Tokens following the whole chain.
    expected : float
        Count expected under independence across layers given the loads (see :func:`chain_tables`).
    lift : float
        ``count / expected``.
    consistency : float
        P(last hop | the chain so far) = ``count / prefix``.
    consistency_ci : Interval
        Wilson interval of ``consistency``.
    consistency_baseline : float
        The same under independence: the last hop expert's load.
    p_value, q_value : float
        Poisson upper tail and its Benjamini-Hochberg q over every chain tested.
    markov_expected : float or None
        Length 3: the count expected if the last hop depended only on the middle one.
    serves : list of Served
        Token types, domains and tokens most over-represented among the chain's tokens.
    """

    path: list[list[int]]
    count: int
    expected: float
    lift: float
    consistency: float
    consistency_ci: Interval
    consistency_baseline: float
    p_value: float
    q_value: float
    markov_expected: float | None = None
    serves: list[Served] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("consistency_ci", "serves")}
        d["consistency_ci"] = self.consistency_ci.to_dict()
        d["serves"] = [s.to_dict() for s in self.serves]
        return d


@dataclass
class ExpertCircuits:
    """Result of :func:`expert_circuits`.

    Attributes
    ----------
    length : int
        Hops per chain.
    tokens, num_experts, top_k : int
    windows : list of list of int
        The consecutive-layer windows tested.
    tests : int
        Chains tested (``windows * E ** length``), the Benjamini-Hochberg family.
    alpha : float
        FDR level.
    significant : int
        Over-represented chains with ``q < alpha``.
    significant_permuted : int or None
        The same on the permuted control (each layer's rows shuffled: loads kept, alignment broken);
        a sound test finds almost none.
    circuits : list of Circuit
        Significant over-represented chains, by q then lift (at most ``top``).
    """

    length: int
    tokens: int
    num_experts: int
    top_k: int
    windows: list[list[int]]
    tests: int
    alpha: float
    significant: int
    significant_permuted: int | None
    circuits: list[Circuit]

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "circuits"}
        d["expected_false_discoveries"] = self.alpha * self.significant
        d["circuits"] = [c.to_dict() for c in self.circuits]
        return d

    def tables(self) -> dict[str, list[dict]]:
        """Flat rows for CSV files."""
        rows = []
        for c in self.circuits:
            d = c.to_dict()
            d["path"] = " -> ".join(f"L{l}E{e}" for l, e in c.path)
            ci = d.pop("consistency_ci")
            d.update(consistency_low=ci["low"], consistency_high=ci["high"])
            d["serves"] = "; ".join(f"{s.kind}:{s.key} x{s.lift:.2f}" for s in c.serves)
            rows.append(d)
        return {"circuits": rows}


def _category_index(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct codes, index of each token's code int64 [t], share of each code among all tokens), once per kind."""
    uniq, inv = np.unique(codes, return_inverse=True)
    inv = inv.reshape(-1)
    return uniq, inv, np.bincount(inv, minlength=len(uniq)) / max(len(inv), 1)


def _serves(hit: np.ndarray, categories: dict[str, tuple], names: dict[str, callable], top: int,
            min_count: int) -> list[Served]:
    """Most over-represented categories among the tokens of ``hit`` (bool [t]) per kind, at most ``top`` each."""
    out = []
    n_hit = int(hit.sum())
    if n_hit == 0:
        return out
    for kind, (uniq, inv, base) in categories.items():
        got = np.bincount(inv[hit], minlength=len(uniq))
        share = got / n_hit
        lift = np.divide(share, base, out=np.zeros_like(share), where=base > 0)
        order = [i for i in np.argsort(-lift, kind="stable") if got[i] >= min_count][:top]
        out.extend(Served(kind, names[kind](uniq[i]), int(got[i]), float(share[i]), float(base[i]), float(lift[i]))
                   for i in order)
    return out


def expert_circuits(trace, *, layers: list[int] | None = None, length: int = 2, alpha: float = 0.05, top: int = 50,
                    min_count: int = 5, permuted_control: bool = True, seed: int = 0, tokenizer=None,
                    classifier=None, doc_labels: dict[int, str] | None = None, view: str = "semantic",
                    serves_top: int = 3, through: tuple[int, int] | None = None) -> ExpertCircuits:
    """Find chains of (layer, expert) that tokens follow over consecutive MoE layers more often than independence predicts.

    Parameters
    ----------
    trace : lazarus_core.routing.Trace
    layers : list of int, optional
        Captured MoE layers to chain, in order (default all); consecutive means consecutive in this list.
    length : {2, 3}
        Hops per chain.
    alpha : float
        False-discovery rate of the Benjamini-Hochberg selection.
    top : int
        Most circuits listed.
    min_count : int
        Fewest tokens for a chain to be listed (and for a category in ``serves``).
    permuted_control : bool
        Also run the test on the trace with each layer's rows permuted (``significant_permuted``).
    seed : int
        Seed of the permutation.
    tokenizer, classifier : optional
        Name tokens and label token types for ``serves``.
    doc_labels : dict[int, str], optional
        Document id -> domain label for ``serves``.
    view : {"semantic", "structural"}
    serves_top : int
        Categories listed per kind.
    through : (int, int), optional
        List only circuits with this (layer, expert) hop (the test still covers every chain).

    Returns
    -------
    ExpertCircuits

    Raises
    ------
    ValueError
        A layer is not in the trace, fewer layers than ``length``, a bad ``length`` / ``alpha``, or
        ``through`` names a layer not chained or an expert out of range.
    """
    chosen = sorted(trace.layers) if layers is None else list(layers)
    bad = [l for l in chosen if l not in trace.layers]
    if bad:
        raise ValueError(f"--layers {','.join(map(str, bad))} is not in the trace: its layers are {sorted(trace.layers)}")
    if not 0 < alpha < 1:
        raise ValueError(f"--alpha must be in (0, 1), got {alpha}")
    E, k = trace.num_experts, trace.top_k
    if through is not None:
        if through[0] not in chosen:
            raise ValueError(f"--through {through[0]}:{through[1]}: layer {through[0]} is not among the chained "
                             f"layers {chosen}")
        if not 0 <= through[1] < E:
            raise ValueError(f"--through {through[0]}:{through[1]}: expert {through[1]} is out of range "
                             f"(0..{E - 1})")
    ids = [np.asarray(trace.layer(l).topk_ids) for l in chosen]
    tables = chain_tables(ids, chosen, E, length)
    n_sig, qs = significant_chains(tables, alpha)
    n_perm = None
    if permuted_control:
        n_perm, _ = significant_chains(chain_tables(permute_rows(ids, seed), chosen, E, length), alpha)
    t = len(ids[0])

    candidates = []
    for w, (tb, q) in enumerate(zip(tables, qs)):
        keep = np.argwhere((q < alpha) & (tb.counts > tb.expected) & (tb.counts >= min_count))
        for idx in keep:
            idx = tuple(int(i) for i in idx)
            if through is not None and (through[0], through[1]) not in zip(tb.layers, idx):
                continue
            candidates.append((float(q[idx]), -float(tb.counts[idx] / tb.expected[idx]), w, idx))
    candidates.sort()
    categories, names = {}, {}
    if tokenizer is not None:
        from lazarus_core.tokens import PieceDecoder

        decoder = PieceDecoder(tokenizer)
        categories["token"] = _category_index(np.asarray(trace.token_ids))
        names["token"] = lambda i: repr(decoder.text(int(i)))[1:-1]
        if classifier is not None:
            from lazarus_core.tokens.types import ALL_TYPES
            from lazarus_core.trigram.labels import label_tokens

            labels = label_tokens(np.asarray(trace.token_ids), np.asarray(trace.doc_ids), np.asarray(trace.positions),
                                  tokenizer, classifier)
            categories["type"] = _category_index(labels.types(view).astype(np.int64))
            names["type"] = lambda i: ALL_TYPES[int(i)]
    if doc_labels:
        docs, doc_inv = np.unique(np.asarray(trace.doc_ids), return_inverse=True)
        doc_names = np.array([doc_labels.get(int(d), "") for d in docs], dtype=object)
        categories["domain"] = _category_index(doc_names[doc_inv.reshape(-1)].astype(str))
        names["domain"] = str
    circuits = []
    for q, neg_lift, w, idx in candidates[:top]:
        tb = tables[w]
        count, prefix = int(tb.counts[idx]), int(tb.prefix[idx])
        hit = np.ones(t, dtype=bool)
        if categories:
            for h, e in enumerate(idx):
                hit &= (ids[chosen.index(tb.layers[h])] == e).any(1)
        circuits.append(Circuit(
            path=[[int(l), int(e)] for l, e in zip(tb.layers, idx)], count=count, expected=float(tb.expected[idx]),
            lift=-neg_lift, consistency=count / prefix if prefix else float("nan"),
            consistency_ci=wilson_interval(count, prefix) if prefix else Interval(float("nan"), float("nan"),
                                                                                   float("nan"), 0.95, "wilson", 0),
            consistency_baseline=float(tb.last_load[idx[-1]]), p_value=float(tb.p[idx]), q_value=q,
            markov_expected=None if tb.markov is None else float(tb.markov[idx]),
            serves=_serves(hit, categories, names, serves_top, min_count) if categories else []))
    return ExpertCircuits(length, t, E, k, [list(tb.layers) for tb in tables], int(sum(tb.p.size for tb in tables)),
                          alpha, n_sig, n_perm, circuits)
