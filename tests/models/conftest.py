"""Fixtures for checkpoint tests: each tiny fixture checkpoint is generated once per session."""

import shutil
from pathlib import Path

import pytest

from tests.fixtures.checkpoints import write_checkpoint


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    """``checkpoint_dir(name) -> Path``: the generated checkpoint ``name`` (read-only: copy before editing)."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = write_checkpoint(name, tmp_path_factory.mktemp("ckpt") / name)
        return cache[name]

    return get


@pytest.fixture
def checkpoint_copy(checkpoint_dir, tmp_path):
    """``checkpoint_copy(name) -> Path``: a private, editable copy of checkpoint ``name``."""

    def copy(name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(checkpoint_dir(name), dst)
        return dst

    return copy
