"""Command output a user can rely on: strict JSON files, no library progress bars or warnings by default."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lazarus_core.cli.io import strict_json, write_json


def _strict_load(text: str):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_strict_json_turns_undefined_numbers_into_null(tmp_path):
    payload = {"a": float("nan"), "b": [1.0, float("inf"), -float("inf")], "c": np.float32(0.5),
               "d": np.array([np.nan, 2.0]), 3: {"e": (np.int64(4), None)}}
    path = write_json(tmp_path / "x.json", payload)
    got = _strict_load(path.read_text())
    assert got == {"a": None, "b": [1.0, None, None], "c": 0.5, "d": [None, 2.0], "3": {"e": [4, None]}}
    assert strict_json(1.5) == 1.5 and strict_json("NaN") == "NaN" and math.isnan(float("nan"))


def test_weights_of_a_one_token_prompt_is_strict_json(run_cli, native_model):
    """An expert never chosen has no mean weight: null, not NaN."""
    code, payload, err = run_cli("weights", "-m", native_model, "-p", "hi")
    assert code == 0, err
    assert None in payload["layers"][0]["expert_mean_weight"]


def test_no_loading_bars_or_library_warnings_without_verbose(native_model, tmp_path):
    import subprocess
    import sys

    long_text = tmp_path / "long.txt"
    long_text.write_text(" ".join(["the water was long"] * 300))   # longer than the tokenizer's max length
    cmd = [sys.executable, "-m", "lazarus_core.cli.main", "capture", "-m", native_model, "--text", str(long_text),
           "-o", str(tmp_path / "t"), "--no-progress", "--json"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["num_tokens"] > 512
    for text in (run.stdout, run.stderr):
        assert "Loading weights" not in text and "Token indices sequence length" not in text
