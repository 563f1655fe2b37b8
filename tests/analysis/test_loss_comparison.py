"""Teacher-forced loss with and without a routing edit: exact zero for no edit, a real change for a drastic one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lazarus_core.analysis.loss_comparison import document_nll, generate, loss_comparison, next_token_logprobs
from lazarus_core.routing import RoutingEdit
from lazarus_core.routing.locate import find_moe_layers
from tests.routing.tiny_models import tiny_model

DOCS = [[1, 5, 9, 12, 30, 7, 44, 3], [1, 20, 21, 22, 23], [1, 60, 61, 62, 63, 64, 65], [1, 8, 8, 8, 9, 9]]


@pytest.fixture(scope="module")
def model():
    return tiny_model("olmoe")


def test_document_nll_matches_a_plain_forward(model):
    nll = document_nll(model, DOCS)
    assert [len(x) for x in nll] == [len(d) - 1 for d in DOCS]
    for doc, got in zip(DOCS, nll):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([doc])).logits[0].double(), -1)
        want = -logp[torch.arange(len(doc) - 1), torch.tensor(doc[1:])].numpy()
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_document_nll_cuts_long_documents_into_windows(model):
    doc = list(range(3, 3 + 11))
    nll = document_nll(model, [doc], window=4)[0]
    assert len(nll) == 11 - 3                          # windows of 4, 4, 3 tokens: one unpredicted token each
    np.testing.assert_allclose(nll[:3], document_nll(model, [doc[:4]])[0], rtol=1e-9)
    assert document_nll(model, [[5]])[0].size == 0


def test_no_edit_gives_exactly_zero_delta_and_an_interval_on_zero(model):
    res = loss_comparison(model, DOCS, None)
    assert res.delta_nll == 0.0 and res.kl == 0.0 and res.top1_agreement == 1.0
    assert res.delta_nll_ci.low == res.delta_nll_ci.high == 0.0 and res.includes_zero
    assert res.documents == len(DOCS) and res.tokens == sum(len(d) - 1 for d in DOCS)
    assert res.delta_nll_ci.method == "bootstrap-documents" and res.delta_nll_ci.n_units == len(DOCS)


def test_ablating_all_but_one_expert_changes_the_loss(model):
    info = find_moe_layers(model)
    edit = RoutingEdit(ablate=tuple(range(1, info.num_experts)), top_k=1)
    res = loss_comparison(model, DOCS * 3, edit, seed=1)
    base = np.concatenate(document_nll(model, DOCS * 3))
    edited = np.concatenate(document_nll(model, DOCS * 3, edit))
    assert res.nll_base == pytest.approx(base.mean()) and res.nll_edit == pytest.approx(edited.mean())
    assert res.delta_nll == pytest.approx(edited.mean() - base.mean())
    assert abs(res.delta_nll) > 1e-3 and res.kl > 1e-4
    assert res.delta_nll_ci.low <= res.delta_nll <= res.delta_nll_ci.high
    assert res.includes_zero == (res.delta_nll_ci.low <= 0 <= res.delta_nll_ci.high)
    d = res.to_dict()
    # the keys the CLI JSON always had, and the new ones
    assert {"edit", "layers", "tokens", "nll_base", "nll_edit", "delta_nll", "perplexity_ratio", "kl",
            "top1_agreement", "documents", "delta_nll_ci", "includes_zero"} <= set(d)
    assert d["edit"]["top_k"] == 1


def test_one_document_resamples_tokens(model):
    res = loss_comparison(model, DOCS[:1], RoutingEdit(ablate=(0,)))
    assert res.delta_nll_ci.method == "bootstrap-tokens" and res.delta_nll_ci.n_units == len(DOCS[0]) - 1


def test_too_short_prompts_are_an_error(model):
    with pytest.raises(ValueError, match="at least two tokens"):
        loss_comparison(model, [[1], [2]], None)


def test_generate_records_every_fed_token(model):
    class Tok:
        pad_token_id, eos_token_id = 0, 2

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    g = generate(model, Tok(), DOCS[0], 3, min(find_moe_layers(model).layers))
    assert len(g.new_ids) == 3 and g.topk_ids.shape[0] == len(DOCS[0]) + 2
    lp = next_token_logprobs(model, DOCS[0])
    assert g.new_ids[0] == int(lp[-1].argmax())
