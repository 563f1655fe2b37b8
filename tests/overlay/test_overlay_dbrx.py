"""DBRX on an overlay: its experts module has no transformers experts-implementation interface, so load_model
binds the overlay forward to each DbrxExperts. On an exactly low-rank DBRX the overlay model's logits equal the
original's; compress, verify and generate run end to end through the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from lazarus_core.cli.main import main
from lazarus_core.models import open_moe_checkpoint
from lazarus_core.overlay import load_model, make_policy, plan_overlay, write_overlay
from lazarus_core.overlay.load import experts_modules
from lazarus_core.routing.loading import load_model as load_original
from tests.analysis.known_rank import EXPECTED_RANKS, write_known_rank_checkpoint
from tests.routing.tiny_models import tiny_tokenizer

TEXT = ("the man said that the water was very long and then some people came back to see what the time was "
        "and how many words they could find in it before the day was out")


@pytest.fixture(scope="module")
def pseudo_dbrx(tmp_path_factory):
    """A DBRX pseudo-MoE: shared +-8 base plus exactly rank-4 deltas per expert, with a tokenizer."""
    path = write_known_rank_checkpoint("dbrx", tmp_path_factory.mktemp("dbrx") / "pseudo", shared_base=True)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def _compress(src: str, out, rank: int) -> None:
    ckpt = open_moe_checkpoint(src)
    write_overlay(ckpt, out, plan_overlay(ckpt, list(ckpt.moe_layers), make_policy(rank=rank), dtype="fp32"), model=src)


def test_overlay_logits_equal_the_original_on_exactly_low_rank_dbrx(pseudo_dbrx, tmp_path):
    _compress(pseudo_dbrx, tmp_path / "ov", rank=EXPECTED_RANKS[0.99])  # the deltas' exact rank
    original, _, _ = load_original(pseudo_dbrx)
    model = load_model(overlay=tmp_path / "ov", backend="cpu")
    modules = experts_modules(model)
    assert sorted(modules) == [0, 1] and sorted(experts_modules(original)) == [0, 1]
    for module in modules.values():  # no full expert weights anywhere; the overlay forward is bound
        assert all(module.mlp._parameters[n] is None for n in ("w1", "v1", "w2"))
        assert module.forward.__func__.__name__ == "dbrx_overlay_forward"
    ids = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        expected, got = original(ids).logits, model(ids).logits
    scale = float(expected.abs().max())
    torch.testing.assert_close(got, expected, atol=1e-5 * max(1.0, scale), rtol=1e-4)
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    out = model.generate(ids[:1, :5], **kw)
    assert out.shape == (1, 9) and torch.equal(out, original.generate(ids[:1, :5], **kw))


def test_too_low_a_rank_changes_the_logits(pseudo_dbrx, tmp_path):
    _compress(pseudo_dbrx, tmp_path / "ov", rank=1)  # the test above can fail: rank 1 < 4 is not exact
    original, _, _ = load_original(pseudo_dbrx)
    model = load_model(overlay=tmp_path / "ov", backend="cpu")
    ids = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, original(ids).logits, atol=1e-3)


def test_cli_compress_verify_generate_on_dbrx(pseudo_dbrx, tmp_path):
    run = lambda *a: main(["introspect", "moe-expert", *a, "--no-progress"])  # noqa: E731
    assert run("moe-overlay-compress", "-m", pseudo_dbrx, "--rank", "4", "--dtype", "fp32", "--out", str(tmp_path / "ov"),
               "-o", str(tmp_path / "p.json")) == 0
    press = json.loads((tmp_path / "p.json").read_text())
    assert press["family"] == "dbrx" and {p["rank"] for p in press["projections"]} == {4}
    assert press["bytes"]["original_expert_bytes"] == 2 * 3 * 4 * 32 * 64 * 2  # the fused bf16 tensors as stored
    (tmp_path / "text.txt").write_text(TEXT)
    run("moe-overlay-verify", "-m", pseudo_dbrx, "--overlay", str(tmp_path / "ov"), "--text", str(tmp_path / "text.txt"),
        "-o", str(tmp_path / "v.json"))
    ver = json.loads((tmp_path / "v.json").read_text())
    assert ver["tokens"] > 20 and set(ver["block_output_error"]) == {"0", "1"}
    assert max(ver["block_output_error"].values()) < 1e-5          # each block on the original's hidden states
    assert max(r["max"] for r in ver["reconstruction"]) < 1e-6     # every expert reconstructed exactly
    assert abs(ver["perplexity_increase"]) < 1e-4 and ver["top1_agreement"] == 1.0
    assert main(["generate", "-m", pseudo_dbrx, "--overlay", str(tmp_path / "ov"), "-p", "the man said",
                 "--max-new-tokens", "3", "-o", str(tmp_path / "g.json")]) == 0
    assert json.loads((tmp_path / "g.json").read_text())["new_tokens"] == 3


def test_energy_policy_picks_the_exact_95_rank_as_moe_type_reports(pseudo_dbrx, tmp_path):
    from lazarus_core.analysis.expert_structure import analyze_moe_type

    assert main(["introspect", "moe-expert", "moe-overlay-compute", "-m", pseudo_dbrx, "--energy", "0.95",
                 "-o", str(tmp_path / "c.json"), "--no-progress"]) == 0
    plan = json.loads((tmp_path / "c.json").read_text())
    assert {(p["layer"], p["projection"]): p["rank"] for p in plan["projections"]} == {
        (layer, proj): EXPECTED_RANKS[0.95] for layer in (0, 1) for proj in ("gate", "up", "down")}
    report = analyze_moe_type(open_moe_checkpoint(pseudo_dbrx))
    assert all(p.compressor_rank == EXPECTED_RANKS[0.95] for layer in report.layers for p in layer.projections.values())
    assert report.compression["compressible"] and report.compression["ratio"] > 1
