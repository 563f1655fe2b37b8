"""Which MoE family a checkpoint is, and that family's facts (routing, MoE layers, sizes, names on disk).

Detection reads ``config.json`` only (``model_type``, then ``architectures``), never the expert count.
DBRX nests its MoE facts in ``ffn_config`` (``moe_num_experts``, ``moe_top_k``, ``ffn_hidden_size``,
``moe_normalize_expert_weights``, ``ffn_act_fn``) and names its sizes ``d_model`` / ``n_layers``.
Every consumer (checkpoint reader, routing capture, overlays) takes its facts from :class:`FamilySpec`.

Public API (stable):
    detect_family(config: dict) -> FamilySpec
    FamilySpec, RoutingConvention, SharedExpertSpec, DiskNames, UnsupportedModelError
    SUPPORTED_FAMILIES: tuple of family names
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Mapping

Scoring = Literal["softmax", "sigmoid"]
Order = Literal["score_then_topk", "topk_then_softmax"]
GroupScore = Literal["max", "top2_sum"]
Layout = Literal["per_expert", "gpt_oss", "dbrx"]

# family name -> (model_type values, architectures values)
_FAMILY_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "olmoe": (("olmoe",), ("OlmoeForCausalLM",)),
    "mixtral": (("mixtral",), ("MixtralForCausalLM",)),
    "qwen2_moe": (("qwen2_moe",), ("Qwen2MoeForCausalLM",)),
    "qwen3_moe": (("qwen3_moe",), ("Qwen3MoeForCausalLM",)),
    "deepseek_v2": (("deepseek_v2",), ("DeepseekV2ForCausalLM",)),
    "deepseek_v3": (("deepseek_v3",), ("DeepseekV3ForCausalLM",)),
    "gpt_oss": (("gpt_oss",), ("GptOssForCausalLM",)),
    "dbrx": (("dbrx",), ("DbrxForCausalLM",)),
}
SUPPORTED_FAMILIES: tuple[str, ...] = tuple(_FAMILY_KEYS)


def supported_families() -> list[dict]:
    """The MoE families the library reads, as ``lazarus models --json`` lists them.

    Returns
    -------
    list of dict
        ``{"family", "model_types", "architectures"}`` per family: the ``config.json`` values that select it.
    """
    return [{"family": f, "model_types": list(types), "architectures": list(archs)}
            for f, (types, archs) in _FAMILY_KEYS.items()]


class UnsupportedModelError(ValueError):
    """The model is not an MoE family we support; the message names it and lists the supported ones."""


@dataclass(frozen=True)
class RoutingConvention:
    """How router logits become the top-k expert ids and the weights the model mixes with.

    Attributes
    ----------
    scoring : {"softmax", "sigmoid"}
        Function turning logits into scores (softmax over all E experts, or elementwise sigmoid).
    order : {"score_then_topk", "topk_then_softmax"}
        ``score_then_topk``: score all E experts, pick the top-k scores (OLMoE, Qwen, DeepSeek).
        ``topk_then_softmax``: top-k of the raw logits (plus router bias), softmax over those k
        (Mixtral, GPT-OSS); the k weights then sum to 1 by construction.
    renormalize : bool
        Divide the k chosen weights by their ``renormalize_p``-norm (``norm_topk_prob``: their sum). False
        for OLMoE: its weights are the softmax over all E experts and do not sum to 1.
    renormalize_p : float
        The p of that norm: 1.0 (the sum) everywhere but DBRX, whose ``moe_normalize_expert_weights`` sets it
        (usually 1; DBRX with ``moe_normalize_expert_weights: null`` does not renormalise).
    routed_scaling_factor : float
        Multiplier applied to the final top-k weights (DeepSeek); 1.0 elsewhere.
    selection_bias : bool
        DeepSeek-V3 ``e_score_correction_bias [E]``: added to the scores for choosing the experts only;
        the mixing weights are the un-biased scores of the chosen experts.
    n_group, topk_group : int or None
        Group-limited top-k: experts split in ``n_group`` equal groups, only the best ``topk_group``
        groups are eligible. None when routing is not group-limited.
    group_score : {"max", "top2_sum"} or None
        How a group is ranked: best score in the group (DeepSeek-V2 ``group_limited_greedy``) or the sum
        of its two best (biased) scores (DeepSeek-V3).
    router_bias : bool
        The router linear layer has a bias ``[E]`` added to the logits (GPT-OSS).
    """

    scoring: Scoring
    order: Order
    renormalize: bool
    renormalize_p: float = 1.0
    routed_scaling_factor: float = 1.0
    selection_bias: bool = False
    n_group: int | None = None
    topk_group: int | None = None
    group_score: GroupScore | None = None
    router_bias: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SharedExpertSpec:
    """Always-active shared expert(s) next to the routed ones.

    Attributes
    ----------
    module : str
        Module name under the MoE block (``"shared_expert"`` for Qwen2-MoE, ``"shared_experts"`` DeepSeek).
    intermediate_size : int
        Intermediate size of the shared MLP as stored (DeepSeek: ``moe_intermediate_size * n_shared_experts``).
    num_shared : int
        How many experts the shared MLP stands for (DeepSeek ``n_shared_experts``; 1 for Qwen2-MoE).
    gate_module : str or None
        Qwen2-MoE ``shared_expert_gate`` (weight ``[1, H]``, output through a sigmoid), else None.
    """

    module: str
    intermediate_size: int
    num_shared: int = 1
    gate_module: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DiskNames:
    """Tensor names on disk (safetensors), relative to ``{layers_prefix}.{L}.{moe_module}``.

    Attributes
    ----------
    moe_module : str
        ``"mlp"``, ``"block_sparse_moe"`` (Mixtral) or ``"ffn"`` (DBRX).
    router : str
        Router module: ``"gate"``, ``"router"`` (GPT-OSS) or ``"router.layer"`` (DBRX); its tensors are
        ``.weight`` (and ``.bias``).
    fused : bool
        True when all experts of a projection share one tensor (``layout`` ``"gpt_oss"`` or ``"dbrx"``).
    projections : tuple of (str, str)
        Projection (``gate``/``up``/``down``) -> tensor name: per-expert layouts, under ``experts.N.`` without
        ``.weight`` (``gate_proj``... or Mixtral ``w1``/``w3``/``w2``); DBRX, under ``experts.mlp.``
        (``w1``/``v1``/``w2``).
    layers_prefix : str
        Where the decoder layers live: ``"model.layers"``, or ``"transformer.blocks"`` (DBRX).
    layout : {"per_expert", "gpt_oss", "dbrx"}
        ``per_expert``: one ``[out, in]`` tensor per expert and projection. ``gpt_oss``:
        ``experts.gate_up_proj [E, H, 2I]`` (gate/up interleaved on the last axis) and ``experts.down_proj
        [E, I, H]``, plus ``_bias``, or ``_blocks``/``_scales`` when MXFP4. ``dbrx``: ``experts.mlp.w1`` (gate),
        ``v1`` (up), ``w2`` (down), each ``[E*I, H]``: rows ``e*I:(e+1)*I`` are expert e's gate / up ``[I, H]``
        and its down projection TRANSPOSED (``down[e] = w2[e*I:(e+1)*I].T``, ``[H, I]``).
    """

    moe_module: str
    router: str
    fused: bool
    projections: tuple[tuple[str, str], ...] = (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj"))
    layers_prefix: str = "model.layers"
    layout: Layout = "per_expert"

    def projection_name(self, projection: str) -> str:
        return dict(self.projections)[projection]

    def moe_prefix(self, layer: int) -> str:
        """``"{layers_prefix}.{layer}.{moe_module}."``: the prefix of every MoE tensor of ``layer``."""
        return f"{self.layers_prefix}.{layer}.{self.moe_module}."

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["projections"] = dict(self.projections)
        return d


@dataclass(frozen=True)
class FamilySpec:
    """Facts of one MoE checkpoint's family, read from its ``config.json``.

    Attributes
    ----------
    family : str
        One of :data:`SUPPORTED_FAMILIES`.
    model_type : str
        ``config["model_type"]`` as written (may be empty when detection used ``architectures``).
    num_layers : int
        ``num_hidden_layers``.
    hidden_size : int
        H.
    expert_intermediate_size : int
        I of one routed expert (``moe_intermediate_size`` where the family has it).
    num_experts : int
        E routed experts per MoE layer.
    top_k : int
        Experts chosen per token.
    moe_layers : tuple of int
        Model layer indices (0-based) whose MLP is an MoE block, ascending.
    dense_layers : tuple of int
        The remaining layers (dense MLP).
    routing : RoutingConvention
    shared_experts : SharedExpertSpec or None
    expert_bias : bool
        Routed experts have biases (GPT-OSS ``gate_up_proj_bias [E, 2I]``, ``down_proj_bias [E, H]``).
    quantization : str or None
        ``"mxfp4"`` or ``"fp8"`` from ``quantization_config.quant_method``; None when unquantised.
        (The reader decides per tensor from the file headers; this is the declared intent.)
    fp8_block_size : tuple of int or None
        ``weight_block_size`` for FP8 checkpoints (``(128, 128)`` in DeepSeek-V3).
    names : DiskNames
    expert_activation : str
        Activation of the routed experts' gate (GLU: ``act(gate) * up``): ``hidden_act`` (DBRX:
        ``ffn_config.ffn_act_fn.name``), default ``"silu"``; ``"gpt_oss"`` for GPT-OSS's clamped SwiGLU.
    """

    family: str
    model_type: str
    num_layers: int
    hidden_size: int
    expert_intermediate_size: int
    num_experts: int
    top_k: int
    moe_layers: tuple[int, ...]
    dense_layers: tuple[int, ...]
    routing: RoutingConvention
    shared_experts: SharedExpertSpec | None
    expert_bias: bool
    quantization: str | None
    fp8_block_size: tuple[int, int] | None
    names: DiskNames = field(repr=False)
    expert_activation: str = "silu"

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "expert_intermediate_size": self.expert_intermediate_size,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "moe_layers": list(self.moe_layers),
            "dense_layers": list(self.dense_layers),
            "routing": self.routing.to_dict(),
            "shared_experts": None if self.shared_experts is None else self.shared_experts.to_dict(),
            "expert_bias": self.expert_bias,
            "quantization": self.quantization,
            "fp8_block_size": None if self.fp8_block_size is None else list(self.fp8_block_size),
            "names": self.names.to_dict(),
            "expert_activation": self.expert_activation,
        }


def _family_of(config: Mapping[str, Any]) -> str:
    model_type = config.get("model_type") or ""
    architectures = tuple(config.get("architectures") or ())
    for family, (types, archs) in _FAMILY_KEYS.items():
        if model_type in types:
            return family
    if not model_type:
        for family, (types, archs) in _FAMILY_KEYS.items():
            if any(a in archs for a in architectures):
                return family
    what = f"model_type={model_type!r}" if model_type else "no model_type"
    raise UnsupportedModelError(
        f"unsupported model ({what}, architectures={list(architectures)}): not a supported MoE family; "
        f"supported families: {', '.join(SUPPORTED_FAMILIES)}"
    )


def _require(config: Mapping[str, Any], family: str, *keys: str) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    raise UnsupportedModelError(f"{family} config.json lacks {' / '.join(keys)}; cannot describe its MoE layers")


def _positive_int(value: Any, family: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UnsupportedModelError(f"{family} config.json: {key} must be a positive integer, got {value!r}")
    return value


def _dbrx_facts(config: Mapping[str, Any]) -> dict[str, Any]:
    """DBRX's ``config.json`` in the common key names (``d_model``, ``n_layers``, ``ffn_config.*``)."""
    ffn = config.get("ffn_config")
    if not isinstance(ffn, Mapping):
        raise UnsupportedModelError("dbrx config.json lacks ffn_config; cannot describe its MoE layers")
    act = ffn.get("ffn_act_fn") or {"name": "silu"}
    return {
        **config,
        "num_hidden_layers": _positive_int(_require(config, "dbrx", "n_layers", "num_hidden_layers"), "dbrx",
                                           "n_layers"),
        "hidden_size": _positive_int(_require(config, "dbrx", "d_model", "hidden_size"), "dbrx", "d_model"),
        # transformers' DbrxFFNConfig defaults: moe_top_k 1, moe_num_experts 4
        "num_experts_per_tok": _positive_int(ffn.get("moe_top_k", 1), "dbrx", "ffn_config.moe_top_k"),
        "num_experts": _positive_int(ffn.get("moe_num_experts", 4), "dbrx", "ffn_config.moe_num_experts"),
        "intermediate_size": _positive_int(_require(ffn, "dbrx", "ffn_hidden_size"), "dbrx",
                                           "ffn_config.ffn_hidden_size"),
        "moe_normalize_expert_weights": ffn.get("moe_normalize_expert_weights", 1.0),
        "hidden_act": act.get("name", "silu") if isinstance(act, Mapping) else str(act),
    }


def _qwen_moe_layers(config: Mapping[str, Any], num_layers: int, num_experts: int) -> tuple[int, ...]:
    step = int(config.get("decoder_sparse_step") or 1)
    mlp_only = set(config.get("mlp_only_layers") or ())
    return tuple(i for i in range(num_layers) if i not in mlp_only and num_experts > 0 and (i + 1) % step == 0)


def detect_family(config: Mapping[str, Any]) -> FamilySpec:
    """Detect the MoE family of a ``config.json`` and gather its facts.

    Parameters
    ----------
    config : Mapping[str, Any]
        The parsed ``config.json`` (a plain dict; ``PretrainedConfig.to_dict()`` works too).

    Returns
    -------
    FamilySpec

    Raises
    ------
    UnsupportedModelError
        The model is not one of :data:`SUPPORTED_FAMILIES` (message names it and lists them), or its
        config lacks a key the family needs, or has no MoE layer.
    """
    family = _family_of(config)
    if family == "dbrx":
        config = _dbrx_facts(config)
    model_type = str(config.get("model_type") or "")
    num_layers = _positive_int(_require(config, family, "num_hidden_layers"), family, "num_hidden_layers")
    hidden = _positive_int(_require(config, family, "hidden_size"), family, "hidden_size")
    top_k = _positive_int(_require(config, family, "num_experts_per_tok"), family, "num_experts_per_tok")
    shared: SharedExpertSpec | None = None
    expert_bias = False
    names = DiskNames(moe_module="mlp", router="gate", fused=False)

    if family == "olmoe":
        num_experts = _require(config, family, "num_experts", "num_local_experts")
        inter = _require(config, family, "intermediate_size")
        moe_layers = tuple(range(num_layers))
        routing = RoutingConvention("softmax", "score_then_topk", renormalize=bool(config.get("norm_topk_prob", False)))
    elif family == "mixtral":
        num_experts = _require(config, family, "num_local_experts", "num_experts")
        inter = _require(config, family, "intermediate_size")
        moe_layers = tuple(range(num_layers))
        routing = RoutingConvention("softmax", "topk_then_softmax", renormalize=True)
        names = DiskNames("block_sparse_moe", "gate", False, (("gate", "w1"), ("up", "w3"), ("down", "w2")))
    elif family in ("qwen2_moe", "qwen3_moe"):
        num_experts = _require(config, family, "num_experts", "num_local_experts")
        inter = _require(config, family, "moe_intermediate_size")
        moe_layers = _qwen_moe_layers(config, num_layers, num_experts)
        routing = RoutingConvention("softmax", "score_then_topk", renormalize=bool(config.get("norm_topk_prob", False)))
        if family == "qwen2_moe" and int(config.get("shared_expert_intermediate_size") or 0) > 0:
            shared = SharedExpertSpec("shared_expert", int(config["shared_expert_intermediate_size"]), 1,
                                      "shared_expert_gate")
    elif family in ("deepseek_v2", "deepseek_v3"):
        num_experts = _require(config, family, "n_routed_experts", "num_experts")
        inter = _require(config, family, "moe_intermediate_size")
        first_dense = int(config.get("first_k_dense_replace") or 0)
        moe_layers = tuple(range(first_dense, num_layers))
        n_shared = int(config.get("n_shared_experts") or 0)
        if n_shared > 0:
            shared = SharedExpertSpec("shared_experts", int(inter) * n_shared, n_shared)
        scaling = float(config.get("routed_scaling_factor") or 1.0)
        if family == "deepseek_v2":
            # transformers' DeepseekV2 router: softmax, (group-limited) greedy top-k, no renormalisation.
            grouped = config.get("topk_method") == "group_limited_greedy"
            routing = RoutingConvention(
                "softmax", "score_then_topk", renormalize=False, routed_scaling_factor=scaling,
                n_group=int(config["n_group"]) if grouped else None,
                topk_group=int(config["topk_group"]) if grouped else None,
                group_score="max" if grouped else None,
            )
        else:
            routing = RoutingConvention(
                "sigmoid", "score_then_topk", renormalize=bool(config.get("norm_topk_prob", True)),
                routed_scaling_factor=scaling, selection_bias=True,
                n_group=int(config.get("n_group") or 1), topk_group=int(config.get("topk_group") or 1),
                group_score="top2_sum",
            )
    elif family == "dbrx":
        # transformers' DbrxFFN: softmax over all E, top-k, the k weights divided by their p-norm.
        num_experts, inter = config["num_experts"], config["intermediate_size"]
        moe_layers = tuple(range(num_layers))
        p = config["moe_normalize_expert_weights"]
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or p <= 0):
            raise UnsupportedModelError(f"dbrx config.json: ffn_config.moe_normalize_expert_weights must be a "
                                        f"positive number or null, got {p!r}")
        routing = RoutingConvention("softmax", "score_then_topk", renormalize=p is not None,
                                    renormalize_p=1.0 if p is None else float(p))
        names = DiskNames("ffn", "router.layer", True, (("gate", "w1"), ("up", "v1"), ("down", "w2")),
                          layers_prefix="transformer.blocks", layout="dbrx")
    else:  # gpt_oss
        num_experts = _require(config, family, "num_local_experts", "num_experts")
        inter = _require(config, family, "intermediate_size")
        moe_layers = tuple(range(num_layers))
        routing = RoutingConvention("softmax", "topk_then_softmax", renormalize=True, router_bias=True)
        expert_bias = True
        names = DiskNames("mlp", "router", True, layout="gpt_oss")

    num_experts = _positive_int(num_experts, family, "num_experts")
    inter = _positive_int(inter, family, "intermediate_size")
    if top_k > num_experts:
        raise UnsupportedModelError(f"{family} config.json: num_experts_per_tok={top_k} > num_experts={num_experts}")
    if not moe_layers:
        raise UnsupportedModelError(f"{family} config.json describes no MoE layer (all {num_layers} layers dense)")
    quant = config.get("quantization_config") or {}
    quant_method = quant.get("quant_method") if isinstance(quant, Mapping) else None
    block = quant.get("weight_block_size") if quant_method == "fp8" else None
    return FamilySpec(
        family=family,
        model_type=model_type,
        num_layers=num_layers,
        hidden_size=hidden,
        expert_intermediate_size=inter,
        num_experts=num_experts,
        top_k=top_k,
        moe_layers=moe_layers,
        dense_layers=tuple(i for i in range(num_layers) if i not in moe_layers),
        routing=routing,
        shared_experts=shared,
        expert_bias=expert_bias,
        quantization=quant_method,
        fp8_block_size=tuple(int(b) for b in block) if block else None,
        names=names,
        expert_activation="gpt_oss" if family == "gpt_oss" else str(config.get("hidden_act") or "silu"),
    )
