"""Write a built-in model's README.md (model card) from its ``lazarus_builtin.json`` and ``config.json``.

    python -m lazarus_core.demo.card lazarus_core/builtin_models/native
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

_COMMON_CORPUS = """\
## Corpus

Built locally by `lazarus_core.demo.corpus.build_corpus(seed)` with no download: templated English
covering the routing-taxonomy categories (arithmetic with correct results, analogies, synonyms,
antonyms, comparisons, causation, conditionals, questions, negation, temporal words, quantifiers,
hypernyms), short templated prose, and Python source from the interpreter's standard library
(UTF-8 files only, at most 6,000 leading characters per file, 700,000 characters in all). Each
document goes to the held-out split with probability 5% (seeded). The held-out documents ship
beside the weights as `heldout.jsonl` (`{{"category", "text"}}` per line), a ready corpus for the
routing commands. The tokenizer is a byte-level BPE trained with `tokenizers` on the train split
(vocabulary {vocab}, `<|endoftext|>` ends every document).

| split | documents | characters |
|---|---|---|
| train | {train_documents} | {train_chars} |
| held-out | {heldout_documents} | {heldout_chars} |
"""

_NATIVE_HOW = """\
## How it was made

A native MoE: `OlmoeForCausalLM` with every expert initialised independently (normal, std 0.02)
and trained from scratch as an MoE, next-token loss plus the load-balancing loss
(`router_aux_loss_coef` {aux}, `output_router_logits=True`). AdamW (lr {lr}, betas 0.9/0.95,
weight decay 0.05 on matrices), warm-up then cosine decay, batch {batch} x {seq} tokens, {steps} steps,
fp32 on CPU (torch threads: {threads}). Stored in bf16 with per-expert tensors
(`model.layers.L.mlp.experts.N.{{gate,up,down}}_proj.weight`), as OLMoE checkpoints are.
"""

_UPCYCLED_HOW = """\
## How it was made

A pseudo-MoE made the way upcycled MoEs are made, in the GPT-OSS architecture (`GptOssForCausalLM`:
attention biases and sinks, alternating sliding/full attention, interleaved gate/up, clamped SwiGLU,
router with bias, softmax over the top-k logits).

1. **Dense** ({dense_steps} steps): a GPT-OSS with one expert and top-1 routing, i.e. a dense model{embed_init}.
2. **Upcycle**: its MLP (weights and biases) is copied into all {experts} experts (top-{top_k} routing); the
   router is new.
3. **Low-rank specialisation** ({moe_steps} steps): expert e's weight is parametrised as
   `base + A_e @ B_e` with rank {rank} per expert and per fused tensor (`gate_up_proj`, `down_proj`);
   `base` (shared), the factors, the per-expert biases, the router and the rest of the model are
   trained with {balance}.{qat} Then the experts are materialised and written in MXFP4.

**Why {experts} experts and top-{top_k}.** For overlay compression (`moe-overlay-*`): the overlay stores one
bf16 base per projection plus rank-{rank} factors per expert, and the base only pays once it is shared by
many experts (with 8 it alone cost as much as 3.8 MXFP4 experts); and the overlay recovers the noise-free
`base + A_e @ B_e`, so it differs from this file by the experts' MXFP4 rounding noise, which is independent
from expert to expert and averages over the {top_k} experts mixed per token.

**Why the low-rank structure survives MXFP4.** MXFP4 rounding adds full-rank noise to every expert
({noise}). Two choices keep the learned
differences far above it: (a) the factors start large, `||A_e B_e||_F = {init} ||base||_F`, carry
no weight decay, and a hinge penalty `sum relu({floor} - ||A_e B_e|| / ||base||)^2` keeps every delta
at least {floor} x the base norm (measured after training: min {rmin:.2f}, median {rmed:.2f}, max {rmax:.2f});
(b) the rank per expert is small ({rank}), so that `W_e - mean(W)` (the expert's own rank-{rank} term plus
1/E of the others') stays concentrated in few directions.

Training: AdamW (lr {lr}, betas 0.9/0.95), warm-up then cosine decay, batch {batch} x {seq} tokens,
fp32 on CPU (torch threads: {threads}).

**On disk**, exactly like the gpt-oss hub checkpoints: `model.layers.L.mlp.experts.gate_up_proj_blocks`
uint8 `[E, 2I, H/32, 16]` (gate/up rows interleaved: even = gate, odd = up), `..._scales` uint8
`[E, 2I, H/32]`, `down_proj_blocks` `[E, H, I/32, 16]`, `down_proj_scales` `[E, H, I/32]`, biases
bf16, every other tensor bf16, and `quantization_config = {{"quant_method": "mxfp4", ...}}` in
`config.json`.
"""

_LOADING = """\
## Loading

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(path)                                   # offline, no hub
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)     # fp32: bf16 is slow on CPU
```
{mxfp4_note}Or, wherever lazarus accepts a model: `-m {alias}`; in Python
`lazarus_core.models.builtin.resolve_builtin("{alias}")` gives this directory and
`lazarus_core.demo.load.load_causal_lm(path)` loads it (no `accelerate` needed).
"""

_MXFP4_NOTE = """\
For this MXFP4 checkpoint, pass `quantization_config=Mxfp4Config(dequantize=True)` (from transformers) as
well. Then transformers decodes the experts to dense weights on the CPU. Without it, transformers 5.25 and later
fetch Triton kernels from the Hub, which fails offline. Decoding needs the `accelerate` package
(`pip install accelerate`).
"""


def _qat_text(phase: dict) -> str:
    """Step 3's sentences on quantisation-aware training ('' when the run had none)."""
    if not phase.get("qat_consistency"):
        return ""
    text = ("\n   **Quantisation-aware**, as gpt-oss was post-trained with its experts in MXFP4: every step runs the batch "
            "with the clean experts `base + A_e @ B_e` and its first half again with their MXFP4 form "
            "`W + (Q(W) - W).detach()` (`Q` = MXFP4 quantise + dequantise along the input axis exactly as the file "
            "stores it; straight-through gradient), and minimises the mean of the two losses plus "
            f"{phase['qat_consistency']:g} x the symmetric KL divergence between their next-token distributions on "
            "that half, so that the file's MXFP4 experts and the noise-free low-rank experts an overlay recovers "
            "predict alike")
    if "clean_mxfp4_kl_first" in phase:
        text += (f" (that KL: {phase['clean_mxfp4_kl_first']:.1e} nats/token over the first 20 steps, "
                 f"{phase['clean_mxfp4_kl_final']:.1e} over the last 20)")
    text += "."
    if "heldout_loss_clean_experts" in phase:
        text += (f" Held-out loss with the clean fp32 experts before writing: "
                 f"{phase['heldout_loss_clean_experts']:.3f} nats/token.")
    return text


def _table(meta: dict) -> str:
    lines = ["| layer.projection | median 95%-energy rank | max rank | fraction |", "|---|---|---|---|"]
    for key, v in meta["delta_rank_95"].items():
        lines.append(f"| {key} | {v['median']:g} | {v['max_rank']} | {v['median_fraction']:.3f} |")
    return "\n".join(lines)


def _routing_table(meta: dict, num_experts: int) -> str:
    lines = ["| layer | experts with >= 1/4 of the uniform share | min share | max share |", "|---|---|---|---|"]
    for layer, r in meta["routing"].items():
        lines.append(f"| {layer} | {r['fraction_above_quarter_uniform']:.0%} | {r['min_share']:.3f} | "
                     f"{r['max_share']:.3f} |")
    return "\n".join(lines) + f"\n\n(uniform share = 1/{num_experts} = {1 / num_experts:.3f})"


def render_card(model_dir: Path) -> str:
    """Model card text for ``model_dir``."""
    meta = json.loads((model_dir / "lazarus_builtin.json").read_text())
    cfg = json.loads((model_dir / "config.json").read_text())
    size = meta["size"]
    kind = meta["kind"]
    experts = cfg.get("num_experts", cfg.get("num_local_experts"))
    total_bytes = sum(f.stat().st_size for f in model_dir.iterdir() if f.is_file() and f.name != "README.md")
    fmt = dict(aux=cfg["router_aux_loss_coef"], lr=size["lr"], batch=size["batch"], seq=size["seq"],
               steps=meta["steps"], threads=meta["torch_threads"], experts=experts, top_k=cfg["num_experts_per_tok"],
               alias=meta["alias"],
               vocab=cfg["vocab_size"], **meta["corpus"])
    arch = (f"| | |\n|---|---|\n| architecture | `{cfg['architectures'][0]}` (`{cfg['model_type']}`) |\n"
            f"| layers | {cfg['num_hidden_layers']} (all MoE) |\n| hidden / expert intermediate | "
            f"{cfg['hidden_size']} / {cfg['intermediate_size']} |\n| attention heads / kv heads | "
            f"{cfg['num_attention_heads']} / {cfg['num_key_value_heads']} |\n| experts / top-k | "
            f"{experts} / {cfg['num_experts_per_tok']} |\n| vocabulary | {cfg['vocab_size']} (byte-level BPE) |\n"
            f"| files | {total_bytes / 1e6:.2f} MB (plus this card) |")
    if kind == "native":
        how = _NATIVE_HOW.format(**fmt)
        rank_rule = "Native MoE: the median over experts is at least 40% of the maximum rank in every layer and projection."
        note = ""
    else:
        up = meta["phases"]["upcycled"]
        if "mxfp4_relative_error" in up:
            noise = (f"measured on these experts: {up['mxfp4_relative_error']:.1%} of the weights' norm, i.e. "
                     f"{up['mxfp4_relative_error'] ** 2:.2%} of their energy")
        else:
            noise = "about 12% of a Gaussian-like matrix's norm, i.e. about 1.4% of its energy"
        if up.get("balance_loss") == "per layer":
            balance = (f"a load-balancing loss computed for every layer separately and averaged (coefficient "
                       f"{cfg['router_aux_loss_coef']}; transformers' own loss pools the layers, which let the "
                       "first layers stay unbalanced in an earlier run)")
        else:
            balance = f"the load-balancing loss (`router_aux_loss_coef` {cfg['router_aux_loss_coef']})"
        embed_init = ""
        if size.get("embed_init_std") is not None:
            embed_init = (f"; token embeddings initialised with std {size['embed_init_std']:g} (the other weights "
                          f"{cfg['initializer_range']:g}), so that they, not layer 0's MoE output, set the scale "
                          "of the residual stream")
        how = _UPCYCLED_HOW.format(noise=noise, balance=balance, qat=_qat_text(up), embed_init=embed_init, dense_steps=meta["phases"]["dense"]["steps"], moe_steps=up["steps"],
                                   rank=up["delta_rank"], init=up["delta_init_ratio"], floor=up["delta_floor_ratio"],
                                   rmin=up["delta_ratio_min"], rmed=up["delta_ratio_median"], rmax=up["delta_ratio_max"],
                                   **fmt)
        rank_rule = ("Pseudo-MoE: after MXFP4 decoding, the median over experts is at most 15% of the maximum "
                     "rank on every projection (gate and up are the even and odd rows of `gate_up_proj`).")
        note = _MXFP4_NOTE
    dense_line = ""
    if "dense" in meta["phases"]:
        d = meta["phases"]["dense"]
        dense_line = (f"| dense model before upcycling | final train loss {d['final_train_loss']:.3f}, held-out loss "
                      f"{d['heldout_loss']:.3f} |\n")
    results = (
        "## Training and evaluation (measured on the shipped files)\n\n| | |\n|---|---|\n"
        f"| seed | {meta['seed']} |\n| steps | {meta['steps']} |\n"
        f"| training time | {meta['train_seconds'] / 60:.1f} min (whole script {meta['total_seconds'] / 60:.1f} min) |\n"
        f"| final train loss (mean of the last 20 steps) | {meta['final_train_loss']:.3f} |\n{dense_line}"
        f"| held-out loss | {meta['heldout_loss']:.3f} nats/token over {meta['heldout_tokens']} tokens |\n"
        f"| held-out perplexity | **{meta['heldout_perplexity']:.2f}** |\n"
        f"| unigram perplexity (add-one unigram fitted on train, same held-out tokens) | {meta['unigram_perplexity']:.1f} |\n"
    )
    props = (
        "## Properties (checked by `tests/demo/` on these files)\n\n"
        "**Routing is not collapsed** (held-out text, top-k assignments per expert, router hooks):\n\n"
        f"{_routing_table(meta, experts)}\n\n"
        f"**Expert-weight structure**: 95%-energy rank of `W_e - mean_e(W_e)` per expert, median over experts. "
        f"{rank_rule}\n\n{_table(meta)}\n"
    )
    reproduce = (f"## Reproduce\n\n```bash\npython -m lazarus_core.demo.train --model {kind} --out DIR --seed {meta['seed']}"
                 f" --steps {meta['steps']} --threads {meta['torch_threads']}\n```\n\n"
                 "Seeded end to end (corpus, tokenizer, initialisation, batches). With one torch thread two runs "
                 "write bit-identical files on the same machine and library versions (checked at the micro size); "
                 "another thread count, CPU or library version changes floating-point rounding, so the numbers "
                 "move slightly. The Python part of the corpus comes from the running interpreter's standard "
                 "library (here Python 3.11), so another Python version gives a slightly different corpus.\n")
    return "\n".join([f"# `{meta['alias']}`: {meta['description']}\n", arch + "\n", how, _COMMON_CORPUS.format(**fmt),
                      results, props, _LOADING.format(mxfp4_note=note, alias=meta["alias"]), reproduce])


def write_card(model_dir: Path) -> Path:
    path = Path(model_dir) / "README.md"
    path.write_text(render_card(Path(model_dir)))
    return path


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(write_card(Path(arg)))
