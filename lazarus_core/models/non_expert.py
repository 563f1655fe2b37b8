"""The non-expert tensors of a checkpoint, read by our own safetensors path: names mapped to the transformers
model's, FP8 E4M3 block-scaled weights decoded exactly (partial edge blocks included), for the loaders that must
not depend on transformers' own FP8 decode."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch


def _renamings(model_type: str) -> list[tuple[str, str]]:
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:
        return []
    out = []
    for t in get_checkpoint_conversion_mapping(model_type) or []:
        if isinstance(t, WeightRenaming):
            out.append((t.source_patterns[0], t.target_patterns[0]))
    return out


def read_non_expert_state(root: Path, wanted: set[str], model_type: str, block: tuple[int, int] = (128, 128), *,
                          fp8_only: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint's non-expert tensors under the names transformers' model uses, FP8 decoded exactly.

    Parameters
    ----------
    root : Path
        Checkpoint directory (``model.safetensors`` or a sharded index).
    wanted : set of str
        Parameter / buffer names of the transformers model; tensors under other names are skipped.
    model_type : str
        ``config.model_type``, for transformers' checkpoint renamings.
    block : tuple of int
        FP8 scale block ``(rows, cols)``.
    fp8_only : bool
        Return only the tensors stored in FP8 (E4M3, with ``weight_scale_inv``).

    Returns
    -------
    dict of str to torch.Tensor
        As stored (bf16, fp32, ...), FP8 weights decoded to fp32 with partial edge blocks handled.
    """
    from safetensors import safe_open

    index = root / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
        ["model.safetensors"]
    renames = _renamings(model_type)
    state = {}
    for filename in files:
        with safe_open(str(root / filename), "pt") as f:
            for name in f.keys():
                if ".experts." in name and "shared_expert" not in name:
                    continue
                target = name
                for src, dst in renames:
                    if target not in wanted:
                        target = re.sub(src, dst, target)
                if target not in wanted:
                    continue
                tensor = f.get_tensor(name)
                if tensor.dtype == torch.float8_e4m3fn:  # FP8 E4M3 linear + weight_scale_inv blocks
                    state[target] = _fp8_weight(f, name, tensor, block)
                elif not fp8_only:
                    state[target] = tensor
    return state


def _fp8_weight(f, name: str, codes: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    from lazarus_core.ops import fp8_dequant

    if name + "_scale_inv" not in f.keys():
        raise ValueError(f"tensor {name!r} is FP8 but {name}_scale_inv is missing")
    return fp8_dequant(codes.view(torch.uint8), f.get_tensor(name + "_scale_inv").float(), block_size=block)
