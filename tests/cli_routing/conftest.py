"""Models for the routing-CLI tests: the built-in demo:native (skipped until shipped) and a generated Qwen3-MoE."""

from __future__ import annotations

import pytest

from tests.models.conftest import checkpoint_dir  # noqa: F401


@pytest.fixture(scope="session")
def native_model():
    """The built-in native demo model's alias (skip when it is not installed)."""
    from lazarus_core.models.builtin import resolve_builtin

    if resolve_builtin("demo:native") is None:
        pytest.skip("demo:native is not installed")
    return "demo:native"


@pytest.fixture(scope="session")
def upcycled_model():
    """The built-in upcycled demo model's alias (GPT-OSS, MXFP4; skip when it is not installed)."""
    from lazarus_core.models.builtin import resolve_builtin

    if resolve_builtin("demo:upcycled") is None:
        pytest.skip("demo:upcycled is not installed")
    return "demo:upcycled"


@pytest.fixture(scope="session")
def other_family_model(tmp_path_factory):
    """A tiny random Qwen3-MoE checkpoint (another family, word-level tokenizer with <unk>) on disk."""
    from tests.routing.tiny_models import save_tiny_checkpoint

    return str(save_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("qwen3") / "ckpt"))


@pytest.fixture
def run_cli(tmp_path, capsys):
    """``run_cli(*argv) -> (exit code, JSON or None, stderr)``; the JSON is what ``-o`` wrote."""
    import json

    from lazarus_core.cli.main import main

    counter = [0]

    def run(*argv: str, output: bool = True):
        counter[0] += 1
        out = tmp_path / f"out{counter[0]}.json"
        args = ["introspect", "moe-expert", *argv] + (["-o", str(out)] if output else [])
        code = main(args)
        captured = capsys.readouterr()
        payload = json.loads(out.read_text()) if output and out.exists() else None
        return code, payload, captured.err

    return run
