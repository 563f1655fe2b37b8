"""Bad input and output safety: unwritable outputs and Ctrl-C are one-line errors (exit 2 / 130) raised before
the long planning, atomic writes use unique temporary names and fsync before the rename, verify reports the size
ratio and fails an overlay larger than its source, generate reports a median over timed runs."""

from __future__ import annotations

import json
import os
import statistics
import threading

import pytest

from lazarus_core import atomic_io
from lazarus_core.atomic_io import atomic_path, atomic_write_json, atomic_write_text, check_output_dir
from lazarus_core.cli import generate as generate_cli
from lazarus_core.cli.main import main
from lazarus_core.overlay import compute


def _compress(*args: str) -> int:
    return main(["introspect", "moe-expert", "moe-overlay-compress", "--no-progress", *args])


@pytest.fixture
def no_planning(monkeypatch):
    """Fail the test if the spectra (the long part of a compress) are ever started."""
    def fail(*args, **kwargs):
        raise AssertionError("planning started before the output was checked")

    monkeypatch.setattr(compute, "projection_spectrum", fail)


def _one_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lazarus: "), lines
    return lines[0]


def test_out_naming_a_file_is_one_line_before_planning(checkpoint_dir, tmp_path, capsys, no_planning):
    src = str(checkpoint_dir("olmoe"))
    capsys.readouterr()  # the fixture's own output
    (tmp_path / "a_file").write_text("not a directory")
    assert _compress("-m", src, "--rank", "2", "--out", str(tmp_path / "a_file")) == 2
    assert "--out" in (line := _one_line(capsys)) and "not a directory" in line
    assert _compress("-m", src, "--rank", "2", "--out", str(tmp_path / "a_file" / "sub")) == 2
    assert "is a file" in _one_line(capsys)
    assert _compress("-m", src, "--rank", "2", "--out", str(tmp_path / "ov"), "-o", str(tmp_path)) == 2
    assert "-o/--output" in (line := _one_line(capsys)) and "is a directory" in line


def test_permission_denied_is_one_line_before_planning(checkpoint_dir, tmp_path, capsys, no_planning, monkeypatch):
    # Root ignores file modes, so the denial is simulated where the probe creates its file.
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    src = str(checkpoint_dir("olmoe"))
    capsys.readouterr()
    monkeypatch.setattr(atomic_io.tempfile, "mkstemp", denied)
    assert _compress("-m", src, "--rank", "2", "--out", str(tmp_path / "ov")) == 2
    line = _one_line(capsys)
    assert "--out" in line and "permission denied" in line


def test_ctrl_c_is_exit_130_and_leaves_no_temporary_file(checkpoint_dir, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    src = str(checkpoint_dir("olmoe"))
    capsys.readouterr()
    monkeypatch.setattr(compute, "low_rank_parts", interrupted)  # in the middle of writing the first layer
    assert _compress("-m", src, "--rank", "2", "--out", str(tmp_path / "ov")) == 130
    assert _one_line(capsys) == "lazarus: interrupted"
    assert not [p.name for p in (tmp_path / "ov").rglob("*.tmp")]
    assert not json.loads((tmp_path / "ov" / "overlay_config.json").read_text())["complete"]


def test_atomic_writes_fsync_before_a_rename_from_a_unique_name(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic_io.os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(atomic_io.os, "replace", lambda a, b: events.append(("replace", str(a))) or real_replace(a, b))
    target = tmp_path / "x.json"
    atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1} and target.read_text().endswith("\n")
    assert events[0] == "fsync" and events[1][0] == "replace" and events[1][1] != str(target) + ".tmp"
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)  # the mode of a plain open(), not mkstemp's 0600

    names = set()
    barrier = threading.Barrier(2)

    def hold() -> None:
        with atomic_path(target) as tmp:
            names.add(tmp.name)
            barrier.wait()  # both writers hold their temporary file at once
            tmp.write_text(tmp.name)

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(names) == 2 and target.read_text() in names  # two writers never share a temporary file

    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer failed")
    assert target.read_text() in names and sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]
    with pytest.raises(IsADirectoryError):
        atomic_write_text(tmp_path, "x")


def test_check_output_dir_creates_and_refuses(tmp_path):
    assert check_output_dir(tmp_path / "a" / "b").is_dir()
    (tmp_path / "f").write_text("")
    with pytest.raises(FileExistsError, match="--out"):
        check_output_dir(tmp_path / "f")


def test_verify_prints_the_size_ratio_and_fails_a_larger_overlay(checkpoint_dir, tmp_path, capsys, monkeypatch):
    src = str(checkpoint_dir("olmoe"))
    assert _compress("-m", src, "--rank", "32", "--dtype", "fp32", "--out", str(tmp_path / "ov")) == 0
    capsys.readouterr()
    verify = ["introspect", "moe-expert", "moe-overlay-verify", "-m", src, "--overlay", str(tmp_path / "ov")]
    assert main([*verify, "--weights-only", "-o", str(tmp_path / "w.json")]) == 0
    weights = json.loads((tmp_path / "w.json").read_text())
    assert weights["verdict"] is None and weights["size_ratio"] < 1
    assert weights["size_ratio"] == pytest.approx(weights["source_expert_bytes"] / weights["overlay_bytes"])
    assert "LARGER" in capsys.readouterr().out

    from lazarus_core.overlay import verify as verify_module

    # Accuracy is not what is tested here (the fixture has no tokenizer): run the model part on a stub that
    # returns a perfect score, so only the size can fail the overlay.
    real = verify_module.verify_overlay

    def perfect(*args, **kwargs):
        report = real(*args, **{**kwargs, "outputs": False})
        report.perplexity_original = report.perplexity_overlay = 2.0
        report.top1_agreement, report.top1_agreement_ci95, report.tokens, report.logit_kl = 1.0, (0.99, 1.0), 100, 0.0
        report.passed = verify_module.verdict(report)
        return report

    monkeypatch.setattr(verify_module, "verify_overlay", perfect)
    assert main([*verify, "-o", str(tmp_path / "v.json")]) == 1
    out = capsys.readouterr().out
    assert "FAIL size ratio 0." in " ".join(out.split())
    assert json.loads((tmp_path / "v.json").read_text())["verdict"] == "FAIL"


def _stub_generation(monkeypatch, on_generate) -> None:
    """``generate_cli.generate`` runs on a stub model (its ``generate`` calls ``on_generate()`` and returns the
    prompt plus zeros) and a stub tokenizer (3 prompt tokens): no weights are loaded."""
    import torch
    import transformers

    import lazarus_core.routing.loading as loading

    class Model:
        def generate(self, ids, **kwargs):
            on_generate()
            return torch.cat([ids, torch.zeros(1, kwargs["max_new_tokens"], dtype=ids.dtype)], 1)

        def parameters(self):
            return iter(())

        buffers = modules = parameters

    class Tokenizer:
        pad_token_id = eos_token_id = 0

        def __call__(self, text, return_tensors):
            return {"input_ids": torch.ones(1, 3, dtype=torch.long)}

        def decode(self, ids, skip_special_tokens):
            return "x" * len(ids)

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: (Model(), None, None))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Tokenizer())


def test_generate_reports_the_median_of_timed_runs_after_a_warm_up(monkeypatch):
    calls = []

    class Clock:
        """perf_counter stub: generate call k takes k + 1 seconds (the warm-up is call 0)."""
        now = 0.0

        def __call__(self):
            return self.now

    clock = Clock()

    def on_generate():
        calls.append(len(calls))
        clock.now += len(calls)

    _stub_generation(monkeypatch, on_generate)
    monkeypatch.setattr(generate_cli.time, "perf_counter", clock)
    result = generate_cli.generate("demo:native", "p", max_new_tokens=4, runs=4)
    assert calls == [0, 1, 2, 3, 4]  # one warm-up + 4 timed runs
    assert result.run_seconds == [2.0, 3.0, 4.0, 5.0]  # the 1 s warm-up is not counted
    assert result.seconds == statistics.median(result.run_seconds) == 3.5
    assert result.tokens_per_second == pytest.approx(4 / 3.5) and result.runs == 4
    with pytest.raises(ValueError, match="--runs"):
        generate_cli.generate("demo:native", "p", runs=0)


def test_generate_runs_in_the_requested_mxfp4_token_mode(monkeypatch):
    from lazarus_core.ops import overlay_moe as op

    seen = []
    _stub_generation(monkeypatch, lambda: seen.append(op.MXFP4_TOKENS))
    default = op.MXFP4_TOKENS
    result = generate_cli.generate("demo:native", "p", max_new_tokens=2, runs=2, mxfp4_tokens="int8")
    assert seen == ["int8"] * 3 and result.mxfp4_tokens == "int8" and result.to_dict()["mxfp4_tokens"] == "int8"
    assert op.MXFP4_TOKENS == default  # restored
    with pytest.raises(ValueError, match="mxfp4_tokens"):
        generate_cli.generate("demo:native", "p", mxfp4_tokens="int4")
    assert op.MXFP4_TOKENS == default
