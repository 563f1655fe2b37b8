"""What the router of a layer is made of: hooks that record its attention output, residual input, norm and routing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from lazarus_core.routing.locate import MoeModelInfo

NORM_RULE = ("router input h = g * (r + a) / rms(r + a), rms(x) = sqrt(mean(x^2) + eps), with r the decoder layer's "
             "input (the residual stream) and a its self-attention output; the router logits z = W h (+ b) are split "
             "exactly, with rms fixed at each token (the RMSNorm linearised there), into W (g * r / rms) and "
             "W (g * a / rms) (+ b)")


@dataclass
class LayerAttentionFeatures:
    """One MoE layer's router input and its parts at every recorded token.

    Attributes
    ----------
    layer : int
        Model layer index.
    residual : np.ndarray
        float32 [t, H], r: the decoder layer's input (the residual stream before attention).
    attention : np.ndarray
        float32 [t, H], a: the self-attention block's output at the position.
    router_input : np.ndarray
        float32 [t, H], h: the post-attention norm's output, which the router and experts see.
    inv_rms : np.ndarray
        float32 [t], 1 / sqrt(mean((r + a)^2) + eps) of the post-attention RMSNorm.
    norm_weight : np.ndarray
        float32 [H], g of the post-attention RMSNorm.
    router_weight : np.ndarray
        float32 [E, H], W.
    router_bias : np.ndarray or None
        float32 [E], b (GPT-OSS), else None.
    logits : np.ndarray
        float32 [t, E], the router's raw output as recorded (before softmax/sigmoid).
    topk_ids : np.ndarray
        int64 [t, k], experts sorted by weight, descending.
    topk_weights : np.ndarray
        float32 [t, k], the weights the experts module received, same order.
    """

    layer: int
    residual: np.ndarray
    attention: np.ndarray
    router_input: np.ndarray
    inv_rms: np.ndarray
    norm_weight: np.ndarray
    router_weight: np.ndarray
    router_bias: np.ndarray | None
    logits: np.ndarray
    topk_ids: np.ndarray
    topk_weights: np.ndarray


@dataclass
class AttentionFeatures:
    """Per-layer attention features of a set of token windows, in window order.

    Attributes
    ----------
    token_ids, doc_ids, positions : np.ndarray
        int64 [t] each: token, document and position in its window.
    rows : np.ndarray
        int64 [t], each token's row in the trace it came from (``arange(t)`` without a trace).
    layers : dict[int, LayerAttentionFeatures]
    """

    token_ids: np.ndarray
    doc_ids: np.ndarray
    positions: np.ndarray
    rows: np.ndarray
    layers: dict[int, LayerAttentionFeatures]


def trace_windows(trace, max_tokens: int | None = None) -> list[tuple[int, int]]:
    """The windows the model saw when ``trace`` was captured, as ``(start, end)`` trace rows.

    A window starts where ``positions`` is 0 (a new sequence); windows are kept whole, in order, until
    ``max_tokens`` is reached (at least one window).
    """
    positions = np.asarray(trace.positions)
    starts = np.flatnonzero(positions == 0)
    if len(starts) == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts])
    ends = np.concatenate([starts[1:], [len(positions)]])
    out, total = [], 0
    for a, b in zip(starts.tolist(), ends.tolist()):
        if out and max_tokens is not None and total + (b - a) > max_tokens:
            break
        out.append((a, b))
        total += b - a
    return out


def _post_attention_norm(block, layer: int):
    if getattr(block, "norm_attn_norm", None) is not None:  # DBRX: LayerNorm(r + a), mean removed
        raise ValueError(f"layer {layer}: DBRX's router input is a LayerNorm of r + a (norm_attn_norm.norm_2); the "
                         "split into residual and attention parts is implemented for RMSNorm only")
    norm = getattr(block, "post_attention_layernorm", None)
    if norm is None or getattr(norm, "weight", None) is None:
        raise ValueError(f"layer {layer} has no post_attention_layernorm with a weight: the router input cannot be "
                         "split into residual and attention parts")
    eps = next((float(getattr(norm, n)) for n in ("variance_epsilon", "eps") if hasattr(norm, n)), None)
    if eps is None:
        raise ValueError(f"layer {layer}: the post-attention norm {type(norm).__name__} has no epsilon; not an RMSNorm")
    return norm, eps


def attention_features(model, windows: Sequence[Sequence[int]], layers: Sequence[int], *,
                       doc_ids: Sequence[int] | None = None, rows: Sequence[Sequence[int]] | None = None,
                       info: MoeModelInfo | None = None, batch_size: int = 8,
                       progress: Callable[[int], None] | None = None) -> AttentionFeatures:
    """Run the model over token windows and record, per MoE layer, the parts of the router input.

    Hooks: a forward pre-hook on decoder layer L (its input r), a forward hook on its ``self_attn`` (the
    attention output a), hooks on its ``post_attention_layernorm`` (input and output h) and the
    :class:`~lazarus_core.routing.RoutingRecorder` (raw logits and routing). Windows are right-padded in
    batches with an attention mask; padding rows are dropped. The norm is checked to be an RMSNorm
    (h = g * x / rms(x) to 1e-3 relative) and its input to equal r + a.

    Parameters
    ----------
    model : nn.Module
        A transformers MoE causal LM (fp32 recommended).
    windows : sequence of sequence of int
        Token ids of each window (each a separate sequence, positions from 0).
    layers : sequence of int
        MoE layers (model layer indices).
    doc_ids : sequence of int, optional
        Document of each window (default: the window index).
    rows : sequence of sequence of int, optional
        Trace rows of each window's tokens (default: consecutive from 0).
    info : MoeModelInfo, optional
    batch_size : int
        Windows per forward pass.
    progress : callable, optional
        Called with the number of tokens done after each batch.

    Returns
    -------
    AttentionFeatures

    Raises
    ------
    ValueError
        No windows, a layer without ``self_attn`` / RMSNorm, or a decoder whose norm input is not r + a.
    """
    import torch

    from lazarus_core.routing.capture import decoder_of
    from lazarus_core.routing.locate import attention_module, decoder_blocks, find_moe_layers
    from lazarus_core.routing.recorder import RoutingRecorder

    windows = [list(map(int, w)) for w in windows if len(w)]
    if not windows:
        raise ValueError("no tokens to run: the corpus is empty")
    info = info or find_moe_layers(model)
    layers = sorted(info.select(list(layers)))
    decoder = decoder_of(model)
    blocks = decoder_blocks(decoder)
    doc_ids = list(range(len(windows))) if doc_ids is None else [int(d) for d in doc_ids]
    if rows is None:
        offsets = np.cumsum([0] + [len(w) for w in windows])
        rows = [np.arange(offsets[i], offsets[i + 1]) for i in range(len(windows))]
    store = {l: {"r": [], "a": [], "x": [], "h": []} for l in layers}
    keep_mask: list = [None]
    handles = []

    def grab(l, key, value):
        value = value[0] if isinstance(value, tuple) else value
        store[l][key].append(value.detach().reshape(-1, value.shape[-1])[keep_mask[0]].float().cpu())

    def _grab_norm(l, x, h) -> None:          # a forward hook that returns None leaves the output alone
        grab(l, "x", x)
        grab(l, "h", h)

    norms = {}
    for l in layers:
        block = blocks[l]
        attn = attention_module(block)
        if attn is None:
            raise ValueError(f"layer {l} has no self-attention module")
        norm, eps = _post_attention_norm(block, l)
        norms[l] = (norm, eps)
        handles.append(block.register_forward_pre_hook(
            lambda m, args, kwargs, l=l: grab(l, "r", args[0] if args else kwargs["hidden_states"]), with_kwargs=True))
        handles.append(attn.register_forward_hook(lambda m, args, out, l=l: grab(l, "a", out)))
        handles.append(norm.register_forward_hook(lambda m, args, out, l=l: _grab_norm(l, args[0], out)))
    device = next(model.parameters()).device
    pad_id = int(getattr(model.config, "pad_token_id", None) or 0)
    routed = {l: [] for l in layers}
    done = 0
    try:
        with RoutingRecorder(model, layers, logits=True, info=info) as rec, torch.inference_mode():
            for start in range(0, len(windows), batch_size):
                batch = windows[start:start + batch_size]
                longest = max(len(w) for w in batch)
                ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), longest), dtype=torch.long)
                for i, w in enumerate(batch):
                    ids[i, :len(w)] = torch.tensor(w)
                    mask[i, :len(w)] = 1
                keep_mask[0] = mask.reshape(-1).bool().to(device)
                decoder(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                keep = keep_mask[0]
                for l, r in rec.pop().items():
                    routed[l].append((r.topk_ids[keep].cpu(), r.topk_weights[keep].cpu(), r.logits[keep].float().cpu()))
                done += int(mask.sum())
                if progress is not None:
                    progress(done)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for l in layers:
        cat = {k: torch.cat(v).numpy() for k, v in store[l].items()}
        r, a, x, h = cat["r"], cat["a"], cat["x"], cat["h"]
        norm, eps = norms[l]
        scale = float(np.abs(x).max()) or 1.0
        if np.abs(x - (r + a)).max() > 1e-3 * scale:
            raise ValueError(f"layer {l}: the post-attention norm's input is not residual + attention output; this "
                             "decoder layer does not have the standard pre-norm layout")
        inv_rms = 1.0 / np.sqrt((x.astype(np.float64) ** 2).mean(1) + eps)
        g = norm.weight.detach().float().cpu().numpy()
        lin = (g[None, :] * x * inv_rms[:, None]).astype(np.float32)
        if np.abs(lin - h).max() > 1e-3 * (float(np.abs(h).max()) or 1.0):
            raise ValueError(f"layer {l}: the post-attention norm {type(norm).__name__} is not an RMSNorm "
                             "(g * x / rms(x)); the logit decomposition needs one")
        router = info.layers[l].router
        bias = getattr(router, "bias", None)
        ids = torch.cat([p[0] for p in routed[l]]).numpy().astype(np.int64)
        weights = torch.cat([p[1] for p in routed[l]]).numpy().astype(np.float32)
        logits = torch.cat([p[2] for p in routed[l]]).numpy().astype(np.float32)
        out[l] = LayerAttentionFeatures(l, r, a, h, inv_rms.astype(np.float32), g.astype(np.float32),
                                        router.weight.detach().float().cpu().numpy(),
                                        None if bias is None else bias.detach().float().cpu().numpy(),
                                        logits, ids, weights)
    token_ids = np.concatenate([np.asarray(w, np.int64) for w in windows])
    docs = np.concatenate([np.full(len(w), d, np.int64) for w, d in zip(windows, doc_ids)])
    positions = np.concatenate([np.arange(len(w), dtype=np.int64) for w in windows])
    return AttentionFeatures(token_ids, docs, positions, np.concatenate([np.asarray(r, np.int64) for r in rows]), out)


def attention_features_for_trace(model, trace, layers: Sequence[int], *, max_tokens: int | None = None,
                                 info: MoeModelInfo | None = None, batch_size: int = 8,
                                 progress: Callable[[int], None] | None = None) -> AttentionFeatures:
    """:func:`attention_features` over the windows of a trace (the sequences it was captured from).

    Parameters
    ----------
    model : nn.Module
    trace : Trace
        Its token ids, documents and window starts (``positions == 0``) give the windows.
    layers : sequence of int
    max_tokens : int, optional
        Use whole windows up to this many tokens.
    info, batch_size, progress
        As for :func:`attention_features`.

    Returns
    -------
    AttentionFeatures
        ``rows`` index the trace, so ``trace.layer(L).topk_ids[features.rows]`` are the recorded routing.
    """
    spans = trace_windows(trace, max_tokens)
    token_ids, doc_ids = np.asarray(trace.token_ids), np.asarray(trace.doc_ids)
    return attention_features(model, [token_ids[a:b] for a, b in spans], layers,
                              doc_ids=[int(doc_ids[a]) for a, _ in spans], rows=[np.arange(a, b) for a, b in spans],
                              info=info, batch_size=batch_size, progress=progress)
