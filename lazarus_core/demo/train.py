"""Train the built-in demo models (the shipped weights are this script's output).

    python -m lazarus_core.demo.train --model native    --out lazarus_core/builtin_models/native
    python -m lazarus_core.demo.train --model upcycled  --out lazarus_core/builtin_models/upcycled
    python -m lazarus_core.demo.train --model native --out /tmp/x --micro     # CI: a few steps, seconds

native   : OLMoE (OlmoeForCausalLM), experts initialised independently, trained from scratch as an MoE
           with the load-balancing loss.
upcycled : GPT-OSS (GptOssForCausalLM). A dense model (one expert, top-1) is trained first; its MLP is
           copied into every expert; then each expert is trained as ``base + A_e @ B_e`` (rank-r factors,
           per expert) together with the router and the rest of the model, quantisation-aware (the clean
           and the MXFP4 form of the experts trained to agree); the experts are materialised and written in
           MXFP4 exactly like the gpt-oss checkpoints.

Everything is seeded (corpus, tokenizer, initialisation, batches); fp32 on CPU. With one torch thread
(the default) two runs give bit-identical files on the same machine and library versions.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from lazarus_core.demo.card import write_card
from lazarus_core.demo.corpus import EOS, build_corpus
from lazarus_core.demo.properties import delta_rank_summary, routing_balance, unigram_perplexity

METADATA_FILE = "lazarus_builtin.json"
HELDOUT_FILE = "heldout.jsonl"
DESCRIPTIONS = {
    "native": "Native MoE (OLMoE architecture): experts initialised independently and trained from scratch",
    "upcycled": "Upcycled pseudo-MoE (GPT-OSS architecture, MXFP4 experts): dense MLP copied into every "
                "expert, then per-expert low-rank differences trained",
}


@dataclass(frozen=True)
class Size:
    """Model and run dimensions."""

    hidden: int = 128
    intermediate: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    experts: int = 8
    top_k: int = 2
    vocab: int = 2048
    seq: int = 128
    batch: int = 8
    steps: int = 400
    lr: float = 3e-3
    templated_docs: int = 12000
    code_chars: int = 700_000
    eval_windows: int = 200
    delta_rank: int = 2
    aux_native: float = 0.02
    aux_upcycled: float = 0.1
    qat_consistency: float = 0.0  # upcycled: > 0 trains clean and MXFP4 experts together, this x their KL
    embed_init_std: float | None = None  # upcycled: token-embedding init std (None: the config's initializer_range)


# upcycled, for overlay compression of it (issue 9; moe-overlay-verify at --energy 0.99 on its held-out text):
# - 48 experts, so that one bf16 base per projection amortises: base + rank-2 factors is 4.57x smaller than the
#   MXFP4 experts (with 8 experts the base alone cost as much as 3.8 MXFP4 experts; 64 would break 8 MB);
# - the overlay recovers the noise-free `base + A_e @ B_e`, so it differs from the file by the experts' MXFP4
#   rounding noise, independent from expert to expert: top-20 averages it over 20 experts in the block output
#   (next-token agreement overlay vs file, measured on earlier runs: top-4 97.9-98.4%, top-12 98.8-98.9%,
#   top-20 99.3%);
# - token embeddings initialised at std 1 (norm ~11, the scale of the RMS-normalised activations): at std 0.02
#   they stayed at norm ~0.5, layer 0's MoE output (norm ~19) became the whole residual stream and its rounding
#   noise alone caused most of the argmax flips.
# - the clean and MXFP4 forms' symmetric KL weighted 2000x (quantisation-aware phase): measured on the whole held-out
#   split (45,875 tokens), overlay vs file top-1 agreement 99.10% at 50x, 99.32% at 500x and 99.64% at 2000x, with
#   6, 1 and 0 of its 22 slices of 2,032 tokens below 99%, for a held-out perplexity of 6.10, 6.36 and 7.07 (the
#   KL term penalises the logits' sensitivity to the rounding noise: their median difference std fell 0.028 -> 0.014).
FULL_SIZES = {"native": Size(steps=800),
              "upcycled": Size(experts=48, top_k=20, steps=800, qat_consistency=2000.0, embed_init_std=1.0)}
MICRO = Size(hidden=64, intermediate=64, heads=2, kv_heads=1, vocab=384, seq=32, batch=4, steps=6,
             templated_docs=300, code_chars=20_000, eval_windows=8, qat_consistency=50.0)


# ---------------------------------------------------------------- data

def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained with `tokenizers` on ``texts``; returns a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                   pad_token=EOS, model_max_length=512)


def encode_stream(tokenizer, docs: list[str]) -> np.ndarray:
    """Concatenate documents, each followed by EOS, into one int64 token stream."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    return np.asarray(ids, dtype=np.int64)


def eval_windows(stream: np.ndarray, seq: int, limit: int) -> torch.Tensor:
    """Non-overlapping windows ``[n, seq]`` from the start of ``stream`` (at most ``limit``)."""
    n = min(len(stream) // seq, limit)
    return torch.from_numpy(stream[: n * seq].reshape(n, seq).copy())


class BatchSampler:
    """Seeded random windows of the train stream."""

    def __init__(self, stream: np.ndarray, seq: int, batch: int, seed: int):
        self.stream = torch.from_numpy(stream)
        self.seq, self.batch = seq, batch
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self) -> torch.Tensor:
        starts = torch.randint(0, len(self.stream) - self.seq, (self.batch,), generator=self.gen)
        return torch.stack([self.stream[s: s + self.seq] for s in starts.tolist()])


# ---------------------------------------------------------------- models

def native_config(size: Size, vocab: int, eos: int):
    from transformers import OlmoeConfig

    return OlmoeConfig(vocab_size=vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
                       num_hidden_layers=size.layers, num_attention_heads=size.heads,
                       num_key_value_heads=size.heads, num_experts=size.experts,
                       num_experts_per_tok=size.top_k, norm_topk_prob=False, router_aux_loss_coef=size.aux_native,
                       max_position_embeddings=4 * size.seq, tie_word_embeddings=False,
                       bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)


def gpt_oss_config(size: Size, vocab: int, eos: int, experts: int, top_k: int):
    from transformers import GptOssConfig

    return GptOssConfig(vocab_size=vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
                        num_hidden_layers=size.layers, num_attention_heads=size.heads,
                        num_key_value_heads=size.kv_heads, head_dim=size.hidden // size.heads,
                        sliding_window=size.seq // 2,
                        layer_types=["sliding_attention", "full_attention"] * (size.layers // 2),
                        num_local_experts=experts, num_experts_per_tok=top_k, router_aux_loss_coef=size.aux_upcycled,
                        max_position_embeddings=4 * size.seq,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                        tie_word_embeddings=False, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)


def mxfp4_round_trip(w: torch.Tensor) -> torch.Tensor:
    """GPT-OSS experts ``[E, in, out]`` (in-memory layout) through MXFP4 and back, quantised along ``in``
    exactly as :func:`save_mxfp4_gpt_oss` writes them (backend "auto": the C++ kernel, bit-identical to the
    torch reference and about 3x faster, which matters when every training step quantises every expert)."""
    from lazarus_core.ops import mxfp4_dequant, mxfp4_quantize

    on_disk = w.detach().float().transpose(1, 2).contiguous()
    return mxfp4_dequant(*mxfp4_quantize(on_disk)).transpose(1, 2)


class LowRankExperts(torch.nn.Module):
    """Parametrisation of a fused expert tensor ``[E, rows, cols]`` as ``base + A_e @ B_e`` (rank r).

    With ``fake_quant`` set, the forward returns the MXFP4 round trip of that tensor with a straight-through
    gradient, ``W + (Q(W) - W).detach()`` (quantisation-aware training, as in gpt-oss post-training).
    """

    def __init__(self, base: torch.Tensor, experts: int, rank: int, ratio: float, gen: torch.Generator):
        super().__init__()
        rows, cols = base.shape
        self.base = torch.nn.Parameter(base.clone())
        # ||A_e B_e||_F ~ sqrt(rows*cols*r) * sigma^2: start every delta at `ratio` * ||base||_F
        sigma = math.sqrt(ratio * float(base.norm()) / math.sqrt(rows * cols * rank))
        self.A = torch.nn.Parameter(torch.randn(experts, rows, rank, generator=gen) * sigma)
        self.B = torch.nn.Parameter(torch.randn(experts, rank, cols, generator=gen) * sigma)
        self.fake_quant = False

    def delta(self) -> torch.Tensor:
        return self.A @ self.B

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        w = self.base.unsqueeze(0) + self.delta()
        if self.fake_quant:
            w = w + (mxfp4_round_trip(w) - w).detach()
        return w

    def delta_ratio(self) -> torch.Tensor:
        """``||A_e B_e||_F / ||base||_F`` per expert."""
        return self.delta().flatten(1).norm(dim=1) / self.base.norm()


LOW_RANK_EXPERTS = "lazarus_demo_low_rank"


def _low_rank_part(x: torch.Tensor, f: LowRankExperts, idx: torch.Tensor) -> torch.Tensor:
    """``x_tk @ A_e @ B_e`` for each token t and its k-th expert e = ``idx[t, k]``: x ``[T, in]`` or
    ``[T, k, in]`` -> ``[T, k, out]``, as two dense products over all experts' factors side by side."""
    experts, rows, rank = f.A.shape
    xa_all = x @ f.A.transpose(0, 1).reshape(rows, experts * rank)  # column e*r + j: x @ A_e[:, j]
    if x.dim() == 2:
        xa_all = xa_all[:, None].expand(-1, idx.shape[1], -1)
    cols = idx[..., None] * rank + torch.arange(rank)  # [T, k, r]
    spread = torch.zeros_like(xa_all).scatter(2, cols, xa_all.gather(2, cols))  # only e's r columns kept
    return spread @ f.B.reshape(experts * rank, -1)


def low_rank_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                             top_k_weights: torch.Tensor) -> torch.Tensor:
    """GPT-OSS experts forward on the clean ``base + A_e @ B_e`` parametrisation without forming any expert.

    The overlay algebra: ``x @ base`` once per token, plus each selected expert's rank-r term and bias, the
    clamped SwiGLU per expert, and the down projection's base applied once to the routing-weighted sum of the
    activations. Equal to transformers' forward on the materialised weights up to float rounding, at about the
    cost of a dense MLP whatever the top-k (registered as an experts implementation for training only).
    """
    gate_up, down = self.parametrizations.gate_up_proj[0], self.parametrizations.down_proj[0]
    x, idx, w = hidden_states, top_k_index, top_k_weights
    pre = (x @ gate_up.base)[:, None] + _low_rank_part(x, gate_up, idx) + self.gate_up_proj_bias[idx]
    act = self._apply_gate(pre)  # [T, k, I]
    mixed = torch.einsum("tk,tki->ti", w, act) @ down.base
    return mixed + torch.einsum("tk,tko->to", w, _low_rank_part(act, down, idx) + self.down_proj_bias[idx])


def upcycle(dense, size: Size, vocab: int, eos: int, gen: torch.Generator, ratio: float):
    """Copy a 1-expert GPT-OSS into an E-expert one whose experts are ``base + A_e @ B_e``."""
    from torch.nn.utils import parametrize
    from transformers import GptOssForCausalLM

    moe = GptOssForCausalLM(gpt_oss_config(size, vocab, eos, size.experts, size.top_k))
    dense_sd = dense.state_dict()
    own = moe.state_dict()
    for name, value in dense_sd.items():
        if ".mlp.experts." in name:
            own[name] = value.expand_as(own[name]).clone()  # every expert starts as the dense MLP
        elif ".mlp.router." not in name:
            own[name] = value
    moe.load_state_dict(own)
    factors = []
    for layer in moe.model.layers:
        experts = layer.mlp.experts
        for proj in ("gate_up_proj", "down_proj"):
            base = getattr(experts, proj)[0].detach()
            p = LowRankExperts(base, size.experts, size.delta_rank, ratio, gen)
            parametrize.register_parametrization(experts, proj, p, unsafe=True)
            getattr(experts.parametrizations, proj).original.requires_grad_(False)
            factors.append(p)
    return moe, factors


def materialise(moe) -> None:
    from torch.nn.utils import parametrize

    for layer in moe.model.layers:
        for proj in ("gate_up_proj", "down_proj"):
            parametrize.remove_parametrizations(layer.mlp.experts, proj, leave_parametrized=True)


# ---------------------------------------------------------------- training

def _optimizer(model, lr: float, no_decay_ids: set[int]):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in no_decay_ids or p.dim() < 2 or "norm" in name or "sinks" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8)


def per_layer_balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-style load-balancing loss computed for each MoE layer separately, then averaged.

    transformers' ``load_balancing_loss_func`` pools the counts and probabilities of all layers before
    taking their product, so one layer's imbalance can hide behind another's. Here every layer must be
    balanced on its own. Same scale: ``top_k`` when routing is uniform.
    """
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        num_experts = probs.shape[-1]
        chosen = torch.nn.functional.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).sum(1).float()
        losses.append(num_experts * (chosen.mean(0) * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def model_loss(model, x: torch.Tensor, per_layer_balance: bool = False):
    """One forward on the batch ``x``: (loss to minimise, next-token loss, balance term, logits).

    The balance term is transformers' own (``router_aux_loss_coef`` x the pooled loss) unless
    ``per_layer_balance``, which swaps it for :func:`per_layer_balance_loss` with the same coefficient.
    """
    out = model(input_ids=x, labels=x, output_router_logits=True)
    coef = model.config.router_aux_loss_coef
    loss, aux = out.loss, out.aux_loss
    lm = loss.detach() - (coef * aux.detach() if aux is not None else 0.0)
    if per_layer_balance and out.router_logits:
        aux = per_layer_balance_loss(out.router_logits, model.config.num_experts_per_tok)
        loss = loss - coef * out.aux_loss + coef * aux
    return loss, float(lm), float(aux.detach()) if aux is not None else 0.0, out.logits


def train_loop(model, sampler: BatchSampler, steps: int, lr: float, log, extra_loss=None,
               no_decay_ids: set[int] | None = None, label: str = "", per_layer_balance: bool = False,
               step_loss=None) -> list[float]:
    """AdamW with linear warm-up and cosine decay; returns the next-token loss of every step.

    Each step minimises :func:`model_loss` (or ``step_loss(model, x)``, same return values, when given)
    plus ``extra_loss()``.
    """
    model.train()
    opt = _optimizer(model, lr, no_decay_ids or set())
    warm = max(1, min(50, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    losses: list[float] = []
    t0 = time.time()
    for step in range(steps):
        x = sampler()
        if step_loss is None:
            loss, lm, aux, _ = model_loss(model, x, per_layer_balance)
        else:
            loss, lm, aux, _ = step_loss(model, x)
        if extra_loss is not None:
            loss = loss + extra_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(lm)
        if step % 50 == 0 or step == steps - 1:
            log(f"{label} step {step + 1}/{steps} lm loss {lm:.3f} aux {aux:.3f} {time.time() - t0:.0f}s")
    model.eval()
    return losses


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over every predicted position of ``windows``."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        x = windows[i: i + batch]
        logits = model(input_ids=x).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                reduction="sum")
        total += float(nll)
        count += x[:, 1:].numel()
    return total / count


@torch.no_grad()
def capture_topk(model, windows: torch.Tensor, batch: int = 16) -> dict[int, np.ndarray]:
    """Top-k expert ids per MoE layer on ``windows``, from hooks on each router module."""
    routers = {i: (layer.mlp.gate if hasattr(layer.mlp, "gate") else layer.mlp.router)
               for i, layer in enumerate(model.model.layers)}
    got: dict[int, list[np.ndarray]] = {i: [] for i in routers}
    handles = [r.register_forward_hook(lambda m, a, out, i=i: got[i].append(out[2].numpy()))
               for i, r in routers.items()]
    try:
        for s in range(0, len(windows), batch):
            model(input_ids=windows[s: s + batch])
    finally:
        for h in handles:
            h.remove()
    return {i: np.concatenate(v) for i, v in got.items()}


# ---------------------------------------------------------------- writing

def mxfp4_relative_error(model) -> float:
    """``||dequant(quant(W)) - W||_F / ||W||_F`` over every expert tensor of a GPT-OSS model."""
    err = ref = 0.0
    for layer in model.model.layers:
        for proj in ("gate_up_proj", "down_proj"):
            w = getattr(layer.mlp.experts, proj).detach().float()
            err += float((mxfp4_round_trip(w) - w).pow(2).sum())
            ref += float(w.pow(2).sum())
    return math.sqrt(err / ref)


def save_mxfp4_gpt_oss(model, out: Path) -> None:
    """Write a GPT-OSS model like the gpt-oss hub checkpoints: experts in MXFP4, everything else bf16.

    On disk the experts are ``[E, out, in]`` quantised along ``in``: ``gate_up_proj_blocks``
    uint8 ``[E, 2I, H/32, 16]`` (gate/up rows interleaved), ``gate_up_proj_scales`` ``[E, 2I, H/32]``,
    ``down_proj_blocks`` ``[E, H, I/32, 16]``, ``down_proj_scales`` ``[E, H, I/32]``; biases bf16.
    """
    from safetensors.torch import save_file

    from lazarus_core.ops import mxfp4_quantize

    tensors: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        if name.endswith(".mlp.experts.gate_up_proj") or name.endswith(".mlp.experts.down_proj"):
            blocks, scales = mxfp4_quantize(value.detach().float().transpose(1, 2).contiguous(), backend="torch")
            tensors[name + "_blocks"] = blocks.contiguous()
            tensors[name + "_scales"] = scales.contiguous()
        else:
            tensors[name] = value.detach().to(torch.bfloat16).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["dtype"] = "bfloat16"
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                   "model.embed_tokens", "lm_head"],
    }
    config["architectures"] = ["GptOssForCausalLM"]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_bf16(model, out: Path) -> None:
    """``save_pretrained`` in bf16 (per-expert tensors on disk, as on the hub)."""
    import copy

    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(str(out))


def load_shipped(out: Path):
    """Reload the written checkpoint as a user would (fp32 for CPU speed)."""
    from lazarus_core.demo.load import load_causal_lm

    return load_causal_lm(out)


def read_expert_matrices(out: Path, family: str, layers: int) -> dict[tuple[int, str], np.ndarray]:
    """Expert weights ``[E, out, in]`` per (layer, projection) straight from the safetensors file."""
    from safetensors import safe_open

    from lazarus_core.ops import mxfp4_dequant_reference

    result: dict[tuple[int, str], np.ndarray] = {}
    if family == "gpt_oss":
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys() if k.endswith(("_blocks", "_scales"))}
        for layer in range(layers):
            pre = f"model.layers.{layer}.mlp.experts."
            for proj in ("gate_up_proj", "down_proj"):
                w = mxfp4_dequant_reference(sd[pre + proj + "_blocks"], sd[pre + proj + "_scales"]).numpy()
                if proj == "gate_up_proj":
                    result[(layer, "gate")] = w[:, 0::2]
                    result[(layer, "up")] = w[:, 1::2]
                else:
                    result[(layer, "down")] = w
        return result
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        for layer in range(layers):
            for proj in ("gate", "up", "down"):
                mats, e = [], 0
                while (n := f"model.layers.{layer}.mlp.experts.{e}.{proj}_proj.weight") in names:
                    mats.append(f.get_tensor(n).float().numpy())
                    e += 1
                result[(layer, proj)] = np.stack(mats)
    return result


def measure(out: Path, family: str, size: Size, heldout: torch.Tensor, unigram_ppl: float) -> dict:
    model = load_shipped(out)
    loss = heldout_loss(model, heldout)
    topk = capture_topk(model, heldout)
    num_experts = size.experts
    routing = {str(layer): routing_balance(ids, num_experts) for layer, ids in topk.items()}
    ranks = {f"{layer}.{proj}": delta_rank_summary(w) for (layer, proj), w in
             read_expert_matrices(out, family, size.layers).items()}
    return {
        "heldout_loss": loss, "heldout_perplexity": math.exp(loss), "unigram_perplexity": unigram_ppl,
        "heldout_tokens": int(heldout[:, 1:].numel()),
        "routing": routing,
        "routing_min_fraction_above_quarter_uniform": min(r["fraction_above_quarter_uniform"] for r in routing.values()),
        "delta_rank_95": {k: {"median": v["median"], "max_rank": v["max_rank"],
                              "median_fraction": round(v["median_fraction"], 4), "ranks": v["ranks"]}
                          for k, v in ranks.items()},
        "delta_rank_95_median_fraction_min": min(v["median_fraction"] for v in ranks.values()),
        "delta_rank_95_median_fraction_max": max(v["median_fraction"] for v in ranks.values()),
    }


# ---------------------------------------------------------------- main

def run(kind: str, out: Path, size: Size, seed: int, log=print) -> dict:
    """Build corpus and tokenizer, train ``kind``, write the checkpoint and its metadata to ``out``."""
    from transformers import GptOssForCausalLM, OlmoeForCausalLM

    torch.manual_seed(seed)
    t_start = time.time()
    corpus = build_corpus(seed, templated_docs=size.templated_docs, code_chars=size.code_chars)
    tokenizer = train_tokenizer(corpus.train, size.vocab)
    vocab = len(tokenizer)
    eos = tokenizer.convert_tokens_to_ids(EOS)
    train_ids = encode_stream(tokenizer, corpus.train)
    heldout_ids = encode_stream(tokenizer, corpus.heldout)
    heldout = eval_windows(heldout_ids, size.seq, size.eval_windows)
    unigram_ppl = unigram_perplexity(train_ids, heldout[:, 1:].reshape(-1).numpy(), vocab)
    log(f"corpus {corpus.stats()['train_chars']} chars, {len(train_ids)} train tokens, vocab {vocab}, "
        f"unigram ppl {unigram_ppl:.1f} ({time.time() - t_start:.1f}s)")
    sampler = BatchSampler(train_ids, size.seq, size.batch, seed)
    gen = torch.Generator().manual_seed(seed + 17)
    phases: dict[str, dict] = {}
    t_train = time.time()
    if kind == "native":
        torch.manual_seed(seed)
        model = OlmoeForCausalLM(native_config(size, vocab, eos))
        losses = train_loop(model, sampler, size.steps, size.lr, log, label="native")
        phases["moe"] = {"steps": size.steps, "final_train_loss": float(np.mean(losses[-20:]))}
        final_train_loss = phases["moe"]["final_train_loss"]
        train_seconds = time.time() - t_train
        out.mkdir(parents=True, exist_ok=True)
        save_bf16(model, out)
        family = "olmoe"
    elif kind == "upcycled":
        ratio, floor = 0.8, 0.6
        dense_steps = size.steps * 3 // 8
        moe_steps = size.steps - dense_steps
        torch.manual_seed(seed)
        dense = GptOssForCausalLM(gpt_oss_config(size, vocab, eos, experts=1, top_k=1))
        if size.embed_init_std is not None:
            torch.nn.init.normal_(dense.model.embed_tokens.weight, std=size.embed_init_std)
        losses = train_loop(dense, sampler, dense_steps, size.lr, log, label="dense")
        phases["dense"] = {"steps": dense_steps, "final_train_loss": float(np.mean(losses[-20:])),
                           "heldout_loss": heldout_loss(dense, heldout)}
        model, factors = upcycle(dense, size, vocab, eos, gen, ratio)
        no_decay = {id(p) for f in factors for p in (f.A, f.B)}

        def keep_deltas_above_floor() -> torch.Tensor:
            # hinge: only active while some expert's delta falls below `floor` * ||base||
            return sum(torch.relu(floor - f.delta_ratio()).pow(2).sum() for f in factors)

        kl_log: list[float] = []

        from transformers.integrations.moe import ExpertsInterface

        ExpertsInterface.register(LOW_RANK_EXPERTS, low_rank_experts_forward)
        default_experts = model.config._experts_implementation

        def clean_and_mxfp4_loss(model, x):
            # quantisation-aware training: every step runs the experts in both forms, clean `base + A_e B_e`
            # (the low-rank forward) on the whole batch and its MXFP4 round trip (straight-through, transformers'
            # own forward on the full weights; the costly pass) on the batch's first half, and adds the two
            # forms' symmetric KL on that half so that they agree
            forms = []
            for fake_quant, experts, rows in ((False, LOW_RANK_EXPERTS, len(x)), (True, default_experts, len(x) // 2)):
                model.config._experts_implementation = experts
                for f in factors:
                    f.fake_quant = fake_quant
                forms.append(model_loss(model, x[:rows], per_layer_balance=True))
            (loss_c, lm_c, aux_c, logits_c), (loss_q, _, aux_q, logits_q) = forms
            lp_c, lp_q = logits_c[: len(logits_q)].float().log_softmax(-1), logits_q.float().log_softmax(-1)
            kl = 0.5 * ((lp_c.exp() * (lp_c - lp_q)).sum(-1) + (lp_q.exp() * (lp_q - lp_c)).sum(-1)).mean()
            kl_log.append(float(kl.detach()))
            return 0.5 * (loss_c + loss_q) + size.qat_consistency * kl, lm_c, 0.5 * (aux_c + aux_q), logits_c

        losses = train_loop(model, sampler, moe_steps, size.lr, log, extra_loss=keep_deltas_above_floor,
                            no_decay_ids=no_decay, label="upcycled", per_layer_balance=True,
                            step_loss=clean_and_mxfp4_loss if size.qat_consistency > 0 else None)
        model.config._experts_implementation = default_experts
        for f in factors:
            f.fake_quant = False
        ratios = torch.cat([f.delta_ratio().detach() for f in factors])
        phases["upcycled"] = {"steps": moe_steps, "final_train_loss": float(np.mean(losses[-20:])),
                              "balance_loss": "per layer", "delta_rank": size.delta_rank, "delta_init_ratio": ratio, "delta_floor_ratio": floor,
                              "delta_ratio_min": float(ratios.min()), "delta_ratio_median": float(ratios.median()),
                              "delta_ratio_max": float(ratios.max()),
                              "qat_consistency": size.qat_consistency}
        if kl_log:
            phases["upcycled"]["clean_mxfp4_kl_first"] = float(np.mean(kl_log[:20]))
            phases["upcycled"]["clean_mxfp4_kl_final"] = float(np.mean(kl_log[-20:]))
        final_train_loss = phases["upcycled"]["final_train_loss"]
        materialise(model)
        train_seconds = time.time() - t_train
        phases["upcycled"]["heldout_loss_clean_experts"] = heldout_loss(model, heldout)  # fp32, before MXFP4
        phases["upcycled"]["mxfp4_relative_error"] = mxfp4_relative_error(model)
        save_mxfp4_gpt_oss(model, out)
        family = "gpt_oss"
    else:
        raise ValueError(f"unknown model kind {kind!r}; expected 'native' or 'upcycled'")
    tokenizer.save_pretrained(str(out))
    with (out / HELDOUT_FILE).open("w") as f:
        for cat, text in zip(corpus.heldout_categories, corpus.heldout):
            f.write(json.dumps({"category": cat, "text": text}) + "\n")
    props = measure(out, family, size, heldout, unigram_ppl)
    meta = {
        "alias": f"demo:{kind}", "description": DESCRIPTIONS[kind],
        "kind": kind, "family": family, "seed": seed, "size": size.__dict__,
        "steps": size.steps, "phases": phases, "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t_start, 1), "torch_threads": torch.get_num_threads(),
        "final_train_loss": final_train_loss, "corpus": corpus.stats(),
        **props,
    }
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    for f in out.iterdir():
        f.chmod(0o644)
    write_card(out)
    log(f"done: held-out ppl {props['heldout_perplexity']:.2f} vs unigram {unigram_ppl:.1f}; "
        f"rank fraction {props['delta_rank_95_median_fraction_min']:.3f}..{props['delta_rank_95_median_fraction_max']:.3f}; "
        f"routing {props['routing_min_fraction_above_quarter_uniform']:.2f}")
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("native", "upcycled"), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the size's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--micro", action="store_true", help="tiny model, tiny corpus, a few steps (CI)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1, the default, is bit-for-bit repeatable; more change reduction order)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = MICRO if args.micro else FULL_SIZES[args.model]
    if args.steps is not None:
        size = replace(size, steps=args.steps)
    run(args.model, args.out, size, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
