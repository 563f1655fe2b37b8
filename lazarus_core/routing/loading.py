"""Load a model for routing capture from a local directory, a built-in alias or a Hugging Face id."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class ModelSource:
    """Where a model came from: what the user typed, the directory or id loaded, and the revision."""

    spec: str
    resolved: str
    kind: str  # "local" | "builtin" | "hub"
    revision: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_model(spec: str, revision: str | None = None) -> ModelSource:
    """Resolve ``-m MODEL``: an existing directory, a built-in alias, else a Hugging Face model id.

    Raises
    ------
    FileNotFoundError
        ``spec`` looks like a path (starts with ``.``, ``/`` or ``~``) but does not exist.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        return ModelSource(spec, str(path.resolve()), "local", revision)
    try:
        from lazarus_core.models.builtin import resolve_builtin
    except ImportError:
        resolve_builtin = None
    builtin = resolve_builtin(spec) if resolve_builtin is not None else None
    if builtin is not None:
        return ModelSource(spec, str(builtin), "builtin", revision)
    if spec.startswith((".", "/", "~")) or spec.endswith((".safetensors", ".json")):
        raise FileNotFoundError(f"-m {spec}: no such model directory")
    return ModelSource(spec, spec, "hub", revision)


def load_model(spec: str, *, revision: str | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", trust_remote_code: bool = False):
    """Load a causal LM (safetensors weights only) and its tokenizer, in eval mode.

    Parameters
    ----------
    spec : str
        Local directory, built-in alias (``demo:native``) or Hugging Face id.
    revision : str, optional
        Hub revision.
    dtype : torch.dtype
        Parameter dtype (float32 on CPU: bf16 matmul is very slow there).
    device : str or torch.device
    trust_remote_code : bool
        Run code shipped with the checkpoint; off unless the user asks by flag.

    Returns
    -------
    (model, tokenizer or None, ModelSource)
        ``tokenizer`` is None when the checkpoint ships none (token ids must then be given directly).

    Raises
    ------
    OSError
        The model cannot be found or has no safetensors weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(spec, revision)
    try:
        model = AutoModelForCausalLM.from_pretrained(source.resolved, revision=revision, dtype=dtype,
                                                     use_safetensors=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise OSError(f"-m {spec}: cannot load the model from {source.resolved} ({exc})") from exc
    model.to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.resolved, revision=revision,
                                                  trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model, tokenizer, source
