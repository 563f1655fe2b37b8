"""Actions `chat`, `compare` and `ablate`: generation and next-token loss under routing interventions."""

from __future__ import annotations

import argparse

import numpy as np

from lazarus_core.analysis.loss_comparison import generate, loss_comparison
from lazarus_core.cli.routing_common import (Session, add_common, choose_layers, console, emit, experts_str,
                                             parse_int_list)


# --------------------------------------------------------------------------------------- the edit
def add_intervention_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ablate", default=None, metavar="E,E", help="experts removed from selection")
    p.add_argument("--force", default=None, metavar="E,E", help="experts always selected")
    p.add_argument("--boost", action="append", default=[], metavar="E:DELTA", help="add DELTA to expert E's router logit")
    p.add_argument("--suppress", action="append", default=[], metavar="E:DELTA", help="subtract DELTA from E's logit")
    p.add_argument("--top-k", type=int, default=None, help="experts per token instead of the model's k")
    p.add_argument("--intervene-layers", default=None, metavar="L,L",
                   help="MoE layers the intervention applies to (default: all)")


def _deltas(items: list[str], flag: str, sign: float) -> dict[int, float]:
    out: dict[int, float] = {}
    for item in items:
        try:
            e, d = item.split(":")
            out[int(e)] = out.get(int(e), 0.0) + sign * abs(float(d))
        except ValueError:
            raise ValueError(f"{flag} expects EXPERT:DELTA (e.g. 3:2.5), got {item!r}") from None
    return out


def edit_from_args(args: argparse.Namespace):
    """The :class:`lazarus_core.routing.RoutingEdit` the flags describe, or None when there is none."""
    from lazarus_core.routing import RoutingEdit

    delta = _deltas(args.boost, "--boost", 1.0)
    for e, d in _deltas(args.suppress, "--suppress", -1.0).items():
        delta[e] = delta.get(e, 0.0) + d
    edit = RoutingEdit(ablate=tuple(parse_int_list(args.ablate, "--ablate") or ()),
                       force=tuple(parse_int_list(args.force, "--force") or ()), logit_delta=delta, top_k=args.top_k)
    if not (edit.ablate or edit.force or edit.logit_delta or edit.top_k):
        return None
    return edit


def _intervene_layers(args: argparse.Namespace, session: Session) -> list[int] | None:
    layers = parse_int_list(args.intervene_layers, "--intervene-layers")
    if layers is not None:
        bad = [l for l in layers if l not in session.info.layers]
        if bad:
            raise ValueError(f"--intervene-layers {bad} are out of range: the MoE layers are {sorted(session.info.layers)}")
    return layers


# ---------------------------------------------------------------------------------- computations
def _generate(session: Session, prompt: str, max_new_tokens: int, layer: int, edit=None, layers=None):
    g = generate(session.model, session.tokenizer, session.encode(prompt), max_new_tokens, layer, edit, layers,
                 info=session.info)
    return g.text, g.new_ids, g.topk_ids, g.topk_weights


def _loss(session: Session, prompts: list[str], edit, layers, seed: int = 0):
    return loss_comparison(session.model, [session.encode(p) for p in prompts], edit, layers, info=session.info,
                           seed=seed)


def _ci_text(res) -> str:
    ci = res.delta_nll_ci
    return (f"delta {res.delta_nll:+.4f} [{ci.low:+.4f}, {ci.high:+.4f}] nats/token "
            f"({ci.level:.0%} {ci.method}{', includes 0' if res.includes_zero else ''})")


# ---------------------------------------------------------------------------------------- actions
def _edit_text(edit) -> str:
    if edit is None:
        return "none"
    d = edit.to_dict()
    return ", ".join(f"{k}={v}" for k, v in d.items() if v)


def run_chat(args: argparse.Namespace) -> int:
    """Generate from prompts (-p, or a REPL) with optional interventions; show the experts of each new token."""
    from rich.table import Table

    session = Session(args)
    layer = choose_layers(args, sorted(session.info.layers), many=False)[0]
    edit, layers = edit_from_args(args), _intervene_layers(args, session)
    con = console()
    turns = []

    def turn(prompt: str) -> None:
        text, new, rids, rw = _generate(session, prompt, args.max_new_tokens, layer, edit, layers)
        con.print(f"[bold]{prompt}[/bold]{text}")
        n_prompt = len(session.encode(prompt))
        if args.verbose:
            t = Table(title=f"generated tokens, experts at layer {layer} (intervention: {_edit_text(edit)})")
            t.add_column("step")
            t.add_column("token")
            t.add_column("experts")
            for i, tid in enumerate(new[:-1]):
                row = n_prompt + i
                if row < len(rids):
                    t.add_row(str(i + 1), repr(session.tokenizer.decode([tid]))[1:-1], experts_str(rids[row], rw[row]))
            con.print(t)
        turns.append({"prompt": prompt, "completion": text, "new_token_ids": new,
                      "routing_layer": layer, "topk_ids": rids.tolist(), "topk_weights": rw.tolist()})

    if args.prompt:
        for p in args.prompt:
            turn(p)
    else:
        con.print("chat: type a prompt, q to quit")
        while True:
            try:
                line = input("> ").strip()
            except (EOFError, KeyboardInterrupt):
                break
            if line in ("q", "quit", "exit"):
                break
            if line:
                turn(line)
    emit(args, {"action": "chat", "model": session.spec, "intervention": edit.to_dict() if edit else None,
                "intervene_layers": layers, "turns": turns})
    return 0


def run_compare(args: argparse.Namespace) -> int:
    """The same prompts with and without an intervention: loss, KL, top-1 agreement, routing change, continuations."""
    from rich.table import Table

    session = Session(args)
    edit, layers = edit_from_args(args), _intervene_layers(args, session)
    if edit is None:
        raise ValueError("compare needs an intervention: --ablate, --force, --boost, --suppress or --top-k")
    prompts = args.prompt or ["King is to queen as man is to woman", "2 + 3 = 5"]
    layer = choose_layers(args, sorted(session.info.layers), many=False)[0]
    loss = _loss(session, prompts, edit, layers)
    con = console()
    rows = []
    t = Table(title=f"compare: baseline vs intervention ({_edit_text(edit)}) at layers {layers or 'all'}")
    for col in ("prompt", "baseline continuation", "intervened continuation", f"L{layer} top-k changed"):
        t.add_column(col)
    for p in prompts:
        base = _generate(session, p, args.max_new_tokens, layer)
        edited = _generate(session, p, args.max_new_tokens, layer, edit, layers)
        n = min(len(base[2]), len(edited[2]), len(session.encode(p)))
        changed = float(np.mean([set(base[2][i]) != set(edited[2][i]) for i in range(n)])) if n else 0.0
        rows.append({"prompt": p, "baseline": base[0], "intervened": edited[0], "topk_changed_on_prompt": changed})
        t.add_row(p, base[0], edited[0], f"{changed:.0%}")
    con.print(t)
    con.print(f"next-token loss {loss.nll_base:.3f} -> {loss.nll_edit:.3f} nats/token (x{loss.perplexity_ratio:.2f} "
              f"perplexity), {_ci_text(loss)}, KL {loss.kl:.4f}, top-1 agreement {loss.top1_agreement:.0%} over "
              f"{loss.tokens} tokens")
    if args.verbose:
        con.print(loss.to_dict())
    emit(args, {"action": "compare", "model": session.spec, "loss": loss.to_dict(), "prompts": rows})
    return 0


def run_ablate(args: argparse.Namespace) -> int:
    """Loss impact of removing experts: the given ones (--ablate) or each expert of one layer in turn."""
    from rich.table import Table

    from lazarus_core.routing import RoutingEdit
    from lazarus_core.trigram.prompts import resolve_categories, taxonomy_corpus

    session = Session(args)
    prompts = args.prompt or taxonomy_corpus(resolve_categories(args.categories), args.prompts_per_category, args.seed)[0]
    con = console()
    experts = parse_int_list(args.ablate, "--ablate")
    if experts:
        layers = _intervene_layers(args, session)
        if args.layer is not None:
            layers = choose_layers(args, sorted(session.info.layers), many=False)
        res = _loss(session, prompts, RoutingEdit(ablate=tuple(experts)), layers, args.seed)
        con.print(f"ablating experts {experts} at layers {layers or 'all'}: loss {res.nll_base:.3f} -> {res.nll_edit:.3f} "
                  f"nats/token (x{res.perplexity_ratio:.2f} perplexity), {_ci_text(res)}, KL {res.kl:.4f}, "
                  f"top-1 agreement {res.top1_agreement:.0%} ({res.tokens} tokens)")
        if args.verbose:
            con.print(res.to_dict())
        emit(args, {"action": "ablate", "model": session.spec, "results": [res.to_dict()]})
        return 0
    layer = choose_layers(args, sorted(session.info.layers), many=False)[0]
    results = [_loss(session, prompts, RoutingEdit(ablate=(e,)), [layer], args.seed)
               for e in range(session.info.layers[layer].num_experts)]
    t = Table(title=f"ablate each expert of layer {layer} ({results[0].tokens} tokens, baseline "
                    f"{results[0].nll_base:.3f} nats/token)")
    for col in ("expert", "delta loss", "95% CI", "perplexity x", "KL", "top-1 agreement",
                *(("loss",) if args.verbose else ())):
        t.add_column(col, justify="right")
    order = sorted(range(len(results)), key=lambda e: -results[e].delta_nll)
    for e in order:
        r = results[e]
        ci = r.delta_nll_ci
        t.add_row(f"E{e}", f"{r.delta_nll:+.4f}", f"[{ci.low:+.4f}, {ci.high:+.4f}]{'' if r.includes_zero else ' *'}",
                  f"{r.perplexity_ratio:.3f}", f"{r.kl:.4f}", f"{r.top1_agreement:.0%}",
                  *((f"{r.nll_edit:.4f}",) if args.verbose else ()))
    con.print(t)
    emit(args, {"action": "ablate", "model": session.spec, "layer": layer,
                "results": [dict(r.to_dict(), expert=e) for e, r in enumerate(results)]})
    return 0


def register(actions: argparse._SubParsersAction) -> None:
    """Add chat, compare and ablate."""
    p = actions.add_parser("chat", help="generate with optional routing interventions; experts of each new token")
    add_common(p, many_layers=False, trace=False, model_required=True, classifier=False)
    p.add_argument("-p", "--prompt", action="append", default=None, help="prompt(s); without -p: interactive")
    p.add_argument("--max-new-tokens", type=int, default=20)
    add_intervention_flags(p)
    p.set_defaults(func=run_chat)
    p = actions.add_parser("compare", help="baseline vs intervention: loss, KL, continuations, routing change")
    add_common(p, many_layers=False, trace=False, model_required=True, classifier=False)
    p.add_argument("-p", "--prompt", action="append", default=None, help="prompt(s) (default: two built-in)")
    p.add_argument("--max-new-tokens", type=int, default=12)
    add_intervention_flags(p)
    p.set_defaults(func=run_compare)
    p = actions.add_parser("ablate", help="loss impact of removing experts (given ones, or each expert of a layer)")
    add_common(p, many_layers=False, trace=False, model_required=True, classifier=False)
    p.add_argument("-p", "--prompt", action="append", default=None, help="prompt(s) (default: taxonomy prompts)")
    p.add_argument("--ablate", default=None, metavar="E,E", help="experts to remove (default: each expert of --layer in turn)")
    p.add_argument("--intervene-layers", default=None, metavar="L,L", help="layers for --ablate (default all)")
    p.add_argument("--categories", default=None)
    p.add_argument("--prompts-per-category", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_ablate)
