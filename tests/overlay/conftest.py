"""Fixtures for the overlay tests: the generated tiny checkpoints of every family (shared with tests/models)."""

from tests.models.conftest import checkpoint_copy, checkpoint_dir  # noqa: F401
