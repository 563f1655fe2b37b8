"""Errors of checkpoint access: each message names the model, file and tensor at fault."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, truncated, hostile, or holds a tensor of the wrong shape/dtype."""


class ModelNotFoundError(FileNotFoundError):
    """The model argument is neither a local checkpoint, a built-in alias, nor reachable on the hub
    (including an offline miss under ``HF_HUB_OFFLINE=1``)."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint holds only pickle weights (``.bin`` / ``.pt``), which lazarus never loads."""
