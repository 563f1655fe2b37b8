"""Model access: built-in model aliases and (later) checkpoint readers for every MoE family."""

from lazarus_core.models.builtin import BuiltinModel, list_builtin_models

__all__ = ["BuiltinModel", "list_builtin_models"]
