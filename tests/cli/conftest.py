"""Reuse the session-scoped generated checkpoints of the model tests."""

from tests.models.conftest import checkpoint_dir  # noqa: F401
