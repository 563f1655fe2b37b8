"""Join moe-type-analyze reports of disjoint ``--layers`` parts (run apart, on other machines or at other
times) into the report one run over all those layers writes: the layers in order and the model-level call,
confidence, agreement and compression recomputed from them by the same functions analyze_moe_type uses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from lazarus_core.analysis.expert_structure import (LayerStructure, MoeTypeReport, NoiseFloor, ProjectionStructure,
                                                    compression_from_bytes, moe_type_report)

# What every part must share: the same model, analysed the same way.
SAME = ("model", "family", "num_experts", "top_k", "thresholds")
SAME_COMPRESSION = ("preset", "energy", "base", "dtype")


def layer_from_dict(d: dict) -> LayerStructure:
    """A :class:`LayerStructure` from its ``to_dict()`` (a report's layer entry)."""
    projections = {p: ProjectionStructure(**{**s, "noise_floor": None if s["noise_floor"] is None
                                             else NoiseFloor(**s["noise_floor"])})
                   for p, s in d["projections"].items()}
    return LayerStructure(d["layer"], d["moe_type"], d["confidence"], d["rank_ratio"], d["cosine_similarity"],
                          projections)


def merge_moe_type_reports(parts: Sequence[dict], names: Sequence[str] | None = None) -> MoeTypeReport:
    """One report from moe-type-analyze reports of disjoint layer sets.

    Parameters
    ----------
    parts : sequence of dict
        The reports' JSON (``MoeTypeReport.to_dict()``), at least one.
    names : sequence of str, optional
        How each part is named in errors (default ``part 0``, ``part 1``...).

    Returns
    -------
    MoeTypeReport
        Layers in ascending order; ``seconds`` is the parts' sum; no ``distributed``.

    Raises
    ------
    ValueError
        No parts; parts of another model, family, expert count, top-k, thresholds or compression setting
        (naming the parts and the field); a layer in two parts (naming the layer and both parts); a part
        without the compression bytes (written before they were recorded) or not a moe-type-analyze report.
    """
    names = list(names) if names is not None else [f"part {i}" for i in range(len(parts))]
    if not parts:
        raise ValueError("lazarus merge needs at least one moe-type-analyze report")
    first, owner, layers = parts[0], {}, []
    for name, part in zip(names, parts):
        missing = [k for k in (*SAME, "layers", "compression") if k not in part]
        if missing:
            raise ValueError(f"{name} is not a moe-type-analyze report (no {', '.join(missing)})")
        for key in SAME:
            if part[key] != first[key]:
                raise ValueError(f"{name} and {names[0]} differ in {key} ({part[key]!r} vs {first[key]!r}): parts of "
                                 "one merge must be of the same model analysed the same way")
        for key in SAME_COMPRESSION:
            if part["compression"].get(key) != first["compression"].get(key):
                raise ValueError(f"{name} and {names[0]} differ in compression {key} "
                                 f"({part['compression'].get(key)!r} vs {first['compression'].get(key)!r})")
        if "original_bytes" not in part["compression"]:
            raise ValueError(f"{name} has no compression byte counts (written by an older moe-type-analyze): "
                             "rerun that part to merge it")
        for d in part["layers"]:
            if d["layer"] in owner:
                raise ValueError(f"layer {d['layer']} is in both {owner[d['layer']]} and {name}: merged parts must "
                                 "cover disjoint --layers")
            owner[d["layer"]] = name
            try:
                layers.append(layer_from_dict(d))
            except (KeyError, TypeError) as exc:
                raise ValueError(f"{name}: layer {d.get('layer')} is not a moe-type-analyze layer entry ({exc})") \
                    from None
    layers.sort(key=lambda layer: layer.layer)
    compression = compression_from_bytes(sum(p["compression"]["original_bytes"] for p in parts),
                                         sum(p["compression"]["overlay_bytes"] for p in parts),
                                         first["compression"]["base"])
    return moe_type_report(layers, model=first["model"], family=first["family"], num_experts=first["num_experts"],
                           top_k=first["top_k"], compression=compression,
                           seconds=sum(float(p.get("seconds", 0.0)) for p in parts))


def merge_moe_type_files(paths: Sequence[str | Path]) -> MoeTypeReport:
    """:func:`merge_moe_type_reports` of JSON files (errors name the files).

    Raises
    ------
    FileNotFoundError
        A path is not a file.
    ValueError
        A file is not JSON, or as :func:`merge_moe_type_reports`.
    """
    parts = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        try:
            parts.append(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not JSON ({exc})") from None
    return merge_moe_type_reports(parts, [str(p) for p in paths])


__all__ = ["layer_from_dict", "merge_moe_type_files", "merge_moe_type_reports"]
