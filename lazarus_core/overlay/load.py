"""Run a transformers MoE model on an overlay: the experts modules keep only the overlay factors and run
``lazarus_core.ops.overlay_moe_forward`` through transformers' experts-implementation interface, so
``model.generate`` works unchanged. The full expert weights are never materialised: the model is built on
the meta device, only the non-expert tensors are read from the source checkpoint, and each experts
module receives its layer's overlay."""

from __future__ import annotations

import json
import os
import re
import types
import warnings

import torch

from lazarus_core.models.non_expert import read_non_expert_state
from lazarus_core.ops.overlay_moe import OverlayExperts
from lazarus_core.ops.overlay_moe_op import overlay_moe_op
from lazarus_core.overlay.format import read_config, read_layer
from lazarus_core.overlay.graphs import GraphCache

IMPLEMENTATION = "lazarus_overlay"
_EXPERT_PARAMS = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias", "up_proj", "up_proj_bias")
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|blocks)\.(\d+)\.")  # DBRX: transformer.blocks.N


def overlay_experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts forward registered as ``"lazarus_overlay"`` (``self`` is a transformers experts module
    carrying ``_lazarus_overlay`` and ``_lazarus_backend``).

    Runs the custom op ``lazarus::overlay_moe`` (:func:`lazarus_core.ops.overlay_moe_op.overlay_moe_op`): it
    backpropagates to ``hidden_states`` and ``top_k_weights`` and ``torch.compile`` traces it without a graph
    break. Calls that need a gradient never replay a CUDA graph (a replay records no autograd history), nor do
    traced ones (``torch.compile`` has its own CUDA graphs: ``mode="reduce-overhead"``)."""
    experts: OverlayExperts | None = getattr(self, "_lazarus_overlay", None)
    if experts is None:
        raise RuntimeError(f"{type(self).__name__} has no overlay attached; load the model with "
                           f"lazarus_core.overlay.load_model")
    backend = getattr(self, "_lazarus_backend", "auto")

    def forward(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # The ids are a top-k over this layer's own router scores, so always in range: no sync to check them.
        return overlay_moe_op(x, ids, weights, experts, backend=backend, check_ids=False)

    graphs: GraphCache | None = getattr(self, "_lazarus_graphs", None)
    needs_grad = torch.is_grad_enabled() and (hidden_states.requires_grad or top_k_weights.requires_grad)
    if graphs is not None and not needs_grad and not torch.compiler.is_compiling() and graphs.applies(hidden_states):
        return graphs.run(forward, hidden_states, top_k_index, top_k_weights)
    return forward(hidden_states, top_k_index, top_k_weights)


def dbrx_overlay_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor) -> torch.Tensor:
    """``DbrxExperts.forward`` on the overlay. DBRX has no experts-implementation interface, so
    :func:`attach_overlay` binds this to each DBRX experts module; hidden ``[B, S, H]`` (or ``[T, H]``) -> same shape."""
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    return overlay_experts_forward(self, flat, top_k_index, top_k_weights).view(hidden_states.shape)


def _is_dbrx_experts(module: torch.nn.Module) -> bool:
    """DBRX keeps its fused expert weights ``w1``/``v1``/``w2`` in the experts module's ``mlp`` child."""
    return isinstance(getattr(module, "mlp", None), torch.nn.Module) and "w2" in module.mlp._parameters


def _drop_expert_weights(module: torch.nn.Module) -> None:
    holder, names = (module.mlp, ("w1", "v1", "w2")) if _is_dbrx_experts(module) else (module, _EXPERT_PARAMS)
    for pname in names:
        if pname in holder._parameters:
            holder._parameters[pname] = None


def register_experts_implementation() -> str:
    """Register :func:`overlay_experts_forward` with transformers' ``ExpertsInterface``; returns its name."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION, overlay_experts_forward)
    return IMPLEMENTATION


def experts_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Model layer index -> routed experts module (one holding 3-D ``gate_up_proj``/``down_proj`` or an overlay)."""
    found = {}
    for name, module in model.named_modules():
        weight = module._parameters.get("down_proj", False)
        if name.endswith("experts") and (weight is None or isinstance(weight, torch.Tensor) and weight.dim() == 3
                                         or _is_dbrx_experts(module)):
            m = _LAYER_RE.search(name)
            if m:
                found[int(m.group(1))] = module
    return found


def load_overlay_layers(overlay: str | os.PathLike, *, device: str | torch.device = "cpu",
                        layers: list[int] | None = None) -> dict[int, OverlayExperts]:
    """Read an overlay checkpoint into :class:`OverlayExperts` in its stored precision (no fp32 expansion)."""
    config = read_config(overlay)
    out = {}
    for layer in layers if layers is not None else config["moe_layers"]:
        f = read_layer(overlay, config, int(layer))
        out[int(layer)] = OverlayExperts.from_factors(f.base, f.a, f.b, f.bias, activation=config["activation"],
                                                      alpha=config["swiglu_alpha"], limit=config["swiglu_limit"],
                                                      device=device)
    return out


def attach_overlay(model: torch.nn.Module, layers: dict[int, OverlayExperts], *, backend: str = "auto",
                   cuda_graphs: bool = True) -> None:
    """Replace the expert weights of ``model``'s MoE layers in ``layers`` by their overlays and switch the
    model to the ``lazarus_overlay`` experts implementation (the freed weights are dropped).

    With ``cuda_graphs`` (and the ``auto``, ``cuda`` or ``triton`` backend), calls of at most 8 tokens on a
    CUDA device replay captured graphs (:class:`lazarus_core.overlay.graphs.GraphCache`).

    Raises
    ------
    ValueError
        An overlay layer has no experts module in the model, or its sizes disagree.
    """
    register_experts_implementation()
    modules = experts_modules(model)
    for layer, ov in layers.items():
        module = modules.get(layer)
        if module is None:
            raise ValueError(f"the overlay has layer {layer} but the model has no experts module there "
                             f"(experts at layers {sorted(modules)})")
        n = getattr(module, "num_experts", ov.num_experts)
        if n != ov.num_experts:
            raise ValueError(f"layer {layer}: the model has {n} experts, the overlay {ov.num_experts}")
        _drop_expert_weights(module)
        if _is_dbrx_experts(module):
            module.forward = types.MethodType(dbrx_overlay_forward, module)
        module._lazarus_overlay = ov
        module._lazarus_backend = backend
        module._lazarus_graphs = GraphCache() if cuda_graphs and backend in ("auto", "cuda", "triton") else None
    if len(layers) < len(modules):
        # Layers without an overlay keep their weights: dispatch per module is not possible in transformers'
        # interface, so their forward is the one the overlay forward falls back to.
        missing = sorted(set(modules) - set(layers))
        raise ValueError(f"the overlay covers layers {sorted(layers)} but the model has experts at {missing} too; "
                         f"compress every MoE layer (--layers all) to run it")
    if not all(_is_dbrx_experts(m) for m in modules.values()):
        model.set_experts_implementation(IMPLEMENTATION)


def _fresh_rotary(model: torch.nn.Module, device: torch.device) -> None:
    """Rebuild modules whose non-persistent buffers (rotary ``inv_freq``) were left empty by ``to_empty``."""
    for name, module in list(model.named_modules()):
        if "inv_freq" in module._buffers and hasattr(module, "config"):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            fresh = type(module)(module.config).to(device)
            setattr(parent, name.rsplit(".", 1)[-1], fresh)


def load_model(model: str | os.PathLike | None = None, *, overlay: str | os.PathLike, backend: str = "auto",
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", cuda_graphs: bool = True,
               force: bool = False):
    """A transformers causal LM whose routed experts run the fused overlay forward.

    Parameters
    ----------
    model : str or PathLike, optional
        The source model (local directory or built-in alias); default: the one recorded in the overlay.
    overlay : str or PathLike
        Overlay checkpoint directory (written by ``moe-overlay-compress``).
    backend : str
        Kernel backend of the fused stages (``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"``, ``"torch"``).
    dtype : torch.dtype
        Dtype of the non-expert parameters (the overlay computes in fp32).
    device : str or torch.device
    cuda_graphs : bool
        On a CUDA device, replay captured CUDA graphs for decode-sized calls (at most 8 tokens) of the
        ``auto``/``cuda``/``triton`` backends; the forward is then bound by the GPU, not by kernel launches.
    force : bool
        Load an overlay whose source fingerprint does not match ``model`` (a loud warning on stderr instead of
        ``OverlaySourceMismatch``; :func:`lazarus_core.overlay.fingerprint.check_source`).

    Returns
    -------
    transformers.PreTrainedModel
        In eval mode with every parameter frozen (``requires_grad=False``); ``model.generate`` works. Outside
        ``torch.no_grad`` the forward backpropagates to the inputs (embeddings, hidden states, routing weights)
        through the overlay factors, and ``torch.compile(model)`` traces the experts without a graph break.
        Peak memory: the non-expert weights plus the overlay.

    Raises
    ------
    FileNotFoundError
        No overlay config, or the source model cannot be found.
    ValueError
        The overlay does not match the model (family, experts, layers, sizes, source fingerprint), or a
        non-expert tensor is missing from the checkpoint.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from lazarus_core.models.families import detect_family
    from lazarus_core.models.resolve import resolve_model

    config = read_config(overlay)
    spec = model if model is not None else config["source"]["model"]
    source = resolve_model(str(spec), revision=config["source"].get("revision"))
    if source.root is None:
        source.local_path("config.json")
    root = source.root if source.root is not None else source.local_path("config.json").parent
    raw_config = json.loads((root / "config.json").read_text())
    fam = detect_family(raw_config)
    if fam.family != config["family"] or fam.num_experts != config["num_experts"]:
        raise ValueError(f"overlay {overlay} was made from a {config['family']} model with {config['num_experts']} "
                         f"experts; {spec} is {fam.family} with {fam.num_experts}")
    from lazarus_core.overlay.fingerprint import check_source

    check_source(source, config, force=force, overlay=overlay)
    device = torch.device(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_config = AutoConfig.from_pretrained(str(root))
        if hasattr(hf_config, "quantization_config"):
            del hf_config.quantization_config
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    for module in experts_modules(lm).values():
        _drop_expert_weights(module)
    lm.to_empty(device=device)
    wanted = set(lm.state_dict().keys())
    state = read_non_expert_state(root, wanted, raw_config.get("model_type", ""),
                                  tuple(fam.fp8_block_size or (128, 128)))
    missing = wanted - set(state)
    tied = {k for k in missing if k.startswith("lm_head.") and getattr(hf_config, "tie_word_embeddings", False)}
    if missing - tied:
        raise ValueError(f"{root}: tensors missing for the non-expert part of the model: {sorted(missing - tied)[:8]}")
    lm.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, strict=False)
    if tied:
        lm.tie_weights()
    _fresh_rotary(lm, device)
    attach_overlay(lm, load_overlay_layers(overlay, device=device), backend=backend, cuda_graphs=cuda_graphs)
    lm.requires_grad_(False)
    return lm.eval()
