"""One check of an :class:`~lazarus_core.ops.overlay_moe.OverlayExperts` layout (shapes, dtypes, devices,
contiguity), run once when it is built, so that no raw-pointer kernel ever reads a tensor of the wrong size."""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import TYPE_CHECKING

import torch
from torch.utils.weak import WeakIdKeyDictionary

if TYPE_CHECKING:
    from lazarus_core.ops.overlay_moe import OverlayExperts

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
"""Factor, bias and float-base dtypes. float64 is for oracle copies run by the torch reference only."""

ACTIVATION_NAMES = ("swiglu", "gpt_oss")
MXFP4_BLOCK = 32
_FACTORS = ("b_gate_up", "at_gate", "at_up", "b_down", "at_down")
_BIASES = ("bias_gate", "bias_up", "bias_down")
_FLOAT_BASE = ("base_gate_up", "base_down")
_MXFP4_BASE = ("base_gate_up_blocks", "base_gate_up_scales", "base_down_blocks", "base_down_scales")

# b_gate_up -> every field (tensors as weak references) of a layout that passed: a layout is checked once, and
# rebuilding an OverlayExperts from the same tensor objects (the custom op does, per call) costs one lookup.
_validated: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _fields(ex: "OverlayExperts") -> tuple:
    return tuple((f.name, getattr(ex, f.name)) for f in dataclasses.fields(ex))


def _seen(ex: "OverlayExperts") -> bool:
    entry = _validated.get(ex.b_gate_up)
    if entry is None:
        return False
    now = _fields(ex)
    return len(now) == len(entry) and all(
        name == seen_name and (seen() is value if isinstance(seen, weakref.ref) else
                               not isinstance(value, torch.Tensor) and seen == value)
        for (name, value), (seen_name, seen) in zip(now, entry))


def _remember(ex: "OverlayExperts") -> None:
    _validated[ex.b_gate_up] = tuple((name, weakref.ref(v) if isinstance(v, torch.Tensor) else v)
                                     for name, v in _fields(ex))


def _tensor(ex: "OverlayExperts", name: str, *, optional: bool = False) -> torch.Tensor | None:
    t = getattr(ex, name, None)
    if t is None:
        if optional:
            return None
        raise ValueError(f"OverlayExperts.{name} is missing (None)")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"OverlayExperts.{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check(name: str, t: torch.Tensor, shape: tuple, labels: str, dtypes: tuple[torch.dtype, ...],
           device: torch.device) -> None:
    """``t`` has exactly ``shape`` (``labels`` names its axes for the message), one of ``dtypes``, sits on
    ``device`` and is contiguous."""
    if t.dtype not in dtypes:
        raise TypeError(f"OverlayExperts.{name} has dtype {t.dtype}, expected one of {[str(d) for d in dtypes]}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"OverlayExperts.{name} has shape {list(t.shape)}, expected {labels} = {list(shape)}")
    if t.device != device:
        raise ValueError(f"OverlayExperts.{name} is on {t.device} but OverlayExperts.b_gate_up is on {device}: "
                         f"every tensor of an overlay layer must be on one device")
    if not t.is_contiguous():
        raise ValueError(f"OverlayExperts.{name} must be contiguous (strides {list(t.stride())} for shape "
                         f"{list(t.shape)}); pass it through .contiguous()")


def _same_dtype(names: tuple[str, ...], tensors: list[torch.Tensor], what: str) -> None:
    first = tensors[0]
    for name, t in zip(names, tensors):
        if t.dtype != first.dtype:
            raise TypeError(f"OverlayExperts.{name} has dtype {t.dtype} but OverlayExperts.{names[0]} has "
                            f"{first.dtype}: {what} share one dtype")


def validate_overlay_experts(ex: "OverlayExperts") -> None:
    """Check every tensor of one overlay layer against the kernel layout; called by ``OverlayExperts.__post_init__``.

    The layout (``E`` experts, hidden size ``H``, intermediate size ``I``, ranks ``rg, ru, rd``):

    - factors, one float dtype (bf16, fp16, fp32; float64 for reference copies): ``b_gate_up [E, rg+ru, H]``,
      ``at_gate [E, rg, I]``, ``at_up [E, ru, I]``, ``b_down [E, rd, I]``, ``at_down [E, rd, H]``;
    - biases (each optional) in the factor dtype: ``bias_gate``, ``bias_up [E, I]``, ``bias_down [E, H]``;
    - base, either float (``base_gate_up [2I, H]``, ``base_down [H, I]``, one float dtype, the MXFP4 fields
      None) or MXFP4 (``base_gate_up = base_down = None``; uint8 ``base_gate_up_blocks [2I, H/32, 16]``,
      ``base_gate_up_scales [2I, H/32]``, ``base_down_blocks [H, I/32, 16]``, ``base_down_scales [H, I/32]``);
    - every tensor contiguous and on the device of ``b_gate_up``; ``activation`` one of ``swiglu``,
      ``gpt_oss``; ``alpha``, ``limit`` finite.

    ``E``, ``I`` and ``H`` are read from ``at_gate`` (``E``, ``I``) and ``at_down`` (``H``); ``rg``, ``ru``,
    ``rd`` from ``at_gate``, ``at_up``, ``at_down``. A layout is checked once, when it is built: an
    ``OverlayExperts`` rebuilt from the same tensor objects and values (as the custom op does per call) is
    recognised by identity and not checked again; the forward checks only its per-call inputs.

    Parameters
    ----------
    ex : OverlayExperts

    Raises
    ------
    TypeError
        A field is not a tensor, or has the wrong dtype (the message names the field).
    ValueError
        Wrong shape, inconsistent ``E``/ranks/sizes, mixed devices, a non-contiguous tensor, both or neither
        base format, an unknown activation (the message names the field).
    """
    factors = [_tensor(ex, n) for n in _FACTORS]
    if _seen(ex):
        return
    b_gate_up, at_gate, at_up, b_down, at_down = factors
    for name, t in zip(_FACTORS, factors):
        if t.dim() != 3:
            raise ValueError(f"OverlayExperts.{name} must be 3-D [E, r, n], got shape {list(t.shape)}")
    n_experts, rg, inter = at_gate.shape
    ru, rd, hidden = at_up.shape[1], at_down.shape[1], at_down.shape[2]
    if n_experts < 1 or inter < 1 or hidden < 1:
        raise ValueError(f"OverlayExperts.at_gate/at_down give E={n_experts}, I={inter}, H={hidden}: each must be >= 1")
    device = b_gate_up.device
    expected = {"b_gate_up": ((n_experts, rg + ru, hidden), "[E, rg+ru, H]"),
                "at_gate": ((n_experts, rg, inter), "[E, rg, I]"), "at_up": ((n_experts, ru, inter), "[E, ru, I]"),
                "b_down": ((n_experts, rd, inter), "[E, rd, I]"), "at_down": ((n_experts, rd, hidden), "[E, rd, H]")}
    for name, t in zip(_FACTORS, factors):
        if t.shape[0] != n_experts:
            raise ValueError(f"OverlayExperts.{name} has E = {t.shape[0]} experts (shape {list(t.shape)}) but "
                             f"OverlayExperts.at_gate has {n_experts}")
        shape, labels = expected[name]
        _check(name, t, shape, labels, FLOAT_DTYPES, device)
    _same_dtype(_FACTORS, factors, "the factors")
    factor_dtype = b_gate_up.dtype
    for name, shape, labels in (("bias_gate", (n_experts, inter), "[E, I]"), ("bias_up", (n_experts, inter), "[E, I]"),
                                ("bias_down", (n_experts, hidden), "[E, H]")):
        t = _tensor(ex, name, optional=True)
        if t is not None:
            _check(name, t, shape, labels, (factor_dtype,), device)
    _validate_base(ex, inter, hidden, device)
    activation = getattr(ex, "activation", None)
    if activation not in ACTIVATION_NAMES:
        raise ValueError(f"OverlayExperts.activation must be one of {list(ACTIVATION_NAMES)}, got {activation!r}")
    for name in ("alpha", "limit"):
        value = getattr(ex, name, None)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"OverlayExperts.{name} must be a finite float, got {value!r}")
    _remember(ex)


def _validate_base(ex: "OverlayExperts", inter: int, hidden: int, device: torch.device) -> None:
    floats = [_tensor(ex, n, optional=True) for n in _FLOAT_BASE]
    mxfp4 = [_tensor(ex, n, optional=True) for n in _MXFP4_BASE]
    has_float, has_mxfp4 = any(t is not None for t in floats), any(t is not None for t in mxfp4)
    if has_float and has_mxfp4:
        present = [n for n, t in zip(_FLOAT_BASE + _MXFP4_BASE, floats + mxfp4) if t is not None]
        raise ValueError(f"OverlayExperts has both a float base and an MXFP4 base ({', '.join(present)}): "
                         f"set base_gate_up/base_down, or the four *_blocks/*_scales fields, not both")
    if not has_mxfp4:
        base_gate_up, base_down = (_tensor(ex, n) for n in _FLOAT_BASE)
        _check("base_gate_up", base_gate_up, (2 * inter, hidden), "[2I, H]", FLOAT_DTYPES, device)
        _check("base_down", base_down, (hidden, inter), "[H, I]", FLOAT_DTYPES, device)
        _same_dtype(_FLOAT_BASE, [base_gate_up, base_down], "the two float bases")
        return
    for name, size in (("H", hidden), ("I", inter)):
        if size % MXFP4_BLOCK:
            raise ValueError(f"OverlayExperts has an MXFP4 base but {name} = {size} is not a multiple of "
                             f"{MXFP4_BLOCK} (the MXFP4 block)")
    shapes = {"base_gate_up_blocks": ((2 * inter, hidden // MXFP4_BLOCK, 16), "[2I, H/32, 16]"),
              "base_gate_up_scales": ((2 * inter, hidden // MXFP4_BLOCK), "[2I, H/32]"),
              "base_down_blocks": ((hidden, inter // MXFP4_BLOCK, 16), "[H, I/32, 16]"),
              "base_down_scales": ((hidden, inter // MXFP4_BLOCK), "[H, I/32]")}
    for name in _MXFP4_BASE:
        shape, labels = shapes[name]
        _check(name, _tensor(ex, name), shape, labels, (torch.uint8,), device)
