"""generation dynamics on constructed routing sequences (a planted phase change, a stationary one, sticky routing, answers)
and on a tiny model (greedy and seeded sampling)."""

from __future__ import annotations

import numpy as np
import pytest

from lazarus_core.analysis.generation_dynamics import (Generation, answer_matches, change_point,
                                                       generation_dynamics, routing_dynamics, step_jaccard)
from tests.analysis.test_cold_experts import random_routing

E, K = 8, 2


def _gen(routing: np.ndarray, correct=None, layer=0) -> Generation:
    n = len(routing)
    return Generation("p", None if correct is None else "a", "", list(range(n)), correct, {layer: routing})


def test_step_jaccard_by_hand():
    ids = np.array([[0, 1], [1, 0], [1, 2], [3, 4]])
    assert step_jaccard(ids, E).tolist() == pytest.approx([1.0, 1 / 3, 0.0])


def test_planted_phase_change_is_detected_and_a_stationary_sequence_is_not():
    rng = np.random.default_rng(0)
    first = random_routing(30, E, K, rng, experts=range(4))        # steps 0..29 use experts 0-3 ...
    second = random_routing(30, E, K, rng, experts=range(4, 8))    # ... steps 30..59 experts 4-7
    cp = change_point(np.concatenate([np.eye(E)[first].sum(1), np.eye(E)[second].sum(1)]), permutations=300,
                      rng=np.random.default_rng(1))
    assert cp.detected and cp.p_value < 0.01 and abs(cp.location - 30) <= 2 and cp.statistic > cp.threshold
    detected = []
    for seed in range(20):
        r = np.random.default_rng(100 + seed)
        stationary = np.eye(E)[random_routing(60, E, K, r)].sum(1)
        detected.append(change_point(stationary, permutations=200, rng=r).detected)
    assert sum(detected) <= 4                                      # about 5% by construction
    # through routing_dynamics: the phase generation is flagged, the share of stationary ones is small
    res = routing_dynamics([_gen(np.concatenate([first, second]))] +
                           [_gen(random_routing(60, E, K, np.random.default_rng(s))) for s in range(10)], E,
                           permutations=200)
    phases = res.layers[0].phases
    assert phases[0]["usage"].detected and sum(p["usage"].detected for p in phases[1:]) <= 2


def test_jaccard_series_change_point_on_a_stability_shift():
    rng = np.random.default_rng(3)
    sticky = np.tile([[0, 1]], (30, 1))                            # identical steps: Jaccard 1 ...
    noisy = random_routing(30, E, K, rng)                          # ... then random: Jaccard ~ 1/7
    res = routing_dynamics([_gen(np.concatenate([sticky, noisy]))], E, permutations=300)
    jc = res.layers[0].phases[0]["jaccard"]
    assert jc.detected and abs(jc.location - 29) <= 2


def test_sticky_routing_beats_the_shuffled_baseline_and_random_does_not():
    rng = np.random.default_rng(4)
    gens = []
    for _ in range(6):                                             # runs of 6 identical steps
        blocks = [np.tile(random_routing(1, E, K, rng), (6, 1)) for _ in range(5)]
        gens.append(_gen(np.concatenate(blocks)))
    lay = routing_dynamics(gens, E, permutations=200).layers[0]
    assert lay.jaccard.estimate > lay.jaccard_shuffled["high"] and lay.jaccard_p < 0.01
    assert lay.jaccard.low <= lay.jaccard.estimate <= lay.jaccard.high
    assert lay.self_handoff > lay.self_handoff_expected and lay.handoff_p < 0.01
    assert np.sum(lay.handoff) == lay.transitions == 6 * 29
    assert np.sum(lay.handoff_expected) == pytest.approx(lay.transitions)
    rand = routing_dynamics([_gen(random_routing(30, E, K, np.random.default_rng(s))) for s in range(6)], E,
                            permutations=200).layers[0]
    assert rand.jaccard_shuffled["low"] <= rand.jaccard.estimate <= rand.jaccard_shuffled["high"]
    assert rand.jaccard_p > 0.01


def test_correct_vs_incorrect_routing():
    rng = np.random.default_rng(5)
    good = [_gen(random_routing(20, E, K, rng, experts=range(5)), True) for _ in range(6)]
    bad = [_gen(random_routing(20, E, K, rng, experts=range(3, 8)), False) for _ in range(6)]
    res = routing_dynamics(good + bad, E, permutations=300)
    corr = res.layers[0].correctness
    assert corr["correct"] == 6 and corr["incorrect"] == 6 and corr["p_value"] < 0.01
    assert corr["load_l1_difference"] > corr["load_l1_shuffled"]
    assert res.accuracy.estimate == pytest.approx(0.5)
    same = [_gen(random_routing(20, E, K, rng), c) for c in [True, False] * 6]
    assert routing_dynamics(same, E, permutations=300).layers[0].correctness["p_value"] > 0.01
    assert answer_matches(" Paris is", "paris") and not answer_matches("It is Paris", "Paris")
    assert answer_matches("It is Paris", "Paris", "contains")


def test_generation_on_a_tiny_model_greedy_and_sampled():
    from lazarus_core.routing import find_moe_layers
    from tests.routing.tiny_models import tiny_model, tiny_tokenizer

    model, tok = tiny_model("olmoe"), tiny_tokenizer()
    layers = sorted(find_moe_layers(model).layers)
    res = generation_dynamics(model, tok, ["the a of", "he was"], answers=["and", None], max_new_tokens=6,
                              permutations=20, n_boot=100)
    assert [l.layer for l in res.layers] == layers
    g = res.generations[0]
    assert g.steps == len(g.new_token_ids) <= 6 and g.routing[layers[0]].shape == (g.steps, 3)
    assert res.generations[1].correct is None and res.accuracy.n_units == 1
    again = generation_dynamics(model, tok, ["the a of"], max_new_tokens=6, permutations=5, n_boot=50)
    assert again.generations[0].new_token_ids == g.new_token_ids          # greedy is deterministic
    # the recorded routing is what the model computes teacher-forced on prompt + continuation
    import torch

    from lazarus_core.routing.recorder import RoutingRecorder

    ids = tok("the a of")["input_ids"]
    full = ids + g.new_token_ids[:-1]
    with RoutingRecorder(model, layers) as rec, torch.inference_mode():
        model(input_ids=torch.tensor([full]))
        routed = rec.pop()
    np.testing.assert_array_equal(routed[layers[0]].topk_ids[len(ids) - 1:].numpy(), g.routing[layers[0]])
    s1 = generation_dynamics(model, tok, ["the a of"], max_new_tokens=6, temperature=1.5, seed=3, permutations=5)
    s2 = generation_dynamics(model, tok, ["the a of"], max_new_tokens=6, temperature=1.5, seed=3, permutations=5)
    assert s1.generations[0].new_token_ids == s2.generations[0].new_token_ids
    with pytest.raises(ValueError, match="empty"):
        generation_dynamics(model, tok, ["  "])
    with pytest.raises(ValueError, match="no prompts"):
        generation_dynamics(model, tok, [])
    with pytest.raises(ValueError, match="--layers"):
        generation_dynamics(model, tok, ["the"], layers=[99])
