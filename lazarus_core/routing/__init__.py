"""Routing capture, routing traces and routing interventions for MoE models (transformers)."""

from lazarus_core.routing.capture import CaptureResult, capture_routing
from lazarus_core.routing.conventions import convention_of, route
from lazarus_core.routing.corpus import (
    Corpus,
    EmptyInputError,
    corpus_from_jsonl,
    corpus_from_prompts,
    corpus_from_texts,
)
from lazarus_core.routing.interventions import (
    RoutingEdit,
    RoutingIntervention,
    WeightOverride,
    ablate_experts,
    boost_expert,
    force_experts,
    rewrite_routing,
    set_top_k,
    suppress_expert,
)
from lazarus_core.routing.locate import MoeLayer, MoeModelInfo, NoMoeLayersError, find_moe_layers
from lazarus_core.routing.recorder import LayerRouting, RoutingRecorder
from lazarus_core.routing.trace_format import TraceError
from lazarus_core.routing.trace_reader import LayerTrace, TokenSpan, Trace, load_trace

__all__ = [
    "CaptureResult", "capture_routing", "convention_of", "route", "Corpus", "EmptyInputError",
    "corpus_from_jsonl", "corpus_from_prompts", "corpus_from_texts", "RoutingEdit", "RoutingIntervention",
    "WeightOverride", "ablate_experts", "boost_expert", "force_experts", "rewrite_routing", "set_top_k",
    "suppress_expert", "MoeLayer",
    "MoeModelInfo", "NoMoeLayersError", "find_moe_layers", "LayerRouting", "RoutingRecorder", "TraceError",
    "LayerTrace", "TokenSpan", "Trace", "load_trace",
]
