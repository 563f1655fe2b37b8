"""The shipped demo models have the properties issue 5 promises, checked on the files with numpy.

Independent of the analysis code: the MXFP4 decoder, the spectra and the routing counts are written
here from DESIGN.md sections 4-5, and the router decisions come from hooks on the router modules.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from lazarus_core.models.builtin import BUILTIN_MODELS_DIR, list_builtin_models, resolve_builtin

NATIVE = BUILTIN_MODELS_DIR / "native"
UPCYCLED = BUILTIN_MODELS_DIR / "upcycled"
MODELS = {"demo:native": NATIVE, "demo:upcycled": UPCYCLED}
MAX_BYTES = 8_000_000
WINDOWS, SEQ = 16, 128

E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def decode_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """uint8 [..., G, 16] + uint8 [..., G] -> float64 [..., G*32] (low nibble = even element)."""
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)
    scale = np.where(scales == 0xFF, np.nan, np.ldexp(1.0, scales.astype(np.int64) - 127))
    return (E2M1[codes] * scale[..., None]).reshape(*scales.shape[:-1], scales.shape[-1] * 32)


def energy_rank_95(m: np.ndarray) -> int:
    s2 = np.linalg.svd(m, compute_uv=False) ** 2
    return int(np.searchsorted(np.cumsum(s2) / s2.sum(), 0.95) + 1)


def median_delta_rank_fraction(experts: np.ndarray) -> float:
    delta = experts - experts.mean(axis=0, keepdims=True)
    return float(np.median([energy_rank_95(d) for d in delta])) / min(experts.shape[1:])


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def test_registry_lists_both_aliases_from_the_shipped_dirs():
    models = {m.alias: m for m in list_builtin_models()}
    assert set(MODELS) <= set(models)
    assert models["demo:native"].family == "olmoe"
    assert models["demo:upcycled"].family == "gpt_oss"
    for alias, path in MODELS.items():
        assert resolve_builtin(alias) == path
        assert resolve_builtin(alias.upper()) == path
        m = models[alias]
        assert m.num_experts >= 8 and m.top_k >= 2 and 0 < m.size_bytes <= MAX_BYTES


@pytest.mark.parametrize("name", ["./some/dir", "allenai/OLMoE-1B-7B-0924", "demo:nope", ""])
def test_resolve_builtin_returns_none_for_non_aliases(name):
    assert resolve_builtin(name) is None


def test_cli_models_json_lists_aliases():
    from lazarus_core.cli.main import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["models", "--json"]) == 0
    listing = json.loads(buf.getvalue())
    rows = {r["alias"]: r for r in listing["models"]}
    families = {f["family"]: f for f in listing["families"]}
    assert set(families) == {"olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "gpt_oss",
                             "dbrx"}
    assert families["dbrx"]["architectures"] == ["DbrxForCausalLM"] and families["olmoe"]["model_types"] == ["olmoe"]
    for alias, family in (("demo:native", "olmoe"), ("demo:upcycled", "gpt_oss")):
        cfg = _config(MODELS[alias])
        assert rows[alias]["family"] == family
        assert rows[alias]["num_experts"] == cfg.get("num_experts", cfg.get("num_local_experts"))
        assert rows[alias]["top_k"] == cfg["num_experts_per_tok"]
        assert rows[alias]["size_bytes"] <= MAX_BYTES


@pytest.mark.parametrize("path", list(MODELS.values()), ids=list(MODELS))
def test_shipped_files_are_small_and_complete(path):
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
            "lazarus_builtin.json", "heldout.jsonl"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    assert sum(p.stat().st_size for p in path.iterdir()) <= MAX_BYTES
    cfg = _config(path)
    assert cfg["num_hidden_layers"] >= 4 and cfg["num_experts_per_tok"] >= 2
    assert cfg.get("num_experts", cfg.get("num_local_experts")) >= 8


def test_upcycled_checkpoint_is_stored_like_gpt_oss():
    cfg = _config(UPCYCLED)
    assert cfg["model_type"] == "gpt_oss" and cfg["quantization_config"]["quant_method"] == "mxfp4"
    E, H, I = cfg["num_local_experts"], cfg["hidden_size"], cfg["intermediate_size"]
    with safe_open(str(UPCYCLED / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for layer in range(cfg["num_hidden_layers"]):
            pre = f"model.layers.{layer}.mlp."
            for proj, (out, inp) in (("gate_up_proj", (2 * I, H)), ("down_proj", (H, I))):
                blocks, scales = f.get_slice(pre + f"experts.{proj}_blocks"), f.get_slice(pre + f"experts.{proj}_scales")
                assert blocks.get_shape() == [E, out, inp // 32, 16] and blocks.get_dtype() == "U8"
                assert scales.get_shape() == [E, out, inp // 32] and scales.get_dtype() == "U8"
                bias = f.get_slice(pre + f"experts.{proj}_bias")
                assert bias.get_shape() == [E, out] and bias.get_dtype() == "BF16"
                assert pre + f"experts.{proj}" not in keys
            assert f.get_slice(pre + "router.weight").get_shape() == [E, H]
            assert f.get_slice(pre + "router.bias").get_shape() == [E]
            assert pre.replace("mlp.", "self_attn.sinks") in keys


def _native_experts(layer: int, proj: str) -> np.ndarray:
    with safe_open(str(NATIVE / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        mats, e = [], 0
        while (n := f"model.layers.{layer}.mlp.experts.{e}.{proj}_proj.weight") in names:
            mats.append(f.get_tensor(n).double().numpy())
            e += 1
    return np.stack(mats)


def test_native_expert_deltas_are_high_rank():
    layers = _config(NATIVE)["num_hidden_layers"]
    for layer in range(layers):
        for proj in ("gate", "up", "down"):
            w = _native_experts(layer, proj)
            assert w.shape[0] >= 8
            frac = median_delta_rank_fraction(w)
            assert frac >= 0.40, f"layer {layer} {proj}: median 95%-energy rank fraction {frac:.3f} < 0.40"


def test_upcycled_expert_deltas_are_low_rank_after_mxfp4_decoding():
    layers = _config(UPCYCLED)["num_hidden_layers"]
    with safe_open(str(UPCYCLED / "model.safetensors"), "np") as f:
        for layer in range(layers):
            pre = f"model.layers.{layer}.mlp.experts."
            gate_up = decode_mxfp4(f.get_tensor(pre + "gate_up_proj_blocks"), f.get_tensor(pre + "gate_up_proj_scales"))
            down = decode_mxfp4(f.get_tensor(pre + "down_proj_blocks"), f.get_tensor(pre + "down_proj_scales"))
            # on disk [E, out, in]; gate/up rows interleaved (even = gate, odd = up)
            for proj, w in (("gate", gate_up[:, 0::2]), ("up", gate_up[:, 1::2]), ("down", down)):
                assert np.isfinite(w).all()
                frac = median_delta_rank_fraction(w)
                assert frac <= 0.15, f"layer {layer} {proj}: median 95%-energy rank fraction {frac:.3f} > 0.15"


# ------------------------------------------------------------------ running the models

def _heldout_windows(path: Path, tokenizer) -> torch.Tensor:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    with (path / "heldout.jsonl").open() as f:
        for line in f:
            ids += tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [eos]
            if len(ids) >= WINDOWS * SEQ:
                break
    return torch.tensor(ids[: WINDOWS * SEQ]).reshape(WINDOWS, SEQ)


@pytest.fixture(scope="module", params=list(MODELS), ids=list(MODELS))
def model_run(request, monkeypatch_module):
    """Load the model offline, run it on held-out windows, record each router's top-k choices."""
    from transformers import AutoTokenizer

    from lazarus_core.demo.load import load_causal_lm

    path = MODELS[request.param]
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = load_causal_lm(path)
    windows = _heldout_windows(path, tokenizer)
    topk: dict[int, list[np.ndarray]] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        router = layer.mlp.gate if hasattr(layer.mlp, "gate") else layer.mlp.router
        topk[i] = []
        # every router returns (router_logits, top_k_weights, top_k_index)
        handles.append(router.register_forward_hook(lambda m, a, out, i=i: topk[i].append(out[2].numpy())))
    with torch.no_grad():
        logits = torch.cat([model(input_ids=windows[s: s + 8]).logits for s in range(0, WINDOWS, 8)])
    for h in handles:
        h.remove()
    cfg = _config(path)
    return {"path": path, "windows": windows, "logits": logits, "vocab": len(tokenizer),
            "topk": {i: np.concatenate(v) for i, v in topk.items()},
            "num_experts": cfg.get("num_experts", cfg.get("num_local_experts")), "top_k": cfg["num_experts_per_tok"]}


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    yield mp
    mp.undo()


def test_routing_is_not_collapsed_on_heldout_text(model_run):
    E, k = model_run["num_experts"], model_run["top_k"]
    assert len(model_run["topk"]) >= 4
    for layer, ids in model_run["topk"].items():
        assert ids.shape == (WINDOWS * SEQ, k)
        share = np.bincount(ids.reshape(-1), minlength=E) / ids.size
        above = (share >= (1.0 / E) / 4).mean()
        assert above >= 0.75, f"layer {layer}: only {above:.0%} of experts get a quarter of the uniform share {share}"


def test_heldout_perplexity_is_far_below_unigram(model_run):
    windows, logits = model_run["windows"], model_run["logits"].double()
    targets = windows[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1))
    model_ppl = math.exp(float(nll))
    # unigram fitted on the very targets it is scored on: an optimistic bound for any unigram model
    counts = np.bincount(targets.reshape(-1).numpy(), minlength=model_run["vocab"]).astype(np.float64)
    p = counts[targets.reshape(-1).numpy()] / counts.sum()
    unigram_ppl = math.exp(-np.log(p).mean())
    assert model_ppl < 0.25 * unigram_ppl, (model_ppl, unigram_ppl)
    meta = json.loads((model_run["path"] / "lazarus_builtin.json").read_text())
    assert meta["heldout_perplexity"] < 0.25 * meta["unigram_perplexity"]


def test_transformers_loads_both_models_offline(monkeypatch_module):
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    for path in MODELS.values():
        tok = AutoTokenizer.from_pretrained(str(path))
        assert tok.decode(tok("If it rains, the grass gets wet.")["input_ids"]) == "If it rains, the grass gets wet."
    model = AutoModelForCausalLM.from_pretrained(str(NATIVE), dtype=torch.float32)
    assert type(model).__name__ == "OlmoeForCausalLM"
    from lazarus_core.demo.load import from_pretrained_kwargs

    dequantize = from_pretrained_kwargs(json.loads((UPCYCLED / "config.json").read_text()))
    assert dequantize["quantization_config"].dequantize  # as the model card tells users to load it
    if importlib.util.find_spec("accelerate") is None:
        # transformers dequantises MXFP4 on CPU only with `accelerate` installed; our loader needs nothing
        with pytest.raises(ImportError, match="accelerate"):
            AutoModelForCausalLM.from_pretrained(str(UPCYCLED), dtype=torch.float32, **dequantize)
        from lazarus_core.demo.load import load_causal_lm

        model = load_causal_lm(UPCYCLED)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(UPCYCLED), dtype=torch.float32, **dequantize)
    assert type(model).__name__ == "GptOssForCausalLM"
    # the loaded experts equal the independent decoder's (in-memory layout is [E, in, out])
    with safe_open(str(UPCYCLED / "model.safetensors"), "np") as f:
        pre = "model.layers.0.mlp.experts.gate_up_proj"
        ref = decode_mxfp4(f.get_tensor(pre + "_blocks"), f.get_tensor(pre + "_scales")).transpose(0, 2, 1)
    got = model.model.layers[0].mlp.experts.gate_up_proj.detach().double().numpy()
    np.testing.assert_array_equal(got, ref)
