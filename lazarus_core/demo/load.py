"""Load a shipped demo checkpoint into transformers, with or without `accelerate` for MXFP4.

transformers loads the MXFP4 GPT-OSS checkpoint on CPU by dequantising it (it needs the `accelerate`
package for that; without the `kernels` package and a GPU it always dequantises). Where `accelerate`
is missing we decode the experts ourselves (``lazarus_core.ops.mxfp4_dequant``) and hand transformers
a plain state dict, so the built-in models load on a bare install.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import torch


def _is_mxfp4(config: dict) -> bool:
    return (config.get("quantization_config") or {}).get("quant_method") == "mxfp4"


def from_pretrained_kwargs(config: dict) -> dict:
    """Extra ``from_pretrained`` keyword arguments for a checkpoint, given its ``config.json``.

    An MXFP4 checkpoint is loaded with ``Mxfp4Config(dequantize=True)``: its experts decoded to dense weights, which
    is what transformers did on the CPU by itself up to 5.24. From 5.25 on, transformers installs the ``kernels``
    package and then fetches Triton MoE kernels from the Hub for such a checkpoint instead (refused offline, and
    not the dense experts the analyses read).

    Parameters
    ----------
    config : dict
        The parsed ``config.json``.

    Returns
    -------
    dict
        ``{}``, or ``{"quantization_config": Mxfp4Config(dequantize=True)}`` for MXFP4.
    """
    if not _is_mxfp4(config):
        return {}
    from transformers import Mxfp4Config

    return {"quantization_config": Mxfp4Config(dequantize=True)}


def dequantized_state_dict(model_dir: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor of a gpt-oss-style MXFP4 checkpoint, experts decoded to the in-memory layout.

    ``*_blocks [E, out, G, 16]`` + ``*_scales [E, out, G]`` become ``[E, in, out]`` (transformers keeps
    GPT-OSS experts transposed: ``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``).
    """
    from safetensors.torch import load_file

    from lazarus_core.ops import mxfp4_dequant

    raw = load_file(str(Path(model_dir) / "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for name, value in raw.items():
        if name.endswith("_scales"):
            continue
        if name.endswith("_blocks"):
            stem = name[: -len("_blocks")]
            w = mxfp4_dequant(value, raw[stem + "_scales"], dtype=torch.float32)
            out[stem] = w.transpose(1, 2).contiguous().to(dtype)
        else:
            out[name] = value.to(dtype)
    return out


def load_causal_lm(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """``AutoModelForCausalLM`` for a shipped model directory, in ``dtype`` (fp32 is fast on CPU).

    Parameters
    ----------
    model_dir : str or Path
        A directory with ``config.json`` and ``model.safetensors``.
    dtype : torch.dtype
        Parameter dtype of the returned model.

    Returns
    -------
    transformers.PreTrainedModel
        In eval mode.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not _is_mxfp4(config) or importlib.util.find_spec("accelerate") is not None:
            return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype,
                                                        **from_pretrained_kwargs(config)).eval()
        cfg = AutoConfig.from_pretrained(str(model_dir))
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        model.load_state_dict(dequantized_state_dict(model_dir, dtype), strict=True)
        return model.eval()
