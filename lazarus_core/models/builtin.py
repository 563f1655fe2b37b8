"""The registry of built-in models shipped inside the package (aliases usable wherever a model is).

The registry is read from the shipped directories themselves (``lazarus_core/builtin_models/*/``):
each holds a transformers ``config.json`` and a ``lazarus_builtin.json`` written by the training
script (``python -m lazarus_core.demo.train``), so what `lazarus models` lists is always what ships.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

BUILTIN_MODELS_DIR = Path(__file__).resolve().parent.parent / "builtin_models"
METADATA_FILE = "lazarus_builtin.json"


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


def _read_model_dir(path: Path) -> BuiltinModel | None:
    meta_file, config_file = path / METADATA_FILE, path / "config.json"
    if not (meta_file.is_file() and config_file.is_file()):
        return None
    meta = json.loads(meta_file.read_text())
    config = json.loads(config_file.read_text())
    num_experts = config.get("num_experts", config.get("num_local_experts"))
    return BuiltinModel(
        alias=meta["alias"],
        path=path,
        family=config["model_type"],
        num_experts=int(num_experts),
        top_k=int(config["num_experts_per_tok"]),
        size_bytes=sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
        description=meta.get("description", ""),
    )


@lru_cache(maxsize=1)
def _registry() -> dict[str, BuiltinModel]:
    found: dict[str, BuiltinModel] = {}
    if BUILTIN_MODELS_DIR.is_dir():
        for sub in sorted(BUILTIN_MODELS_DIR.iterdir()):
            model = _read_model_dir(sub) if sub.is_dir() else None
            if model is not None:
                found[model.alias] = model
    return found


def list_builtin_models() -> list[BuiltinModel]:
    """Return every built-in model, sorted by alias."""
    registry = _registry()
    return [registry[k] for k in sorted(registry)]


def resolve_builtin(alias: str) -> Path | None:
    """Directory of the built-in model named ``alias`` (e.g. ``"demo:native"``), or None if it is not one.

    Parameters
    ----------
    alias : str
        A model argument as the user typed it. Matching ignores case and surrounding spaces.

    Returns
    -------
    pathlib.Path or None
        The shipped model directory (``config.json``, ``model.safetensors``, tokenizer files), or
        None when ``alias`` names no built-in model (then it is a path or a hub id).
    """
    if not isinstance(alias, str):
        return None
    model = _registry().get(alias.strip().lower())
    return model.path if model is not None else None
