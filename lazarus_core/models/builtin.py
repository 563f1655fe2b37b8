"""The registry of built-in models shipped inside the package (aliases usable wherever a model is)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class BuiltinModel:
    """One shipped model: its alias, where its files live, and the facts `lazarus models` lists."""

    alias: str
    path: Path
    family: str
    num_experts: int
    top_k: int
    size_bytes: int
    description: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


# Filled by the built-in-models work; empty until those models ship.
_REGISTRY: dict[str, BuiltinModel] = {}


def list_builtin_models() -> list[BuiltinModel]:
    """Return every built-in model, sorted by alias."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]
