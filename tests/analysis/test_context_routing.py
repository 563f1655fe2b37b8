"""Context dependence of a token's routing: the left-context window and the per-occurrence experts."""

from __future__ import annotations

import numpy as np
import pytest

from lazarus_core.analysis.context_routing import (check_token, context_test, context_window, default_contexts,
                                                   token_occurrences, token_routing)
from lazarus_core.routing.locate import find_moe_layers
from lazarus_core.routing.session import RoutingSession
from tests.routing.tiny_models import save_tiny_checkpoint, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("olmoe")


def test_context_window_reaches_the_full_context(model):
    info = find_moe_layers(model)
    ids = [1, 5, 9, 12, 30, 7, 44, 3, 8, 11, 20]
    layers = sorted(info.layers)
    res = context_window(model, ids, 10, layers, info=info)
    sizes = [w.window for w in res.windows]
    assert sizes == [0, 1, 2, 4, 8, 10]
    full = res.windows[-1]
    assert all(full.jaccard[l] == 1.0 and full.same_primary[l] for l in layers)
    assert {l: full.experts[l] for l in layers} == res.full_context_experts
    for l in layers:
        assert 0 <= res.needed(l) <= 10
        assert all(res.windows[i].jaccard[l] == 1.0 for i in range(len(sizes)) if sizes[i] >= res.needed(l))
    assert res.to_dict()["window_needed"] == {str(l): res.needed(l) for l in layers}


def test_context_window_of_the_first_token_has_nothing_to_add(model):
    res = context_window(model, [1, 5, 9], 0, [min(find_moe_layers(model).layers)])
    assert [w.window for w in res.windows] == [0]


def test_context_window_position_out_of_range(model):
    with pytest.raises(ValueError, match="--position 5 is out of range"):
        context_window(model, [1, 5, 9], 5, [0])


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    path = save_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("qwen3") / "ckpt")
    return RoutingSession(str(path))


def test_token_routing_reads_the_trace_rows(session):
    contexts = ["the man", "one of the water", "what the day"]
    trace, _ = session.trace(contexts)
    occ = token_occurrences(trace, session.decoder, session.classifier, "the", contexts=contexts)
    assert sorted({o.doc for o in occ}) == [0, 1, 2]
    layer = trace.layers[0]
    res = token_routing(trace, occ, "the", layer, seed=0)
    lt = trace.layer(layer)
    for o, e, w in zip(occ, res.experts, res.weights):
        np.testing.assert_array_equal(e, lt.topk_ids[o.row])
        np.testing.assert_array_equal(w, lt.topk_weights[o.row])
    assert [d.layer for d in res.layers] == trace.layers
    assert res.layer_result(layer).occurrences == len(occ)
    ct = context_test(trace, occ, "the", trace.layers, seed=0)
    assert sum(ct.trigram_counts().values()) == len(occ)
    assert ct.to_dict()["layers"] == [d.to_dict() for d in res.layers]


def test_token_errors_name_the_flag(session):
    with pytest.raises(ValueError, match="--token 'zzzz' is not in the tokenizer's vocabulary"):
        check_token(session.tokenizer, "zzzz")
    contexts = ["the man", "one two"]
    trace, _ = session.trace(contexts)
    with pytest.raises(ValueError, match="does not occur in context\\(s\\) 'one two'"):
        token_occurrences(trace, session.decoder, session.classifier, "the", contexts=contexts)
    assert "x = 7" in default_contexts("7")
