"""User text that looks like rich markup ([/i], [as], [bold]x, [link=x]) is printed literally by every action."""

from __future__ import annotations

import json

import pytest

MARKS = ["[/i]", "[as]", "[bold]x", "[link=x]"]
PROMPT = "x = a[/i] + y [as] z [bold]x w [link=x] end"
LABELS = ["a[/i]", "[as]", "[bold]x", "[link=x]"]
TEXTS = ["the sum of two and three is five", "def add(a, b): return a + b", "the cat sat on the mat by the door",
         "if it rains then the grass is wet", "four times four is sixteen", "she read the letter twice"]
CONTEXTS = ["king is to queen as man is to woman", "fast as a [link=x] car", "as [bold]x said"]


@pytest.fixture
def run_out(tmp_path, capsys, monkeypatch):
    """``run_out(*argv, moe=True) -> (exit code, stdout + stderr)``; ``-o`` goes to a file under a ``[link=x]`` folder."""
    from lazarus_core.cli.main import main

    monkeypatch.setenv("COLUMNS", "400")           # wide tables: no wrapping inside the texts looked for
    counter = [0]

    def run(*argv: str, moe: bool = True, output: bool = True):
        counter[0] += 1
        out = tmp_path / "o[link=x]" / f"out[as]{counter[0]}.json"
        args = (["introspect", "moe-expert"] if moe else []) + list(argv) + (["-o", str(out)] if output else [])
        code = main(args)
        captured = capsys.readouterr()
        text = captured.out + captured.err
        if output and code == 0:
            assert f"wrote {out}" in text          # the output file's name, literally
            json.loads(out.read_text())
        return code, text

    return run


@pytest.fixture(scope="module")
def labelled_trace(native_model, tmp_path_factory):
    """A demo:native trace whose documents carry markup-like labels, in a folder whose name looks like markup."""
    from lazarus_core.cli.main import main

    root = tmp_path_factory.mktemp("markup")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "category": LABELS[i % len(LABELS)]}) + "\n"
                              for i, t in enumerate(TEXTS)))
    out = root / "t[as]"
    assert main(["capture", "-m", native_model, "--jsonl", str(corpus), "--label-field", "category", "-o", str(out),
                 "--logits", "--no-progress", "--json"]) == 0
    return out


# action argv (demo:native) -> the texts that must appear literally
PROMPT_ACTIONS = {
    "explore": (["explore", "-p", PROMPT, "--compare", "b [bold]x", "--all-layers", "--deep", "3"], MARKS),
    "trace": (["trace", "-p", PROMPT], MARKS),
    "token-routing": (["token-routing", "--token", "as", "--contexts", *CONTEXTS, "-v"], ["[as]", "[link=x]", "[bold]x"]),
    "context-test": (["context-test", "--token", "as", "--contexts", *CONTEXTS, "-v"], ["[as]", "[link=x]", "[bold]x"]),
    "context-window": (["context-window", "-p", PROMPT, "--position", "3"], []),
    "attention-routing": (["attention-routing", "-p", PROMPT], MARKS),
    "attention-pattern": (["attention-pattern", "-p", PROMPT], []),
    "chat": (["chat", "-p", PROMPT, "--ablate", "1", "--max-new-tokens", "2"], MARKS),
    "compare": (["compare", "-p", PROMPT, "-p", "[as] two", "--ablate", "1", "--max-new-tokens", "2"], MARKS),
    "ablate": (["ablate", "-p", PROMPT, "--ablate", "1"], []),
    "steer": (["steer", "-p", PROMPT, "--expert", "0", "--max-new-tokens", "2"], MARKS),
}


@pytest.mark.parametrize("action", list(PROMPT_ACTIONS))
def test_prompt_actions_print_markup_literally(action, native_model, run_out):
    argv, expected = PROMPT_ACTIONS[action]
    code, text = run_out(*argv, "-m", native_model)
    assert code == 0, text
    for mark in expected:
        assert mark in text, (mark, text[-3000:])


TRACE_ACTIONS = {
    "full-taxonomy": ["full-taxonomy"],
    "domain-test": ["domain-test", "--permutations", "0"],
    "router-metrics": ["router-metrics", "--permutations", "2", "--n-boot", "50"],
    "expert-profile": ["expert-profile", "--expert", "0", "--no-loss"],
}


@pytest.mark.parametrize("action", list(TRACE_ACTIONS))
def test_trace_labels_print_literally(action, labelled_trace, run_out):
    code, text = run_out(*TRACE_ACTIONS[action], "--trace", str(labelled_trace))
    assert code == 0, text
    for label in LABELS:
        assert label in text, (label, text[-3000:])


def test_figure_names_print_literally(labelled_trace, run_out, tmp_path):
    plot = tmp_path / "h[bold]x.png"
    code, text = run_out("heatmap", "--trace", str(labelled_trace), "--plot", str(plot))
    assert code == 0, text
    assert f"wrote {plot}" in text and plot.is_file()


def test_explore_repl_errors_print_literally(native_model, run_out, monkeypatch, tmp_path):
    lines = iter([PROMPT, "l [bold]x", "d [link=x]", "q"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    monkeypatch.setenv("LAZARUS_EXPLORE_HISTORY", str(tmp_path / "history"))
    code, text = run_out("explore", "-m", native_model)
    assert code == 0, text
    assert "got '[bold]x'" in text and "got '[link=x]'" in text and "[/i]" in text


def test_capture_table_prints_the_trace_folder_literally(native_model, run_out, tmp_path):
    out = tmp_path / "c[/i]" / "t[as]"
    code, text = run_out("capture", "-m", native_model, "-p", PROMPT, "-o", str(out), "--no-progress", moe=False,
                         output=False)
    assert code == 0, text
    assert str(out) in text


def test_experiment_status_prints_names_literally(run_out, tmp_path):
    index = {"name": "[bold]x", "out_dir": str(tmp_path / "e[as]"), "trace": "t[/i]", "complete": False,
             "steps": [{"name": "[link=x]", "action": "analyze", "status": "failed", "seconds": 1.0,
                        "error": "a[/i] [as] broke", "result": None}]}
    (tmp_path / "index.json").write_text(json.dumps(index))
    code, text = run_out("experiment", "status", str(tmp_path), moe=False, output=False)
    assert code == 0, text
    for mark in ("[bold]x", "e[as]", "t[/i]", "[incomplete]", "[link=x]", "a[/i] [as] broke"):
        assert mark in text, (mark, text)
