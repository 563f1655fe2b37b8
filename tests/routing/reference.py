"""Hand-written, per-token routing and MoE-block forwards for every family: the oracle the tests compare to."""

from __future__ import annotations

import torch
import torch.nn.functional as F

SOFTMAX_FAMILIES = ("olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2")


def _groups(config, family):
    if family == "deepseek_v3" or (family == "deepseek_v2" and config.topk_method == "group_limited_greedy"):
        return int(config.n_group), int(config.topk_group)
    return 1, 1


def hand_route(config, logits_row, k, *, bias=None, ablate=(), delta=None, force=()):
    """Route ONE token: float64 logits [E] -> (weights, experts) lists sorted by weight, descending."""
    family = config.model_type
    E = logits_row.shape[0]
    l = logits_row.detach().double().clone()
    if delta is not None:
        l = l + delta.double()
    allowed = [e for e in range(E) if e not in ablate]
    n_group, topk_group = _groups(config, family)
    size = E // n_group
    if family == "gpt_oss":
        score = {e: float(l[e]) for e in allowed}           # select on raw logits (bias already inside)
        choice = dict(score)
    elif family == "deepseek_v3":
        score = {e: float(torch.sigmoid(l[e])) for e in allowed}
        choice = {e: score[e] + float(bias[e]) for e in allowed}
    else:
        z = torch.logsumexp(l[allowed], 0)                     # softmax over the experts that remain
        score = {e: float(torch.exp(l[e] - z)) for e in allowed}
        choice = dict(score)
    if n_group > 1:
        def group_score(g):
            vals = sorted((choice[e] for e in range(g * size, (g + 1) * size) if e in choice), reverse=True)
            if not vals:
                return float("-inf")
            return sum(vals[:2]) if family == "deepseek_v3" else vals[0]
        kept = sorted(range(n_group), key=lambda g: -group_score(g))[:topk_group]
        choice = {e: c for e, c in choice.items() if e // size in kept}
    forced = list(force)
    rest = sorted((e for e in choice if e not in forced), key=lambda e: -choice[e])
    chosen = forced + rest[: k - len(forced)]
    if family == "gpt_oss" or family == "mixtral":                    # softmax over the k chosen logits
        w = torch.softmax(torch.tensor([float(l[e]) for e in chosen], dtype=torch.float64), 0).tolist()
    elif family == "dbrx":                                            # the k scores over their p-norm
        w = [score[e] for e in chosen]
        p = config.ffn_config.moe_normalize_expert_weights
        if p is not None:
            norm = sum(x ** p for x in w) ** (1.0 / p)
            w = [x / norm for x in w]
    else:
        w = [score[e] for e in chosen]
        if getattr(config, "norm_topk_prob", False) and family != "deepseek_v2":
            total = sum(w)
            w = [x / total for x in w]
        w = [x * float(getattr(config, "routed_scaling_factor", 1.0) or 1.0) if family.startswith("deepseek") else x
             for x in w]
    pairs = sorted(zip(w, chosen), key=lambda p: -p[0])
    return [p[0] for p in pairs], [p[1] for p in pairs]


def expert_forward(block, e, h):
    """One routed expert applied to h [T, H] (float64), from the fused weights of the experts module."""
    ex = block.experts
    if hasattr(ex, "mlp"):  # DBRX: w1 (gate) / v1 (up) / w2 (down transposed), each [E*I, H]
        i = ex.ffn_hidden_size
        w1, v1, w2 = (getattr(ex.mlp, n)[e * i:(e + 1) * i].double() for n in ("w1", "v1", "w2"))
        return (F.silu(h @ w1.T) * (h @ v1.T)) @ w2
    if hasattr(ex, "gate_up_proj_bias"):  # GPT-OSS: transposed, interleaved gate/up, clamped SwiGLU
        gu = h @ ex.gate_up_proj[e].double() + ex.gate_up_proj_bias[e].double()
        gate, up = gu[..., ::2].clamp(max=ex.limit), gu[..., 1::2].clamp(-ex.limit, ex.limit)
        return ((up + 1) * gate * torch.sigmoid(gate * ex.alpha)) @ ex.down_proj[e].double() + ex.down_proj_bias[e].double()
    gate, up = (h @ ex.gate_up_proj[e].double().T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ ex.down_proj[e].double().T


@torch.no_grad()
def hand_block_forward(block, config, h, k, **route_kwargs):
    """MoE block output [T, H] (float64) for input h [T, H], routing each token with :func:`hand_route`."""
    h = h.double()
    router = getattr(block, "router", None) or block.gate
    router = getattr(router, "layer", router)  # DBRX: DbrxRouter.layer
    logits = h @ router.weight.double().T
    if getattr(router, "bias", None) is not None:
        logits = logits + router.bias.double()
    bias = getattr(router, "e_score_correction_bias", None)
    out = torch.zeros_like(h)
    routes = []
    for t in range(h.shape[0]):
        w, ids = hand_route(config, logits[t], k, bias=bias, **route_kwargs)
        routes.append(ids)
        for weight, e in zip(w, ids):
            out[t] += weight * expert_forward(block, e, h[t:t + 1])[0]
    x = h.float()
    if hasattr(block, "shared_expert"):  # Qwen2-MoE: sigmoid-gated shared expert
        out = out + (torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)).double()
    if hasattr(block, "shared_experts"):  # DeepSeek: always-on shared experts
        out = out + block.shared_experts(x).double()
    return out, routes


def record_routing(model, input_ids, handles=(), *, layers=None, logits=True):
    """``model(input_ids)`` under a :class:`RoutingRecorder` (no grad); the hook ``handles`` are removed
    afterwards, whatever happens. Returns the recorder's ``pop()``: ``{layer: LayerRouting}``."""
    from lazarus_core.routing.recorder import RoutingRecorder

    try:
        with RoutingRecorder(model, layers, logits=logits) as rec, torch.no_grad():
            model(input_ids)
            return rec.pop()
    finally:
        for h in handles:
            h.remove()


def block_io(model, layer, input_ids):
    """Run the model; return the MoE block's input [T, H], output [T, H] and recorded routing at ``layer``."""
    from lazarus_core.routing.locate import find_moe_layers

    block = find_moe_layers(model).layers[layer].block
    seen = {}
    handles = [block.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0].detach())),
               block.register_forward_hook(
                   lambda m, a, o: seen.__setitem__("out", (o[0] if isinstance(o, tuple) else o).detach()))]
    routing = record_routing(model, input_ids, handles, layers=[layer], logits=False)[layer]
    H = seen["in"].shape[-1]
    return seen["in"].reshape(-1, H), seen["out"].reshape(-1, H), routing


def assert_capture_matches_recomputation(model, input_ids):
    """Record routing with :class:`RoutingRecorder` and check it, per MoE layer, against (1) the router's
    raw logits recomputed from its input and weight, (2) the ids and weights the experts module received
    (own hooks), sorted by weight, and (3) the family's convention computed by hand, token by token."""
    from lazarus_core.routing.locate import find_moe_layers

    info = find_moe_layers(model)
    seen: dict[int, dict] = {l: {} for l in info.layers}
    handles = []
    for l, layer in info.layers.items():
        handles.append(layer.router.register_forward_pre_hook(lambda m, a, l=l: seen[l].__setitem__("x", a[0].detach())))
        handles.append(layer.experts.register_forward_pre_hook(
            lambda m, a, l=l: seen[l].update(ids=a[1].detach().clone(), w=a[2].detach().clone())))
    routed = record_routing(model, input_ids, handles)
    assert sorted(routed) == sorted(info.layers)
    for l, r in routed.items():
        router = info.layers[l].router
        x = seen[l]["x"].reshape(-1, router.weight.shape[1]).double()
        logits = x @ router.weight.detach().double().T
        if getattr(router, "bias", None) is not None:
            logits = logits + router.bias.detach().double()
        torch.testing.assert_close(r.logits.double(), logits, rtol=1e-5, atol=1e-5)
        order = seen[l]["w"].argsort(dim=1, descending=True)
        assert torch.equal(r.topk_ids, seen[l]["ids"].gather(1, order))
        assert torch.equal(r.topk_weights, seen[l]["w"].float().gather(1, order))
        assert (r.topk_weights[:, :-1] >= r.topk_weights[:, 1:]).all()
        for t in range(logits.shape[0]):
            w, ids = hand_route(model.config, logits[t], info.top_k, bias=getattr(router, "e_score_correction_bias", None))
            assert r.topk_ids[t].tolist() == ids
            torch.testing.assert_close(r.topk_weights[t].double(), torch.tensor(w, dtype=torch.float64),
                                       rtol=1e-5, atol=1e-6)
