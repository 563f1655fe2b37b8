"""Run a list of routing analyses over one trace from a YAML config: results/<name>.json, figures, an index; resumable."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lazarus_core.routing.trace_format import atomic_write_json

INDEX_FILE = "index.json"
BUILTIN_CONFIGS = {"demo:routing": "demo_native.yaml"}
_CAPTURE_FLAGS = {"logits": "--logits", "hidden_states": "--hidden-states", "expert_outputs": "--expert-outputs",
                  "all_experts": "--all-experts"}


@dataclass
class AnalysisStep:
    """One analysis of an experiment: an ``introspect moe-expert`` action with its options.

    Attributes
    ----------
    name : str
        Result name: ``results/<name>.json`` and ``figures/<name>.png``.
    action : str
        The action, e.g. ``router-entropy``.
    args : dict
        Options by long name without dashes (``min_count: 3`` is ``--min-count 3``; ``true`` is a bare flag,
        a list repeats the value list after the flag).
    """

    name: str
    action: str
    args: dict = field(default_factory=dict)

    def fingerprint(self, trace_key: str) -> str:
        """sha256 of the step and the trace it runs on: a finished step is redone only when this changes."""
        blob = json.dumps({"action": self.action, "args": self.args, "trace": trace_key}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class ExperimentConfig:
    """A parsed experiment config (see docs/experiments.md).

    Attributes
    ----------
    name : str
    model : str
        ``-m`` of every step.
    trace : str or None
        An existing trace directory; None: capture one into ``OUT/trace`` with ``capture``.
    capture : dict
        ``num_tokens`` (default 4096), ``logits``/``hidden_states``/``expert_outputs``/``all_experts`` (bool),
        ``sample_tokens``, ``seq_len``, ``jsonl`` + ``field`` + ``label_field`` (default: the built-in
        model's held-out documents, labelled by category).
    analyses : list of AnalysisStep
    source : Path or None
        The config file.
    """

    name: str
    model: str
    analyses: list[AnalysisStep]
    trace: str | None = None
    capture: dict = field(default_factory=dict)
    source: Path | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["source"] = str(self.source) if self.source else None
        return d


def builtin_config_path(name: str) -> Path | None:
    """The shipped config a name such as ``demo:routing`` stands for (None when it names none)."""
    file = BUILTIN_CONFIGS.get(name.strip().lower())
    return Path(__file__).parent / "configs" / file if file else None


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and check an experiment config (YAML or JSON; ``demo:routing`` is the shipped example).

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        Malformed YAML, a missing key, a duplicate analysis name or an unknown action (the message names
        the file and the entry).
    """
    import yaml

    path = builtin_config_path(str(path)) or Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"experiment config {path} does not exist (the shipped example is demo:routing)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping with name, model and analyses")
    for key in ("model", "analyses"):
        if key not in raw:
            raise ValueError(f"{path}: missing key {key!r}")
    if not isinstance(raw["analyses"], list) or not raw["analyses"]:
        raise ValueError(f"{path}: 'analyses' must be a non-empty list")
    known = set(_action_parsers())
    steps, names = [], set()
    for i, entry in enumerate(raw["analyses"]):
        if not isinstance(entry, dict) or "action" not in entry:
            raise ValueError(f"{path}: analyses[{i}] needs an 'action'")
        action = str(entry["action"])
        if action not in known:
            raise ValueError(f"{path}: analyses[{i}]: unknown action {action!r}; known: {', '.join(sorted(known))}")
        name = str(entry.get("name", action))
        if name in names:
            raise ValueError(f"{path}: analyses[{i}]: duplicate name {name!r}")
        names.add(name)
        args = entry.get("args") or {}
        if not isinstance(args, dict):
            raise ValueError(f"{path}: analyses[{i}].args must be a mapping")
        steps.append(AnalysisStep(name, action, dict(args)))
    return ExperimentConfig(name=str(raw.get("name", path.stem)), model=str(raw["model"]), analyses=steps,
                            trace=raw.get("trace"), capture=dict(raw.get("capture") or {}), source=path)


def _action_parsers() -> dict:
    """``introspect moe-expert`` action name -> its argparse parser."""
    import argparse

    from lazarus_core.cli.main import build_parser

    def subparsers(parser):
        return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices

    return dict(subparsers(subparsers(subparsers(build_parser())["introspect"])["moe-expert"]))


def _options(parser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def step_argv(step: AnalysisStep, parser, *, model: str, trace: Path, result: Path, figure: Path) -> list[str]:
    """The command line of one step: the action, ``-m``, ``--trace`` / ``--plot`` where the action takes them, its args."""
    options = _options(parser)
    argv = ["introspect", "moe-expert", step.action, "-m", model, "-o", str(result)]
    if "--trace" in options:
        argv += ["--trace", str(trace)]
    if "--plot" in options and "plot" not in step.args:
        argv += ["--plot", str(figure)]
    for key, value in step.args.items():
        flag = "--" + str(key).replace("_", "-")
        if flag not in options:
            raise ValueError(f"analysis {step.name!r}: action {step.action} has no option {flag}")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


@dataclass
class StepResult:
    """What happened to one step (an entry of ``index.json``)."""

    name: str
    action: str
    status: str                 # "done", "failed", "skipped" (already done with the same fingerprint)
    seconds: float
    fingerprint: str
    result: str | None
    figure: str | None
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ExperimentReport:
    """The outcome of :func:`run_experiment` (also ``index.json``)."""

    name: str
    out_dir: str
    model: str
    trace: str
    steps: list[StepResult]

    @property
    def failed(self) -> list[StepResult]:
        return [s for s in self.steps if s.status == "failed"]

    def to_dict(self) -> dict:
        return {"format": "lazarus-experiment", "version": 1, "name": self.name, "out_dir": self.out_dir,
                "model": self.model, "trace": self.trace, "steps": [s.to_dict() for s in self.steps]}


def _ensure_trace(cfg: ExperimentConfig, out: Path, progress) -> Path:
    """The experiment's trace: the configured one, or a capture into ``out/trace`` (resumed when interrupted)."""
    from lazarus_core.cli.main import main
    from lazarus_core.models.builtin import resolve_builtin

    if cfg.trace:
        return Path(cfg.trace)
    trace = out / "trace"
    meta_path = trace / "trace.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("complete"):
        return trace
    cap = dict(cfg.capture)
    argv = ["capture", "-m", cfg.model, "-o", str(trace), "--max-tokens", str(cap.pop("num_tokens", 4096)),
            "--no-progress"]
    jsonl = cap.pop("jsonl", None)
    builtin = resolve_builtin(cfg.model)
    if jsonl is None and builtin is not None and (builtin / "heldout.jsonl").is_file():
        jsonl = str(builtin / "heldout.jsonl")
        cap.setdefault("label_field", "category")
    if jsonl is None:
        raise ValueError(f"{cfg.source}: capture needs a corpus: set capture.jsonl (or give a trace)")
    argv += ["--jsonl", str(jsonl), "--field", str(cap.pop("field", "text"))]
    if cap.get("label_field"):
        argv += ["--label-field", str(cap.pop("label_field"))]
    for key, flag in _CAPTURE_FLAGS.items():
        if cap.pop(key, False):
            argv.append(flag)
    for key in ("sample_tokens", "seq_len", "batch_size", "activation_dtype", "seed", "shard_tokens"):
        if key in cap:
            argv += ["--" + key.replace("_", "-"), str(cap.pop(key))]
    cap.pop("label_field", None)
    if cap:
        raise ValueError(f"{cfg.source}: unknown capture options {', '.join(sorted(cap))}")
    if meta_path.is_file():
        argv.append("--resume")
    progress(f"capture -> {trace}")
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink):
        code = main(argv)
    (out / "logs").mkdir(exist_ok=True)
    (out / "logs" / "capture.txt").write_text(" ".join(argv) + "\n\n" + sink.getvalue())
    if code != 0:
        raise RuntimeError(f"capture for experiment {cfg.name!r} failed (see the message above); rerun to resume")
    return trace


def run_experiment(config: str | Path | ExperimentConfig, out_dir: str | Path | None = None, *,
                   force: bool = False, progress=None) -> ExperimentReport:
    """Run every analysis of an experiment config over one trace, writing results, figures and an index.

    Each step runs its ``introspect moe-expert`` action (the same code as the command line) with
    ``--trace`` on the experiment's trace and ``-o OUT/results/<name>.json``, ``--plot
    OUT/figures/<name>.png`` where the action takes them. ``OUT/index.json`` is rewritten after every
    step, so an interrupted run resumes: a step already done with the same options and trace is
    skipped (``force`` redoes it); a failed step is recorded with its error and the others still run.

    Parameters
    ----------
    config : str, Path or ExperimentConfig
        A YAML file, ``demo:routing`` (the shipped example on demo:native) or a parsed config.
    out_dir : str or Path, optional
        Output directory (default ``experiments/<name>`` under the current directory).
    force : bool
        Redo steps that are already done.
    progress : callable, optional
        ``progress(message: str)`` is called before each step (the CLI prints it).

    Returns
    -------
    ExperimentReport
    """
    cfg = config if isinstance(config, ExperimentConfig) else load_config(config)
    out = Path(out_dir) if out_dir is not None else Path("experiments") / cfg.name
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    progress = progress or (lambda message: None)
    index_path = out / INDEX_FILE
    previous = {}
    if index_path.is_file():
        previous = {s["name"]: s for s in json.loads(index_path.read_text()).get("steps", [])}
    trace = _ensure_trace(cfg, out, progress)
    trace_meta = json.loads((trace / "trace.json").read_text()) if (trace / "trace.json").is_file() else {}
    trace_key = json.dumps([str(trace), [s.get("sha256") for s in trace_meta.get("shards", [])]])
    parsers = _action_parsers()
    report = ExperimentReport(cfg.name, str(out), cfg.model, str(trace), [])
    from lazarus_core.cli.main import main

    for i, step in enumerate(cfg.analyses, 1):
        result, figure = out / "results" / f"{step.name}.json", out / "figures" / f"{step.name}.png"
        fp = step.fingerprint(trace_key)
        old = previous.get(step.name)
        if not force and old and old["status"] in ("done", "skipped") and old["fingerprint"] == fp and result.is_file():
            report.steps.append(StepResult(step.name, step.action, "skipped", 0.0, fp, str(result), old.get("figure")))
            continue
        progress(f"[{i}/{len(cfg.analyses)}] {step.name}: {step.action}")
        start, error, sink, argv = time.perf_counter(), None, io.StringIO(), [step.action]
        try:
            argv = step_argv(step, parsers[step.action], model=cfg.model, trace=trace, result=result, figure=figure)
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                code = main(argv)
            if code != 0:
                error = (sink.getvalue().strip().splitlines() or [f"exit code {code}"])[-1]
        except Exception as exc:  # a failing analysis is recorded; the experiment goes on
            error = f"{type(exc).__name__}: {exc}"
        status = "failed" if error or not result.is_file() else "done"
        if status == "failed" and error is None:
            error = f"{step.action} wrote no result"
        (out / "logs").mkdir(exist_ok=True)
        (out / "logs" / f"{step.name}.txt").write_text(" ".join(argv) + "\n\n" + sink.getvalue())
        report.steps.append(StepResult(step.name, step.action, status, round(time.perf_counter() - start, 3), fp,
                                       str(result) if result.is_file() else None,
                                       str(figure) if figure.is_file() else None, error))
        atomic_write_json(index_path, dict(report.to_dict(), config=cfg.to_dict(), complete=False))
    atomic_write_json(index_path, dict(report.to_dict(), config=cfg.to_dict(), complete=True))
    return report


def experiment_status(out_dir: str | Path) -> dict:
    """The ``index.json`` of an experiment directory.

    Raises
    ------
    FileNotFoundError
        ``out_dir`` holds no ``index.json`` (it never ran).
    """
    path = Path(out_dir) / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {out_dir} is not an experiment directory (run it first)")
    return json.loads(path.read_text())
