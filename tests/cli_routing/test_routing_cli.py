"""Every routing action end to end (demo:native and a generated Qwen3-MoE), with results recomputed independently."""

from __future__ import annotations

import numpy as np
import pytest

from lazarus_core.routing.trace_reader import load_trace

SMALL = ["--prompts-per-category", "2"]
ACTIONS = {
    "explore": ["explore", "-p", "the man is to the water as one is to two", "--all-layers", "--deep", "1",
                "--compare", "it is what it is"],
    "full-taxonomy": ["full-taxonomy", "--categories", "analogy,question", *SMALL, "--permutations", "5"],
    "domain-test": ["domain-test", "--prompts-per-domain", "3", "--permutations", "20"],
    "token-routing": ["token-routing", "--token", "the", "--contexts", "the man", "one of the water", "what the day"],
    "context-test": ["context-test", "--token", "is", "--categories", "analogy,question", *SMALL],
    "context-window": ["context-window", "-p", "the water was very long and the man said no"],
    "analyze": ["analyze", "--categories", "prose", *SMALL],
    "weights": ["weights", "--categories", "prose", *SMALL],
    "trace": ["trace", "-p", "it is what it is"],
    "heatmap": ["heatmap", "--categories", "prose", *SMALL],
    "chat": ["chat", "-p", "the man said", "--max-new-tokens", "3", "--ablate", "0"],
    "compare": ["compare", "-p", "the man said no to the water", "--max-new-tokens", "2", "--ablate", "1"],
    "ablate": ["ablate", "-p", "the man said no to the water", "--ablate", "1"],
    "attention-routing": ["attention-routing", "-p", "the man said no to the water"],
    "attention-pattern": ["attention-pattern", "-p", "the man said no to the water"],
}


@pytest.mark.parametrize("action", list(ACTIONS))
def test_every_action_on_a_generated_qwen3_moe(action, other_family_model, run_cli):
    code, payload, err = run_cli(*ACTIONS[action], "-m", other_family_model, "-v")
    assert code == 0, err
    assert payload["action"] == action


@pytest.mark.slow
@pytest.mark.parametrize("action", list(ACTIONS))
def test_every_action_on_demo_native(action, native_model, run_cli):
    code, payload, err = run_cli(*ACTIONS[action], "-m", native_model)
    assert code == 0, err
    assert payload["action"] == action


@pytest.mark.slow
@pytest.mark.parametrize("action", list(ACTIONS))
def test_every_action_on_demo_upcycled(action, upcycled_model, run_cli):
    code, payload, err = run_cli(*ACTIONS[action], "-m", upcycled_model)
    assert code == 0, err
    assert payload["action"] == action


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "qwen2_moe", "deepseek_v2", "deepseek_v3", "gpt_oss", "dbrx"])
def test_explore_and_weights_on_every_family(family, tmp_path, run_cli):
    from tests.routing.tiny_models import save_tiny_checkpoint, tiny_config

    path = str(save_tiny_checkpoint(family, tmp_path / family))
    code, payload, err = run_cli("explore", "-m", path, "-p", "the man is to the water as one is to two")
    assert code == 0, err
    routed = payload["log"][0]
    cfg = tiny_config(family)
    k = cfg.ffn_config.moe_top_k if family == "dbrx" else cfg.num_experts_per_tok
    assert all(np.array(v["topk_ids"]).shape == (len(routed["token_ids"]), k) for v in routed["layers"].values())
    # <s> the <unk>(man) is to the water as: specials are SP, words keep their types
    assert routed["types"]["semantic"][:8] == ["SP", "FUNC", "SP", "FUNC", "TO", "FUNC", "NOUN", "AS"]
    code, w, err = run_cli("weights", "-m", path, "-p", "it is what it is", "-p", "one two three")
    assert code == 0, err
    sums = [layer["row_sum_mean"] for layer in w["layers"]]
    if family in ("mixtral", "gpt_oss", "dbrx"):      # softmax over the k best / top-k over their 1-norm: sum 1
        assert sums == pytest.approx([1.0] * len(sums), abs=1e-5)


def test_explore_routing_matches_a_batched_capture(native_model, run_cli, tmp_path):
    prompt = "King is to queen as man is to woman"
    code, payload, err = run_cli("explore", "-m", native_model, "-p", prompt)
    assert code == 0, err
    routed = payload["log"][0]
    assert routed["types"]["semantic"][-3:] == ["FUNC", "TO", "NOUN"]          # ' is to woman'
    code, _, err = run_cli("heatmap", "-m", native_model, "-p", prompt, "-p", "2 + 3 = 5", "--save-trace",
                           str(tmp_path / "t"))
    trace = load_trace(tmp_path / "t")
    span = trace.document(0)
    assert span.token_ids.tolist() == routed["token_ids"]
    for layer in trace.layers:
        assert span.layer(layer).topk_ids.tolist() == routed["layers"][str(layer)]["topk_ids"]


def test_full_taxonomy_numbers_recomputed_from_the_saved_trace(native_model, run_cli, tmp_path):
    from lazarus_core.tokens import TokenClassifier, trigram_name
    from lazarus_core.trigram.labels import label_trace
    from transformers import AutoTokenizer
    from lazarus_core.models.builtin import resolve_builtin

    code, payload, err = run_cli("full-taxonomy", "-m", native_model, "--categories", "arithmetic,analogy,code",
                                 "--prompts-per-category", "4", "--save-trace", str(tmp_path / "t"))
    assert code == 0, err
    trace = load_trace(tmp_path / "t")
    labels = label_trace(trace, AutoTokenizer.from_pretrained(resolve_builtin(native_model)), TokenClassifier())
    tri = labels.trigrams("semantic")
    layer = payload["specialisation"]["layers"][-1]
    ids = trace.layer(layer["layer"]).topk_ids
    for e in layer["experts"]:
        mine = np.concatenate([tri[(ids[:, j] == e["expert"])] for j in range(ids.shape[1])])
        assert e["activations"] == len(mine)
        if len(mine):
            values, counts = np.unique(mine, return_counts=True)
            assert e["concentration"] == pytest.approx(counts.max() / len(mine))
            assert e["top_pattern"] in {trigram_name(v) for v in values[counts == counts.max()]}
            layer_tri = np.concatenate([tri for _ in range(ids.shape[1])])
            top = next(v for v in values if trigram_name(v) == e["top_pattern"])
            assert e["expected"] == pytest.approx((layer_tri == top).mean())
    cats = {c["category"] for c in payload["categories_detail"]}
    assert cats == {"arithmetic", "analogy", "code"}
    # the frequent-pattern table: counts and each expert's share among the pattern's tokens
    focus = payload["patterns"][0]["layer"]
    fids = trace.layer(focus).topk_ids
    for pat in payload["patterns"]:
        mask = np.array([trigram_name(t) == pat["trigram"] for t in tri])
        assert pat["count"] == mask.sum()
        for e in pat["experts"]:
            assert e["count"] == (fids[mask] == e["expert"]).sum()
            assert e["layer_share"] == pytest.approx((fids == e["expert"]).any(1).mean())


def test_domain_test_chi_square_recomputed(native_model, run_cli, tmp_path):
    import json

    code, payload, err = run_cli("domain-test", "-m", native_model, "--prompts-per-domain", "4", "--permutations", "0",
                                 "--save-trace", str(tmp_path / "t"))
    assert code == 0, err
    trace = load_trace(tmp_path / "t")
    labels = {int(k): v for k, v in json.loads((tmp_path / "t" / "lazarus_labels.json").read_text()).items()}
    for res in payload["layers"]:
        prim = trace.layer(res["layer"]).topk_ids[:, 0]
        domains = sorted(set(labels.values()))
        table = np.zeros((trace.num_experts, len(domains)))
        for e, d in zip(prim, trace.doc_ids):
            table[e, domains.index(labels[int(d)])] += 1
        table = table[table.sum(1) > 0]
        exp = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
        chi2 = ((table - exp) ** 2 / exp).sum()
        assert res["chi2"] == pytest.approx(chi2) and res["dof"] == (table.shape[0] - 1) * (len(domains) - 1)
        assert res["cramers_v"] == pytest.approx(np.sqrt(chi2 / (table.sum() * (min(table.shape) - 1))))


def test_token_routing_occurrences_and_experts(native_model, run_cli, tmp_path):
    code, payload, err = run_cli("token-routing", "-m", native_model, "--token", "127", "--save-trace", str(tmp_path / "t"))
    assert code == 0, err
    # ten default contexts, two of which hold the token twice
    assert len(payload["occurrences"]) == 12
    trace = load_trace(tmp_path / "t")
    lt = trace.layer(payload["layer"])
    for o in payload["occurrences"]:
        assert o["experts"] == lt.topk_ids[o["row"]].tolist()
    assert payload["layer"] == sorted(trace.layers)[len(trace.layers) // 2]      # default: the middle MoE layer


def test_usage_weights_heatmap_recomputed(native_model, run_cli, tmp_path):
    trace_dir = tmp_path / "t"
    code, heat, err = run_cli("heatmap", "-m", native_model, "--categories", "prose,code", "--prompts-per-category", "2",
                              "--save-trace", str(trace_dir), "--plot", str(tmp_path / "h.png"))
    assert code == 0, err
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trace = load_trace(trace_dir)
    k = trace.top_k
    for row, layer in zip(heat["load"], heat["layers"]):
        assert sum(row) == pytest.approx(k)
        ids = trace.layer(layer).topk_ids
        assert row == pytest.approx((np.bincount(ids.reshape(-1), minlength=trace.num_experts) / len(ids)).tolist())
    code, w, err = run_cli("weights", "--trace", str(trace_dir))
    assert code == 0, err
    for entry in w["layers"]:
        weights = trace.layer(entry["layer"]).topk_weights
        assert entry["row_sum_mean"] == pytest.approx(float(weights.sum(1).mean()), rel=1e-5)
        assert entry["row_sum_mean"] < 1.0                                    # OLMoE does not renormalise
    code, a, err = run_cli("analyze", "--trace", str(trace_dir))
    assert code == 0, err
    assert a["layers"][0]["load"] == pytest.approx(heat["load"][0])


def test_context_window_full_context_matches_itself(native_model, run_cli):
    code, payload, err = run_cli("context-window", "-m", native_model, "-p", "If it rains, the grass gets wet.")
    assert code == 0, err
    full = payload["windows"][-1]
    assert full["window"] == payload["position"]
    assert all(v["jaccard"] == 1.0 and v["same_primary"] for v in full["layers"].values())


def test_chat_ablation_removes_the_expert_and_compare_reports_a_distance(native_model, run_cli):
    code, payload, err = run_cli("chat", "-m", native_model, "-p", "2 + 3 =", "--max-new-tokens", "4", "--ablate", "3")
    assert code == 0, err
    ids = np.array(payload["turns"][0]["topk_ids"])
    assert ids.size and not (ids == 3).any()
    code, payload, err = run_cli("compare", "-m", native_model, "--ablate", "3", "--max-new-tokens", "2")
    assert code == 0, err
    assert payload["loss"]["kl"] > 0 and 0 <= payload["loss"]["top1_agreement"] <= 1


def test_attention_pattern_rows_are_distributions(native_model, run_cli):
    code, payload, err = run_cli("attention-pattern", "-m", native_model, "-p", "the cat sat", "--position", "2")
    assert code == 0, err
    for head in payload["heads"]:
        assert sum(head["weights"]) == pytest.approx(1.0, abs=1e-4) and len(head["weights"]) == 3


@pytest.mark.parametrize("argv,message", [
    (["full-taxonomy", "--categories", "arithmetic,astrology"], "unknown category 'astrology'"),
    (["explore", "-p", "2 + 3", "--layer", "99"], "--layer 99 is out of range"),
    (["explore", "-p", "   "], "empty"),
    (["token-routing", "--token", "zzzz"], "--token 'zzzz' is not in the tokenizer's vocabulary"),
    (["token-routing", "--token", "the", "--contexts", "the man", "one two"], "does not occur in context(s) 'one two'"),
    (["chat", "-p", "the", "--ablate", "42"], "expert 42 is out of range"),
    (["chat", "-p", "the", "--top-k", "99"], "--top-k 99 is out of range"),
    (["compare", "-p", "the man", "--force", "0,1,2"], "--force names 3 experts but 2 are chosen per token"),
    (["ablate", "-p", "the man", "--ablate", "0,1,2,3,4,5,6"], "--ablate leaves 1 experts"),
    (["context-window", "-p", "the man", "--position", "7"], "--position 7 is out of range"),
])
def test_bad_input_is_one_clear_line(argv, message, other_family_model, run_cli):
    code, _, err = run_cli(*argv, "-m", other_family_model, output=False)
    assert code == 2 and message in err and "Traceback" not in err


def test_explore_repl_commands(other_family_model):
    import argparse

    from lazarus_core.cli.routing_common import Session
    from lazarus_core.cli.routing_explore import Explorer

    args = argparse.Namespace(model=other_family_model, revision=None, device="cpu", trust_remote_code=False,
                              lexicon=[], lexicon_replace=False, view="semantic", pos_tagger="none")
    ex = Explorer(Session(args), 1)
    assert ex.execute("the man is to the water") and ex.current.text == "the man is to the water"
    assert ex.execute("l 0") and ex.layer == 0
    assert ex.execute('c "one two three"') and ex.log[-1]["command"] == "compare"
    cmp = ex.log[-1]
    assert 0 <= cmp["overlap"] <= 1 and set(cmp["shared"]).isdisjoint(cmp["only_a"])
    assert ex.execute("a") and ex.execute("d 2") and ex.log[-1]["position"] == 2
    assert ex.execute("l 7") and ex.layer == 0                             # error printed, state kept
    assert ex.execute("d 99") and ex.log[-1]["command"] == "deep-dive" and ex.log[-1]["position"] == 2
    assert not ex.execute("q")


def test_reused_trace_gives_the_same_domain_test(native_model, run_cli, tmp_path):
    code, first, err = run_cli("domain-test", "-m", native_model, "--prompts-per-domain", "3", "--permutations", "0",
                               "--save-trace", str(tmp_path / "t"))
    assert code == 0, err
    code, again, err = run_cli("domain-test", "--trace", str(tmp_path / "t"), "--permutations", "0")
    assert code == 0, err
    assert [l["chi2"] for l in again["layers"]] == pytest.approx([l["chi2"] for l in first["layers"]])
    code, tax, err = run_cli("full-taxonomy", "--trace", str(tmp_path / "t"), "--view", "structural")
    assert code == 0, err
    assert tax["specialisation"]["view"] == "structural"
    # a reused trace's own labels (here the domains) become the categories
    assert {c["category"] for c in tax["categories_detail"]} == {"math", "code", "language", "reasoning"}
    assert all("→" in e["top_pattern"] for l in tax["specialisation"]["layers"] for e in l["experts"] if e["top_pattern"])


def test_lexicon_file_reaches_the_commands(other_family_model, run_cli, tmp_path):
    lex = tmp_path / "lex.txt"
    lex.write_text("[SYN]\nwater\n")
    code, payload, err = run_cli("explore", "-m", other_family_model, "-p", "the water", "--lexicon", str(lex))
    assert code == 0, err
    assert payload["log"][0]["types"]["semantic"] == ["SP", "FUNC", "SYN"]
    code, payload, err = run_cli("explore", "-m", other_family_model, "-p", "the water", "--lexicon", str(lex),
                                 "--lexicon-replace")
    assert payload["log"][0]["types"]["semantic"] == ["SP", "CW", "SYN"]   # 'the' is no longer known
    code, _, err = run_cli("explore", "-m", other_family_model, "-p", "x", "--lexicon", str(tmp_path / "nope.txt"),
                           output=False)
    assert code == 2 and "--lexicon file" in err


def test_explore_repl_reads_lines_and_keeps_history(other_family_model, monkeypatch, tmp_path, run_cli):
    lines = iter(["the water is long", "l 0", "a", "d 1", "q"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    monkeypatch.setenv("LAZARUS_EXPLORE_HISTORY", str(tmp_path / "history"))
    code, payload, err = run_cli("explore", "-m", other_family_model)
    assert code == 0, err
    assert [e["command"] for e in payload["log"]] == ["prompt", "all-layers", "deep-dive"] and payload["layer"] == 0
