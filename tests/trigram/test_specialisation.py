"""Trigram ids and expert specialisation on hand-checked traces and on planted specialists."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lazarus_core.tokens import TYPE_ID, parse_trigram, trigram_name
from lazarus_core.trigram.labels import trigram_ids
from lazarus_core.trigram.specialisation import trigram_specialisation


def _ids(*names):
    return np.array([TYPE_ID[n] for n in names], dtype=np.int16)


def test_trigram_ids_use_sequence_edges():
    # two sequences the model saw: [NUM OP NUM] and [FUNC NOUN]
    tri = trigram_ids(_ids("NUM", "OP", "NUM", "FUNC", "NOUN"), np.array([0, 1, 2, 0, 1]))
    assert [trigram_name(t) for t in tri] == ["^→NUM→OP", "NUM→OP→NUM", "OP→NUM→$", "^→FUNC→NOUN", "FUNC→NOUN→$"]
    assert parse_trigram("NUM->OP->NUM") == tri[1]
    with pytest.raises(ValueError, match="unknown token type"):
        parse_trigram("NUM->XYZ->NUM")


def test_concentration_expected_and_p_value_by_hand():
    # 8 tokens, trigrams A A A A B B C C; 2 experts, k = 1.
    a, b, c = parse_trigram("NUM→OP→NUM"), parse_trigram("^→FUNC→NOUN"), parse_trigram("FUNC→NOUN→$")
    tri = np.array([a, a, a, a, b, b, c, c])
    ids = np.array([[0], [0], [0], [1], [1], [1], [1], [0]])
    rep = trigram_specialisation(tri, {3: ids}, 2, min_activations=1)
    e0, e1 = rep.layers[0].experts
    # expert 0: tokens A A A C -> top A, 3/4; layer share of A = 4/8
    assert e0.activations == 4 and e0.top_pattern == "NUM→OP→NUM" and e0.concentration == 0.75
    assert e0.expected == 0.5 and e0.lift == 1.5
    direct = sum(math.comb(4, x) * 0.5 ** 4 for x in (3, 4))              # P[Bin(4, .5) >= 3] = 5/16
    assert e0.p_value == pytest.approx(min(1.0, 3 * direct))              # Bonferroni over 3 trigrams
    # expert 1: tokens A B B C -> top B (2/4), layer share of B = 2/8
    assert e1.top_pattern == "^→FUNC→NOUN" and e1.concentration == 0.5 and e1.expected == 0.25
    assert [p.trigram for p in e1.top_patterns][0] == "^→FUNC→NOUN"
    assert rep.layers[0].layer == 3 and rep.num_trigrams == 3


def test_mutual_information_by_hand():
    a, b = parse_trigram("NUM→OP→NUM"), parse_trigram("^→FUNC→NOUN")
    tri = np.array([a, a, b, b])
    perfect = trigram_specialisation(tri, {0: np.array([[0], [0], [1], [1]])}, 2, min_activations=1).layers[0]
    none = trigram_specialisation(tri, {0: np.array([[0], [1], [0], [1]])}, 2, min_activations=1).layers[0]
    assert perfect.mutual_information_bits == pytest.approx(1.0) and perfect.normalized_mutual_information == pytest.approx(1.0)
    assert none.mutual_information_bits == pytest.approx(0.0, abs=1e-12)


def _planted(n=20000, e=16, k=2, seed=0):
    """Random routing except expert 5, which takes 90% of the tokens with trigram id 0 as its primary."""
    rng = np.random.default_rng(seed)
    tri = rng.integers(0, 40, n)
    ids = np.stack([rng.permutation(e)[:k] for _ in range(n)])
    hit = (tri == 0) & (rng.random(n) < 0.9)
    ids[hit, 0] = 5
    ids[hit, 1] = np.where(ids[hit, 1] == 5, 6, ids[hit, 1])
    return tri, ids


def test_planted_specialist_is_found_and_random_experts_are_not():
    tri, ids = _planted()
    rep = trigram_specialisation(tri, {0: ids}, 16)
    experts = rep.layers[0].experts
    assert experts[5].top_pattern == trigram_name(0) and experts[5].q_value < 1e-6 and experts[5].lift > 2
    # independent recomputation of expert 5's numbers
    mask = (ids == 5).any(1)
    assert experts[5].activations == mask.sum()
    assert experts[5].concentration == pytest.approx((tri[mask] == 0).mean())
    assert experts[5].expected == pytest.approx(np.bincount(tri[np.repeat(np.arange(len(tri)), 2)][ids.reshape(-1) >= 0])[0]
                                                / (2 * len(tri)))
    false_hits = [x.expert for x in experts if x.q_value < 0.05 and x.expert not in (5, 6)]
    assert len(false_hits) <= 1                                             # FDR 5% over 16 experts


def test_permutation_test_agrees_with_the_binomial_on_the_planted_specialist():
    tri, ids = _planted(n=4000, seed=1)
    rep = trigram_specialisation(tri, {0: ids}, 16, permutations=50)
    e = rep.layers[0].experts
    # the planted expert prefers trigram 0 among tokens of the same current type: the within-type
    # shuffle never reaches its concentration
    assert rep.test == "permutation" and e[5].context_p_value == pytest.approx(1 / 51)
    assert e[5].null_max_concentration < e[5].concentration and e[5].p_value < 1e-6
    assert np.median([x.context_p_value for x in e if x.expert not in (5, 6)]) > 0.1


def test_primary_slot_only_and_bad_input():
    tri, ids = _planted(n=2000)
    rep = trigram_specialisation(tri, {0: ids}, 16, slots="primary")
    assert sum(x.activations for x in rep.layers[0].experts) == 2000
    with pytest.raises(ValueError, match="--slots"):
        trigram_specialisation(tri, {0: ids}, 16, slots="both")
    with pytest.raises(ValueError, match="expert ids outside"):
        trigram_specialisation(tri, {0: ids}, 4)
    with pytest.raises(ValueError, match="shape"):
        trigram_specialisation(tri[:10], {0: ids}, 16)


def _by_hand_case():
    """Two current-token ids of one type (NUM), each followed by OP or by $; expert 0 takes token 7 only."""
    a, b = parse_trigram("OP→NUM→OP"), parse_trigram("OP→NUM→$")
    tokens = np.array([7, 7, 7, 7, 8, 8, 8, 8])
    tri = np.array([a, a, a, b, b, b, b, a])      # P(a | 7) = 3/4, P(a | 8) = 1/4, P(a | NUM) = 1/2
    ids = np.array([[0], [0], [0], [0], [1], [1], [1], [1]])
    return tri, ids, tokens


def test_expected_given_type_and_token_by_hand():
    tri, ids, tokens = _by_hand_case()
    rep = trigram_specialisation(tri, {0: ids}, 2, token_ids=tokens, min_activations=1)
    e0, e1 = rep.layers[0].experts
    assert rep.condition == "token"
    # expert 0: all its tokens are id 7; top trigram a with concentration 3/4
    assert e0.top_pattern == "OP→NUM→OP" and e0.concentration == 0.75 and e0.expected == 0.5
    assert e0.expected_given_type == pytest.approx(0.5) and e0.expected_given_token == pytest.approx(0.75)
    assert e0.lift == pytest.approx(1.5) and e0.context_lift == pytest.approx(1.0)
    # conservative binomial bound of the excess over the token: P[Bin(4, 3/4) >= 3] = 189/256, x 2 trigrams
    assert e0.context_p_value == pytest.approx(min(1.0, 2 * 189 / 256))
    assert e1.top_pattern == "OP→NUM→$" and e1.expected_given_token == pytest.approx(0.75)
    # the causal pattern OP→NUM is the same for every token: concentration 1, nothing beyond the token
    assert e0.causal.pattern == "OP→NUM" and e0.causal.concentration == 1.0 and e0.causal.context_lift == 1.0
    without = trigram_specialisation(tri, {0: ids}, 2, min_activations=1).layers[0].experts[0]
    assert without.expected_given_token is None and without.context_lift == pytest.approx(1.5)


def _contextual_corpus(n=30000, seed=0):
    """Random token ids (40 ids over 4 types); each token's trigram from random neighbour types."""
    from lazarus_core.tokens.types import NUM_TYPES

    rng = np.random.default_rng(seed)
    real = [TYPE_ID[t] for t in ("NUM", "OP", "FUNC", "NOUN")]
    tokens = rng.integers(0, 40, n)
    cur = np.array(real)[tokens % 4]
    prev = np.array(real)[rng.integers(0, 4, n)]
    nxt = np.array(real)[rng.integers(0, 4, n)]
    return tokens, prev, (prev * NUM_TYPES + cur) * NUM_TYPES + nxt


def test_routing_by_token_id_is_not_context_specialisation():
    tokens, prev, tri = _contextual_corpus()
    ids = (tokens % 16)[:, None]                      # the expert is a function of the token id alone
    rep = trigram_specialisation(tri, {0: ids}, 16, token_ids=tokens)
    experts = rep.layers[0].experts
    assert sum(e.q_value < 0.05 for e in experts) >= 12            # the token-blind test calls nearly all "significant"
    assert sum(e.context_q_value < 0.05 for e in experts) <= 1     # beyond the token: nothing there
    assert all(abs(e.context_lift - 1) < 0.15 for e in experts)
    perm = trigram_specialisation(tri[:6000], {0: ids[:6000]}, 16, token_ids=tokens[:6000], permutations=30)
    assert sum(e.context_q_value < 0.05 for e in perm.layers[0].experts) <= 1


def test_routing_by_previous_type_is_context_specialisation():
    tokens, prev, tri = _contextual_corpus(seed=1)
    rng = np.random.default_rng(2)
    # expert = 4 * (previous type's rank) + random: the current token says nothing about the expert
    rank = np.searchsorted(np.unique(prev), prev)
    ids = (4 * rank + rng.integers(0, 4, len(prev)))[:, None]
    rep = trigram_specialisation(tri, {0: ids}, 16, token_ids=tokens)
    experts = rep.layers[0].experts
    assert sum(e.context_q_value < 0.05 for e in experts) >= 12
    assert all(e.causal.context_lift > 3 and e.causal.context_q_value < 1e-6 for e in experts)   # PREV→CUR explains it


def test_shuffled_nmi_is_the_floor_of_random_routing():
    tokens, prev, tri = _contextual_corpus(n=5000, seed=3)
    rng = np.random.default_rng(4)
    random_ids = np.stack([rng.permutation(16)[:2] for _ in range(len(tri))])
    layer = trigram_specialisation(tri, {0: random_ids}, 16).layers[0]
    assert layer.normalized_mutual_information > 0                    # the plug-in estimate is biased up...
    assert abs(layer.nmi_excess) < 0.25 * layer.normalized_mutual_information   # ...and the shuffle shows it
    rank = np.searchsorted(np.unique(prev), prev)
    planted = trigram_specialisation(tri, {0: (4 * rank + rng.integers(0, 4, len(prev)))[:, None]}, 16).layers[0]
    assert planted.nmi_excess > 10 * abs(layer.nmi_excess)
