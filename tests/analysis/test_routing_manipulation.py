"""routing-manipulation on a constructed router where one context token drives expert E."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lazarus_core.analysis.routing_manipulation import router_margin, routing_manipulation
from lazarus_core.routing import find_moe_layers
from tests.routing.tiny_models import tiny_model

J = 0          # residual coordinate held at +1 (so E's logit can start negative)
D = 5          # residual coordinate that only the planted token writes
Z = 42         # the planted token id
E = 6          # the expert it drives at layer 0
SPECIALS = (0, 1, 2, 3)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def driven_model():
    """OLMoE whose layer-0 attention averages coordinate D over the prefix and whose router row E reads only D.

    Queries and keys are zero (uniform causal attention); the value / output projections copy the
    normalised coordinate D; only token Z has a non-zero embedding there. Coordinate J is +1 for every
    token and E's router row reads it with weight -1, so E's logit at the last position is clearly negative
    unless Z occurs in the context, and large when it does; no other expert reads D or J.
    """
    model = tiny_model("olmoe", seed=5)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[:, D] = 0.0
        emb[Z, D] = 3.0
        emb[:, J] = 1.0
        attn.q_proj.weight.zero_()
        attn.k_proj.weight.zero_()
        attn.v_proj.weight.zero_()
        attn.v_proj.weight[0, D] = 1.0
        attn.o_proj.weight.zero_()
        attn.o_proj.weight[D, 0] = 1.0
        router = model.model.layers[0].mlp.gate.weight
        router[:, D] = 0.0
        router[:, J] = 0.0
        router[E] = 0.0
        router[E, D] = 4.0
        router[E, J] = -1.0
    return model.eval()


def _prompts(n: int = 10, length: int = 8, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    pool = [i for i in range(4, 96) if i != Z]
    return [[1] + rng.choice(pool, size=length - 1).tolist() for _ in range(n)]


def test_constructed_router_is_what_it_claims():
    model = driven_model()
    info = find_moe_layers(model)
    from lazarus_core.analysis.routing_manipulation import _Probe

    probe = _Probe(model, 0, info)
    ids = torch.tensor(_prompts(1)[0])
    with torch.no_grad():
        logits, _ = probe.route_at(probe.embed(ids)[None], len(ids) - 1)
    assert float(logits[0, E]) < -2.0
    ids[3] = Z
    with torch.no_grad():
        logits, primary = probe.route_at(probe.embed(ids)[None], len(ids) - 1)
    assert int(primary[0]) == E and float(router_margin(logits, E)[0]) > 1.0


def test_gradient_search_finds_the_token_random_search_mostly_fails():
    model = driven_model()
    res = routing_manipulation(model, _prompts(10), 0, E, steps=3, candidates=6, topk_tokens=4, protected_ids=SPECIALS,
                               substitutions=8, noise=(0.0, 0.5), noise_draws=4, n_boot=300, seed=1)
    assert res.already_primary == 0
    g, r = res.gradient, res.random
    assert g.trials == r.trials == 10
    assert g.successes >= 9 and g.mean_edits is not None and g.mean_edits <= 3
    assert r.successes <= 5 < g.successes
    assert res.gradient_minus_random.estimate > 0.3
    for t in res.trials:
        if t.method == "gradient" and t.success:
            assert Z in t.ids and t.ids[-1] == _prompts(10)[t.prompt][-1]     # the target token stays
    noise0 = next(f for f in res.flips if f.perturbation == "noise" and f.noise_ratio == 0.0)
    assert noise0.flips == 0 and noise0.rate.high == 0.0


def test_no_planted_token_means_nothing_found():
    """Without the planted embedding nothing writes coordinate D: no substitution can make E primary."""
    model = driven_model()
    with torch.no_grad():
        model.get_input_embeddings().weight[Z, D] = 0.0
    res = routing_manipulation(model, _prompts(4), 0, E, steps=2, candidates=4, topk_tokens=4, protected_ids=SPECIALS,
                               substitutions=4, noise=(0.0,), noise_draws=2, n_boot=100)
    assert res.gradient.successes == 0 and res.random.successes == 0


def test_flip_rate_grows_with_noise():
    model = tiny_model("qwen3_moe", seed=6)
    res = routing_manipulation(model, _prompts(6, 10), 1, 0, steps=1, candidates=2, protected_ids=SPECIALS,
                               substitutions=8, noise=(0.0, 0.1, 10.0), noise_draws=8, n_boot=200)
    noise = {f.noise_ratio: f for f in res.flips if f.perturbation == "noise"}
    assert noise[0.0].flips == 0
    assert noise[10.0].rate.estimate > noise[0.0].rate.estimate
    assert {f.perturbation for f in res.flips} == {"context-token", "target-token", "noise"}
    assert set(res.tables()) == {"trials", "flips"}


def test_bad_input():
    model = tiny_model("qwen3_moe")
    with pytest.raises(ValueError, match="no prompts"):
        routing_manipulation(model, [], 0, 0)
    with pytest.raises(ValueError, match="--expert 8"):
        routing_manipulation(model, _prompts(1), 0, 8)
    with pytest.raises(ValueError, match="--layer 5"):
        routing_manipulation(model, _prompts(1), 5, 0)
    with pytest.raises(ValueError, match="--target-idx"):
        routing_manipulation(model, _prompts(1), 0, 0, target_idx=40)
    with pytest.raises(ValueError, match="no token to edit"):
        routing_manipulation(model, _prompts(1), 0, 0, target_idx=0)
