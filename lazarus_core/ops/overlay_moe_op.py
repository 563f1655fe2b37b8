"""The overlay MoE forward as a registered custom op (``lazarus::overlay_moe``): it backpropagates (a backward
through the factors, never forming ``W_e``) and ``torch.compile`` traces it without a graph break.

The op takes tensors only: an :class:`OverlayExperts` is flattened generically (its tensor fields into a list,
the rest into a spec string), so a change of the layout's fields needs no change here.

Backward, per (token t, slot k) pair with expert e, weight w and ``d = W_d h + b_d`` the expert output
(``W_p = base_p + A_p[e] B_p[e]``, applied factor by factor)::

    dL/dw  = <gy_t, d> = <base_d^T gy_t, h> + <A_d[e]^T gy_t, B_d[e] h> + <gy_t, b_d[e]>
    dL/dh  = w (base_d^T gy_t + B_d[e]^T (A_d[e]^T gy_t))
    dL/dg, dL/du = dL/dh * act'(g, u)           (g, u recomputed from x)
    dL/dx_t = sum_k base_gu^T [dg; du] + B_g[e]^T (A_g[e]^T dg) + B_u[e]^T (A_u[e]^T du)

``base_d^T gy`` and the base part of ``dL/dx`` are one dense GEMM over tokens each; the low-rank terms run per
expert on its pairs. The overlay tensors are frozen: no parameter gradients.
"""

from __future__ import annotations

import dataclasses

import torch

from lazarus_core.ops.overlay_moe import OverlayExperts, overlay_moe_forward, overlay_moe_forward_reference

OP_NAME = "lazarus::overlay_moe"
BACKWARD_OP_NAME = "lazarus::overlay_moe_backward"
_SEP, _KV = ";", "="


def flatten_overlay(experts: OverlayExperts) -> tuple[list[torch.Tensor], str]:
    """``(tensors, spec)``: the tensor fields of ``experts`` in field order, and a string with every field's
    kind (``t`` tensor, ``n`` None, ``s`` str, ``f`` float, ``i`` int, ``b`` bool) and non-tensor value.

    Traceable by ``torch.compile`` (no graph break): plain attribute reads and string formatting.

    Raises
    ------
    TypeError
        A field of a kind the spec cannot carry (a non-tensor, non-scalar value).
    """
    tensors: list[torch.Tensor] = []
    parts: list[str] = []
    for field in dataclasses.fields(experts):
        value = getattr(experts, field.name)
        if isinstance(value, torch.Tensor):
            tensors.append(value)
            parts.append(field.name + _KV + "t")
        elif value is None:
            parts.append(field.name + _KV + "n")
        elif isinstance(value, bool):
            parts.append(field.name + _KV + "b" + ("1" if value else "0"))
        elif isinstance(value, int):
            parts.append(field.name + _KV + "i" + str(value))
        elif isinstance(value, float):
            parts.append(field.name + _KV + "f" + repr(value))
        elif isinstance(value, str) and _SEP not in value and _KV not in value:
            parts.append(field.name + _KV + "s" + value)
        else:
            raise TypeError(f"OverlayExperts.{field.name}: a {type(value).__name__} cannot pass through the "
                            f"{OP_NAME} op (tensors, None, str, int, float and bool can)")
    return tensors, _SEP.join(parts)


def unflatten_overlay(tensors: list[torch.Tensor], spec: str) -> OverlayExperts:
    """The :class:`OverlayExperts` that :func:`flatten_overlay` flattened.

    Built through ``OverlayExperts.__post_init__``, whose validation recognises tensors it has validated
    before (:func:`~lazarus_core.ops.overlay_validate.validate_overlay_experts`): the per-call cost is one
    lookup, not a second check.

    Raises
    ------
    ValueError, TypeError
        ``spec`` does not match ``tensors``, or the layout is invalid (from the validation).
    """
    kwargs: dict[str, object] = {}
    it = iter(tensors)
    for part in spec.split(_SEP):
        name, _, code = part.partition(_KV)
        kind, text = code[:1], code[1:]
        if kind == "t":
            value = next(it, None)
            if value is None:
                raise ValueError(f"{OP_NAME}: the spec names more tensors than the {len(tensors)} passed")
        else:
            value = {"n": lambda s: None, "b": lambda s: s == "1", "i": int, "f": float, "s": str}[kind](text)
        kwargs[name] = value
    if next(it, None) is not None:
        raise ValueError(f"{OP_NAME}: {len(tensors)} tensors passed but the spec names fewer")
    return OverlayExperts(**kwargs)


def _forward(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, experts: OverlayExperts,
             backend: str, check_ids: bool) -> torch.Tensor:
    """The op's implementation. float64 layers are oracle copies: the readable reference runs them (no kernel
    reads float64)."""
    if experts.factor_dtype == torch.float64:
        return overlay_moe_forward_reference(x, topk_ids, topk_weights, experts)
    return overlay_moe_forward(x, topk_ids, topk_weights, experts, backend=backend, check_ids=check_ids)


@torch.library.custom_op(OP_NAME, mutates_args=())
def _overlay_moe_op(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, tensors: list[torch.Tensor],
                    spec: str, backend: str, check_ids: bool) -> torch.Tensor:
    return _forward(x.detach(), topk_ids, topk_weights.detach(), unflatten_overlay(tensors, spec), backend, check_ids)


@_overlay_moe_op.register_fake
def _overlay_moe_fake(x, topk_ids, topk_weights, tensors, spec, backend, check_ids):
    return x.new_empty(x.shape)


@torch.library.custom_op(BACKWARD_OP_NAME, mutates_args=())
def _overlay_moe_backward_op(grad_y: torch.Tensor, x: torch.Tensor, topk_ids: torch.Tensor,
                             topk_weights: torch.Tensor, tensors: list[torch.Tensor], spec: str
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    return overlay_moe_backward(grad_y, x, topk_ids, topk_weights, unflatten_overlay(tensors, spec))


@_overlay_moe_backward_op.register_fake
def _overlay_moe_backward_fake(grad_y, x, topk_ids, topk_weights, tensors, spec):
    return x.new_empty(x.shape), topk_weights.new_empty(topk_weights.shape)


def _setup_context(ctx, inputs, output) -> None:
    x, topk_ids, topk_weights, tensors, spec, _backend, _check_ids = inputs
    ctx.save_for_backward(x, topk_ids, topk_weights, *tensors)
    ctx.spec = spec


def _backward(ctx, grad_y):
    x, topk_ids, topk_weights, *tensors = ctx.saved_tensors
    dx = dw = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
        dx, dw = torch.ops.lazarus.overlay_moe_backward(grad_y, x, topk_ids, topk_weights, tensors, ctx.spec)
    return (dx if ctx.needs_input_grad[0] else None, None, dw if ctx.needs_input_grad[2] else None,
            [None] * len(tensors), None, None, None)


_overlay_moe_op.register_autograd(_backward, setup_context=_setup_context)


def overlay_moe_op(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, experts: OverlayExperts, *,
                   backend: str = "auto", check_ids: bool = True) -> torch.Tensor:
    """:func:`~lazarus_core.ops.overlay_moe.overlay_moe_forward` through the custom op ``lazarus::overlay_moe``:
    differentiable w.r.t. ``x`` and ``topk_weights``, and traced by ``torch.compile`` as one node.

    Eager calls that need no gradient (``no_grad``, ``inference_mode``, or inputs that do not require grad)
    call the op's implementation directly and skip the dispatcher: the same result, without its per-call cost.

    Parameters
    ----------
    x : torch.Tensor
        ``[T, H]`` hidden states (any float dtype).
    topk_ids : torch.Tensor
        ``[T, K]`` integer expert ids in ``[0, E)``.
    topk_weights : torch.Tensor
        ``[T, K]`` float routing weights.
    experts : OverlayExperts
        The layer's overlay (frozen: it gets no gradient). A float64 copy runs the readable reference
        (for gradient checks); any other dtype runs the kernels of ``backend``.
    backend : str
        As in ``overlay_moe_forward``.
    check_ids : bool
        As in ``overlay_moe_forward``.

    Returns
    -------
    torch.Tensor
        ``[T, H]`` in ``x.dtype``. Its backward (:func:`overlay_moe_backward`) gives ``dL/dx`` ``[T, H]`` and
        ``dL/dtopk_weights`` ``[T, K]``.

    Raises
    ------
    TypeError, ValueError
        As ``overlay_moe_forward``.
    """
    if not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and (x.requires_grad or
                                                                               topk_weights.requires_grad)):
        # eager inference: the op would run this same call after the dispatcher's pytree and autograd wrapping
        return _forward(x, topk_ids, topk_weights, experts, backend, check_ids)
    tensors, spec = flatten_overlay(experts)
    return _overlay_moe_op(x, topk_ids, topk_weights, tensors, spec, backend, check_ids)


def activation_backward(g: torch.Tensor, u: torch.Tensor, kind: str, alpha: float = 1.702, limit: float = 7.0
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(h, dh/dg, dh/du)`` of :func:`~lazarus_core.ops.overlay_moe.activation_reference` (elementwise).

    SwiGLU ``h = silu(g) u``: ``dh/dg = u s (1 + g (1 - s))``, ``s = sigmoid(g)``; ``dh/du = silu(g)``.
    GPT-OSS ``h = g' sigmoid(alpha g') (u' + 1)`` with ``g' = min(g, limit)``, ``u' = clamp(u, -limit, limit)``:
    the clamps pass the gradient where the input is inside the closed interval (as torch's ``clamp`` does).
    """
    if kind == "gpt_oss":
        gc, uc = g.clamp(max=limit), u.clamp(-limit, limit)
        s = torch.sigmoid(alpha * gc)
        glu = gc * s
        dg = (s + alpha * glu * (1.0 - s)) * (uc + 1.0) * (g <= limit)
        du = glu * ((u >= -limit) & (u <= limit))
        return glu * (uc + 1.0), dg, du
    s = torch.sigmoid(g)
    silu = g * s
    return silu * u, u * s * (1.0 + g * (1.0 - s)), silu


def overlay_moe_backward(grad_y: torch.Tensor, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                         experts: OverlayExperts) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the overlay forward w.r.t. ``x`` and ``topk_weights``, through the factors (no ``W_e``).

    Computed in fp32 (float64 when ``x`` is float64); the gate/up pre-activations are recomputed from ``x``.

    Parameters
    ----------
    grad_y : torch.Tensor
        ``[T, H]``: ``dL/dy``.
    x : torch.Tensor
        ``[T, H]`` the forward's hidden states.
    topk_ids : torch.Tensor
        ``[T, K]`` integer expert ids.
    topk_weights : torch.Tensor
        ``[T, K]`` routing weights.
    experts : OverlayExperts

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        ``dL/dx [T, H]`` in ``x.dtype`` and ``dL/dtopk_weights [T, K]`` in ``topk_weights.dtype``.
    """
    cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    t, k = topk_ids.shape
    if t == 0:
        return torch.zeros_like(x), torch.zeros_like(topk_weights)
    inter, rg = experts.intermediate_size, experts.ranks["gate"]
    base_gu = experts.base_fp32("gate_up", cdtype)                   # [2I, H], an MXFP4 base decoded once
    base_d = experts.base_fp32("down", cdtype)                       # [H, I]
    at_g, at_u, at_d = (t.to(cdtype) for t in (experts.at_gate, experts.at_up, experts.at_down))  # A[e]^T
    b_gu, b_d = experts.b_gate_up.to(cdtype), experts.b_down.to(cdtype)
    b_g, b_u = b_gu[:, :rg], b_gu[:, rg:]
    biases = [None if b is None else b.to(cdtype) for b in (experts.bias_gate, experts.bias_up, experts.bias_down)]
    gy, xc = grad_y.to(cdtype), x.detach().to(cdtype)
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)                         # pairs grouped by expert
    counts = torch.bincount(flat, minlength=experts.num_experts).tolist()
    pair_token, pair_weight = order // k, topk_weights.detach().reshape(-1)[order].to(cdtype)
    gu0 = xc @ base_gu.T                                             # [T, 2I] base gate/up, once per token
    gb = gy @ base_d                                                 # [T, I] base_d^T gy, once per token
    d_gu = torch.zeros(t, 2 * inter, dtype=cdtype, device=x.device)  # [dg; du] summed over each token's pairs
    dx = torch.zeros(t, x.shape[1], dtype=cdtype, device=x.device)
    dw = torch.empty(order.numel(), dtype=cdtype, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if not n:
            continue
        rows = slice(start, start + n)
        start += n
        tok = pair_token[rows]
        xe, gye, gbe = xc[tok], gy[tok], gb[tok]
        g = gu0[tok, :inter] + (xe @ b_g[e].T) @ at_g[e]
        u = gu0[tok, inter:] + (xe @ b_u[e].T) @ at_u[e]
        if biases[0] is not None:
            g = g + biases[0][e]
        if biases[1] is not None:
            u = u + biases[1][e]
        h, dh_dg, dh_du = activation_backward(g, u, experts.activation, experts.alpha, experts.limit)
        ad = gye @ at_d[e].T                                         # [n, rd] = (A_d^T gy)
        dw[rows] = (gbe * h).sum(1) + (ad * (h @ b_d[e].T)).sum(1)
        if biases[2] is not None:
            dw[rows] += gye @ biases[2][e]
        dh = pair_weight[rows, None] * (gbe + ad @ b_d[e])          # [n, I]
        dg, du = dh * dh_dg, dh * dh_du
        d_gu.index_add_(0, tok, torch.cat([dg, du], 1))
        dx.index_add_(0, tok, (dg @ at_g[e].T) @ b_g[e] + (du @ at_u[e].T) @ b_u[e])
    dx += d_gu @ base_gu
    dw_slots = torch.empty_like(dw)
    dw_slots[order] = dw
    return dx.to(x.dtype), dw_slots.reshape(t, k).to(topk_weights.dtype)
