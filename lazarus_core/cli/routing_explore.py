"""Action `explore`: an interactive REPL (or one non-interactive run with -p) over a prompt's tokens, types and experts."""

from __future__ import annotations

import argparse
import os
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

from lazarus_core.cli.routing_common import (PromptRouting, Session, add_common, choose_layers, console, emit,
                                             experts_str, lit)

HELP = """commands:
  PROMPT        analyse a new prompt            l N        switch to layer N
  c "PROMPT"    compare with another prompt     a          all layers for the current prompt
  d N           deep dive on position N         q          quit       (h: this help)"""

_MARKERS = {"AS": "analogy pivot", "TO": "analogy/relation 'to'", "SYN": "synonym marker", "ANT": "antonym marker",
            "THAN": "comparison marker", "CAUSE": "causation marker", "COND": "conditional marker",
            "QW": "question word", "NEG": "negation", "OP": "operator", "KW": "code keyword"}


@dataclass
class PromptComparison:
    """Experts used (any position, any slot) at one layer by two prompts."""

    layer: int
    prompt_a: str
    prompt_b: str
    shared: list[int]
    only_a: list[int]
    only_b: list[int]
    overlap: float

    def to_dict(self) -> dict:
        return asdict(self)


def compare_prompts(a: PromptRouting, b: PromptRouting, layer: int) -> PromptComparison:
    """Shared and exclusive experts of two routed prompts at ``layer``; overlap = Jaccard of the expert sets."""
    ea, eb = set(a.layers[layer][0].reshape(-1).tolist()), set(b.layers[layer][0].reshape(-1).tolist())
    union = ea | eb
    return PromptComparison(layer, a.text, b.text, sorted(ea & eb), sorted(ea - eb), sorted(eb - ea),
                            len(ea & eb) / len(union) if union else 0.0)


class Explorer:
    """State of an explore session: the model, the current layer and prompt."""

    def __init__(self, session: Session, layer: int) -> None:
        self.session = session
        self.layer = layer
        self.current: PromptRouting | None = None
        self.log: list[dict] = []
        self.con = console()

    def set_layer(self, text: str) -> None:
        try:
            layer = int(text)
        except ValueError:
            raise ValueError(f"l N: N must be a layer number, got {text!r}") from None
        valid = sorted(self.session.info.layers)
        if layer not in valid:
            raise ValueError(f"layer {layer} is out of range: the MoE layers are {valid}")
        self.layer = layer
        if self.current is not None:
            self.show(self.current)

    def analyse(self, text: str) -> PromptRouting:
        self.current = self.session.route(text)
        self.show(self.current)
        self.log.append({"command": "prompt", "layer": self.layer, **self.current.to_dict()})
        return self.current

    def show(self, r: PromptRouting) -> None:
        from rich.table import Table

        ids, weights = r.layers[self.layer]
        view = self.session.args.view
        tri = r.types.trigrams(view)
        t = Table(title=f"Layer {self.layer}: {lit(repr(r.text))}")
        verbose = getattr(self.session.args, "verbose", False)
        other = r.types.trigrams("structural" if view == "semantic" else "semantic") if verbose else None
        for col in ("pos", "token", "type", "struct", "trigram", *(("other view",) if verbose else ()),
                    f"top-{ids.shape[1]} experts"):
            t.add_column(col)
        for i, tok in enumerate(r.types.tokens):
            t.add_row(str(i), lit(repr(tok)[1:-1]), lit(r.types.semantic[i]), lit(r.types.structural[i]), lit(tri[i]),
                      *((lit(other[i]),) if verbose else ()), experts_str(ids[i], weights[i]))
        self.con.print(t)
        marks = [(i, r.types.semantic[i]) for i in range(len(r.types)) if r.types.semantic[i] in _MARKERS]
        if marks:
            self.con.print("pattern summary: " + "; ".join(
                f"pos {i} {lit(repr(r.types.tokens[i].strip()))} ({lit(tri[i])}): {_MARKERS[s]} -> E{int(ids[i][0])}"
                for i, s in marks))

    def compare(self, text: str) -> PromptComparison:
        if self.current is None:
            raise ValueError("c: analyse a prompt first")
        other = self.session.route(text)
        cmp = compare_prompts(self.current, other, self.layer)
        self.con.print(f"[bold]{lit(repr(cmp.prompt_a))} vs {lit(repr(cmp.prompt_b))}[/bold] at layer {self.layer}\n"
                       f"  shared experts: {cmp.shared}\n  only in first:  {cmp.only_a}\n"
                       f"  only in second: {cmp.only_b}\n  overlap (Jaccard): {cmp.overlap:.0%}")
        self.log.append({"command": "compare", **cmp.to_dict()})
        return cmp

    def all_layers(self) -> None:
        from rich.table import Table

        if self.current is None:
            raise ValueError("a: analyse a prompt first")
        r = self.current
        layers = sorted(r.layers)
        t = Table(title=f"Primary (and second) expert per layer: {lit(repr(r.text))}")
        t.add_column("pos")
        t.add_column("token")
        t.add_column("type")
        for l in layers:
            t.add_column(f"L{l}", justify="right")
        for i, tok in enumerate(r.types.tokens):
            t.add_row(str(i), lit(repr(tok)[1:-1]), lit(r.types.semantic[i]),
                      *(experts_str(r.layers[l][0][i], k=2) for l in layers))
        self.con.print(t)
        self.log.append({"command": "all-layers", "text": r.text})

    def deep_dive(self, text: str) -> None:
        from rich.table import Table

        if self.current is None:
            raise ValueError("d: analyse a prompt first")
        r = self.current
        try:
            pos = int(text)
        except ValueError:
            raise ValueError(f"d N: N must be a position, got {text!r}") from None
        if not 0 <= pos < len(r.token_ids):
            raise ValueError(f"position {pos} is out of range: the prompt has {len(r.token_ids)} tokens (0..{len(r.token_ids) - 1})")
        tri = r.types.trigrams(self.session.args.view)
        same = [i for i in range(len(tri)) if tri[i] == tri[pos] and i != pos]
        self.con.print(f"position {pos}: {lit(repr(r.types.tokens[pos]))} (word {lit(repr(r.types.words[pos]))}), "
                       f"{lit(r.types.semantic[pos])} / {lit(r.types.structural[pos])}, trigram {lit(tri[pos])}"
                       + (f"; same trigram at {same}" if same else ""))
        t = Table(title="experts and weights at every layer")
        t.add_column("layer")
        t.add_column("experts (weight)")
        t.add_column("weight sum", justify="right")
        for l in sorted(r.layers):
            ids, w = r.layers[l]
            t.add_row(str(l), experts_str(ids[pos], w[pos]), f"{float(w[pos].sum()):.3f}")
        self.con.print(t)
        self.log.append({"command": "deep-dive", "position": pos, "trigram": tri[pos],
                         "layers": {str(l): {"experts": r.layers[l][0][pos].tolist(),
                                             "weights": r.layers[l][1][pos].tolist()} for l in r.layers}})

    def execute(self, line: str) -> bool:
        """Run one REPL line; returns False on quit. Errors are printed, the session continues."""
        line = line.strip()
        if not line:
            return True
        head, _, rest = line.partition(" ")
        try:
            if line in ("q", "quit", "exit"):
                return False
            if line in ("h", "help", "?"):
                self.con.print(HELP, markup=False, highlight=False)
            elif head == "l" and rest:
                self.set_layer(rest.strip())
            elif head == "c" and rest:
                parts = shlex.split(rest) if rest.strip()[:1] in "\"'" else [rest.strip()]
                self.compare(" ".join(parts))
            elif line == "a":
                self.all_layers()
            elif head == "d" and rest:
                self.deep_dive(rest.strip())
            else:
                self.analyse(line)
        except ValueError as exc:
            self.con.print(f"[red]error:[/red] {lit(exc)}")
        return True


def _repl(explorer: Explorer) -> None:
    try:
        import readline

        history = Path(os.environ.get("LAZARUS_EXPLORE_HISTORY", Path.home() / ".lazarus_explore_history"))
        try:
            readline.read_history_file(history)
        except OSError:
            pass
        readline.set_history_length(1000)
    except ImportError:
        readline = None
    explorer.con.print(HELP, markup=False, highlight=False)
    try:
        while True:
            snippet = f' | "{explorer.current.text[:20]}..."' if explorer.current else ""
            try:
                line = input(f"[L{explorer.layer}{snippet}]> ")
            except EOFError:
                break
            if not explorer.execute(line):
                break
    except KeyboardInterrupt:
        pass
    finally:
        if readline is not None:
            try:
                readline.write_history_file(history)
            except OSError:
                pass


def run_explore(args: argparse.Namespace) -> int:
    """Interactive exploration; with -p, analyse the prompt(s) (and --compare, --all-layers, --deep) and exit."""
    session = Session(args)
    layer = choose_layers(args, sorted(session.info.layers), many=False)[0]
    explorer = Explorer(session, layer)
    if args.prompt:
        for p in args.prompt:
            explorer.analyse(p)
            if args.all_layers:
                explorer.all_layers()
            for pos in args.deep or []:
                explorer.deep_dive(str(pos))
            for other in args.compare or []:
                explorer.compare(other)
    else:
        _repl(explorer)
    emit(args, {"action": "explore", "model": session.model_name, "layer": explorer.layer, "log": explorer.log})
    return 0


def register(actions: argparse._SubParsersAction) -> None:
    """Add explore."""
    p = actions.add_parser("explore", help="interactive routing explorer (REPL; -p for one non-interactive run)")
    add_common(p, many_layers=False, trace=False, model_required=True)
    p.add_argument("-p", "--prompt", action="append", default=None, help="analyse PROMPT and exit (repeatable)")
    p.add_argument("--compare", action="append", default=None, metavar="PROMPT", help="with -p: compare with PROMPT")
    p.add_argument("--all-layers", action="store_true", help="with -p: show every layer")
    p.add_argument("--deep", type=int, action="append", default=None, metavar="N", help="with -p: deep dive on position N")
    p.set_defaults(func=run_explore)
