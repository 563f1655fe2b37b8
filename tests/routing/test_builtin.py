"""Capture and interventions on the shipped demo models (skipped, with the reason, where they are not installed)."""

from __future__ import annotations

import json

import pytest
import torch

from lazarus_core.cli.main import main
from lazarus_core.routing.interventions import ablate_experts
from lazarus_core.routing.locate import find_moe_layers
from lazarus_core.routing.trace_reader import load_trace
from tests.routing.reference import assert_capture_matches_recomputation, hand_block_forward

ALIASES = {"demo:native": "olmoe", "demo:upcycled": "gpt_oss"}
_LOADED: dict = {}


def _load(alias):
    try:
        from lazarus_core.models.builtin import resolve_builtin
    except ImportError:
        pytest.skip("lazarus_core.models.builtin.resolve_builtin is not available yet")
    if resolve_builtin(alias) is None:
        pytest.skip(f"built-in model {alias} is not installed")
    if alias not in _LOADED:
        from lazarus_core.routing.loading import load_model

        _LOADED[alias] = load_model(alias)
    return _LOADED[alias]


@pytest.mark.parametrize("alias", ALIASES)
def test_builtin_capture_matches_recomputation(alias):
    model, tok, _ = _load(alias)
    assert find_moe_layers(model).family == ALIASES[alias]
    ids = tok(["the cat sat on the mat", "def f(x): return x + 1"], padding=True, return_tensors="pt")["input_ids"]
    assert_capture_matches_recomputation(model, ids[:, :12])


@pytest.mark.parametrize("alias", ALIASES)
def test_builtin_cli_capture(alias, tmp_path, capsys):
    _load(alias)
    rc = main(["capture", "-m", alias, "-p", "the cat sat on the mat", "a second prompt", "-o", str(tmp_path / "t"),
               "--logits", "--max-tokens", "32", "--json"])
    assert rc == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["family"] == ALIASES[alias]
    trace = load_trace(tmp_path / "t", verify=True)
    sums = trace.layer(trace.layers[0]).topk_weights.sum(axis=1)
    if ALIASES[alias] == "olmoe":
        assert (sums < 1 - 1e-4).all()         # OLMoE: top-k of a softmax over all experts, not renormalised
    else:
        assert abs(sums - 1).max() < 1e-5      # GPT-OSS: softmax over the k chosen logits


@pytest.mark.parametrize("alias", ALIASES)
def test_builtin_ablation_matches_hand_forward(alias):
    model, tok, _ = _load(alias)
    info = find_moe_layers(model)
    layer = info.layers[min(info.layers)]
    seen = {}
    h1 = layer.block.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0].detach()))
    h2 = layer.block.register_forward_hook(
        lambda m, a, o: seen.__setitem__("out", (o[0] if isinstance(o, tuple) else o).detach()))
    try:
        with ablate_experts(model, [0, 1], [layer.layer]), torch.no_grad():
            model(tok("the cat sat on the mat", return_tensors="pt")["input_ids"])
    finally:
        h1.remove()
        h2.remove()
    H = seen["in"].shape[-1]
    expected, routes = hand_block_forward(layer.block, model.config, seen["in"].reshape(-1, H), info.top_k,
                                          ablate=(0, 1))
    torch.testing.assert_close(seen["out"].reshape(-1, H).double(), expected, rtol=1e-4, atol=1e-4)
    assert not any(e in (0, 1) for r in routes for e in r)
