"""Model access: built-in model aliases, MoE family detection and the streaming expert reader."""

from lazarus_core.models.builtin import BuiltinModel, list_builtin_models, resolve_builtin
from lazarus_core.models.checkpoint import PROJECTIONS, MoeCheckpoint, RouterWeights, open_moe_checkpoint
from lazarus_core.models.encoded import EncodedExpert
from lazarus_core.models.errors import CheckpointError, ModelNotFoundError, UnsafeCheckpointError
from lazarus_core.models.families import (
    SUPPORTED_FAMILIES,
    DiskNames,
    FamilySpec,
    RoutingConvention,
    SharedExpertSpec,
    UnsupportedModelError,
    detect_family,
)

__all__ = [
    "BuiltinModel",
    "list_builtin_models",
    "resolve_builtin",
    "SUPPORTED_FAMILIES",
    "DiskNames",
    "FamilySpec",
    "RoutingConvention",
    "SharedExpertSpec",
    "UnsupportedModelError",
    "detect_family",
    "PROJECTIONS",
    "MoeCheckpoint",
    "RouterWeights",
    "EncodedExpert",
    "open_moe_checkpoint",
    "CheckpointError",
    "ModelNotFoundError",
    "UnsafeCheckpointError",
]
