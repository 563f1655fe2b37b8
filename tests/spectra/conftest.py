"""Fixtures for the spectra engine tests: the generated tiny checkpoints of every family."""

from tests.models.conftest import checkpoint_dir  # noqa: F401
