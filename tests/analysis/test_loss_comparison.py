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
    res = loss_comparison(model, DOCS * 2, None)
    assert res.delta_nll == 0.0 and res.kl == 0.0 and res.top1_agreement == 1.0
    assert res.delta_nll_ci.low == res.delta_nll_ci.high == 0.0 and res.includes_zero
    assert res.documents == 2 * len(DOCS) and res.tokens == 2 * sum(len(d) - 1 for d in DOCS)
    assert res.delta_nll_ci.method == "bootstrap-documents" and res.delta_nll_ci.n_units == 2 * len(DOCS)
    assert res.perplexity_ratio_ci.low == res.perplexity_ratio_ci.high == 1.0


def test_fewer_than_five_documents_resample_tokens(model):
    res = loss_comparison(model, DOCS, RoutingEdit(ablate=(0,)))
    assert res.delta_nll_ci.method == "bootstrap-tokens" and res.delta_nll_ci.n_units == res.tokens


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


# ------------------------------------------------------------------ planted effects on a constructed model
V = 16


class Planted(torch.nn.Module):
    """A constructed LM: uniform next-token distribution; under the edit the true next token's logit rises by
    ``bump[first token] + jitter[next token]``, so each token's loss change is known exactly."""

    def __init__(self, bump, jitter):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.bump, self.jitter, self.edited = torch.tensor(bump), torch.tensor(jitter), False

    def forward(self, input_ids, use_cache=False):
        from types import SimpleNamespace

        ids = input_ids[0]
        logits = torch.zeros(1, len(ids), V, dtype=torch.float64)
        if self.edited:
            logits[0, torch.arange(len(ids) - 1), ids[1:]] += self.bump[ids[0]] + self.jitter[ids[1:]]
        return SimpleNamespace(logits=logits)


def _delta(c):
    """Exact NLL change of a token whose logit rises by c over a uniform distribution on V tokens."""
    return np.log(np.exp(c) + V - 1) - c - np.log(V)


@pytest.fixture
def planted(monkeypatch):
    import contextlib

    import lazarus_core.analysis.loss_comparison as lc

    @contextlib.contextmanager
    def fake(model, edit, layers=None, *, info=None):
        model.edited = edit is not None
        try:
            yield
        finally:
            model.edited = False

    monkeypatch.setattr(lc, "intervention", fake)
    return Planted


def _docs(rng, n_docs, length=10, kinds=8):
    return [[int(rng.integers(kinds))] + rng.integers(V, size=length).tolist() for _ in range(n_docs)]


def test_document_interval_covers_a_planted_effect(planted):
    bump, jitter = np.linspace(0.8, 2.0, 8).tolist() + [0.0] * 8, np.linspace(-0.5, 0.5, V).tolist()
    model = planted(bump, jitter)
    truth = float(np.mean([_delta(b + j) for b in bump[:8] for j in jitter]))   # population mean over documents
    rng, covered, excludes = np.random.default_rng(0), 0, 0
    reps = 60
    for rep in range(reps):
        res = loss_comparison(model, _docs(rng, 12), RoutingEdit(ablate=(0,)), n_boot=500, seed=rep)
        assert res.delta_nll_ci.method == "bootstrap-documents" and res.delta_nll_ci.n_units == 12
        covered += res.delta_nll_ci.low <= truth <= res.delta_nll_ci.high
        excludes += not res.includes_zero
        r = res.perplexity_ratio_ci
        assert (r.estimate, r.low, r.high) == pytest.approx(tuple(np.exp([res.delta_nll, res.delta_nll_ci.low,
                                                                            res.delta_nll_ci.high])))
    assert truth < -0.1 and covered / reps >= 0.8 and excludes / reps >= 0.8


def test_no_effect_on_average_usually_includes_zero(planted):
    # per-document effects +y and -y of equal frequency: the population mean change is exactly 0
    inv = lambda y: -np.log((V * np.exp(y) - 1) / (V - 1))          # noqa: E731  (_delta's inverse)
    ys = [0.3, -0.3, 0.15, -0.15, 0.05, -0.05, 0.0, 0.0]
    model = planted([float(inv(y)) for y in ys] + [0.0] * 8, [0.0] * V)
    assert np.allclose([_delta(inv(y)) for y in ys], ys)
    rng, includes = np.random.default_rng(1), 0
    reps = 60
    for rep in range(reps):
        res = loss_comparison(model, _docs(rng, 12), RoutingEdit(ablate=(0,)), n_boot=500, seed=rep)
        includes += res.includes_zero
    assert includes / reps >= 0.8


def test_per_document_intervals_resample_each_documents_tokens(planted):
    model = planted([0.0, 2.0] + [0.0] * 14, np.linspace(-1, 1, V).tolist())
    docs = [[0, 3, 4, 5, 6, 7, 8], [1, 9, 10, 11, 12, 13, 14, 15]]
    res = loss_comparison(model, docs, RoutingEdit(ablate=(0,)), per_document=True)
    assert [d.document for d in res.per_document] == [0, 1] and [d.tokens for d in res.per_document] == [6, 7]
    for d, doc in zip(res.per_document, docs):
        want = _delta(np.asarray(model.bump[doc[0]]) + np.asarray(model.jitter[doc[1:]]))
        assert d.delta_nll == pytest.approx(want.mean())
        assert d.delta_nll_ci.method == "bootstrap-tokens" and d.delta_nll_ci.n_units == len(doc) - 1
        assert d.delta_nll_ci.low <= d.delta_nll <= d.delta_nll_ci.high
        assert d.includes_zero == d.delta_nll_ci.includes_zero
    assert res.per_document[1].delta_nll < res.per_document[0].delta_nll       # the bumped document gains more
    d = res.to_dict()
    assert d["per_document"][1]["perplexity_ratio_ci"]["low"] == pytest.approx(np.exp(d["per_document"][1]["delta_nll_ci"]["low"]))
    assert d["kl_ci"]["low"] <= d["kl"] <= d["kl_ci"]["high"]
