"""Fixtures for the GPU tests: the generated tiny checkpoints of every family (shared with tests/models)."""

from tests.models.conftest import checkpoint_dir  # noqa: F401
