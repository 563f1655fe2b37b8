"""Load a transformers model and tokenizer for routing capture from whatever ``-m`` names (dir, alias, hub id)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from lazarus_core.models.non_expert import read_non_expert_state
from lazarus_core.models.resolve import ModelSource, resolve_model


def load_model(spec: str, *, revision: str | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", trust_remote_code: bool = False):
    """Load a causal LM (safetensors weights only) and its tokenizer, in eval mode.

    Resolution (local directory, built-in alias, Hugging Face id) is
    :func:`lazarus_core.models.resolve.resolve_model`'s; loading is transformers' ``from_pretrained``
    with ``use_safetensors=True`` (pickle weights are never read).

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
        ``tokenizer`` is None when the checkpoint ships none.

    Raises
    ------
    lazarus_core.models.errors.ModelNotFoundError
        Not a directory, an alias or a hub id (a FileNotFoundError).
    OSError
        transformers cannot load it (no safetensors weights, offline miss, ...); the message names ``spec``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lazarus_core.demo.load import from_pretrained_kwargs, load_causal_lm

    source = resolve_model(spec, revision=revision)
    location = str(source.root) if source.root is not None else source.name
    try:
        config = _local_config(source.root)
        if source.root is not None and _needs_own_mxfp4_decode(config):
            model = load_causal_lm(source.root, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(location, revision=revision, dtype=dtype,
                                                         use_safetensors=True, trust_remote_code=trust_remote_code,
                                                         **from_pretrained_kwargs(config))
    except (OSError, ValueError) as exc:
        raise OSError(f"-m {spec}: cannot load the model from {location} ({exc})") from exc
    if not getattr(model, "is_quantized", False):
        if any(p.is_floating_point() and p.dtype != dtype for p in model.parameters()):
            # transformers dequantises MXFP4 / FP8 checkpoints to bf16 where it has no kernels for them,
            # whatever `dtype` asks: one dtype for every layer, or the first mixed matmul fails.
            model.to(dtype)
        if source.root is not None:
            _exact_fp8_weights(model, source.root, dtype)
    model.to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model, tokenizer, source


def _exact_fp8_weights(model, root: Path, dtype: torch.dtype) -> None:
    """Where transformers decoded an FP8 checkpoint itself (no GPU), redo the non-expert FP8 weights exactly.

    Its CPU fallback decodes to bf16 whatever ``dtype`` asks (a second rounding, and mixed dtypes that break the
    first matmul) and misplaces the scales of partial edge blocks (DeepSeek-V3's kv_a_proj_with_mqa has 576 rows
    in 128-row blocks). Routed experts keep transformers' decode (their sizes are whole blocks in real
    checkpoints).
    """
    try:
        config = json.loads((root / "config.json").read_text())
    except (OSError, ValueError):
        return
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") != "fp8":
        return
    params = dict(model.named_parameters())
    block = tuple(quant.get("weight_block_size") or (128, 128))
    exact = read_non_expert_state(root, set(params), config.get("model_type", ""), block, fp8_only=True)
    with torch.no_grad():
        for name, value in exact.items():
            params[name].copy_(value.to(dtype))


def _local_config(root: Path | None) -> dict:
    """A local checkpoint's parsed ``config.json`` ({} for a hub id or an unreadable file)."""
    if root is None:
        return {}
    try:
        return json.loads((root / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _needs_own_mxfp4_decode(config: dict) -> bool:
    """An MXFP4 checkpoint (its parsed ``config.json``) on a machine without ``accelerate`` (transformers cannot
    dequantise it there)."""
    quant = (config.get("quantization_config") or {}).get("quant_method")
    return quant == "mxfp4" and importlib.util.find_spec("accelerate") is None


__all__ = ["ModelSource", "load_model"]
