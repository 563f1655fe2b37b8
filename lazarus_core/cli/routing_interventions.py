"""Actions `chat`, `compare` and `ablate`: generation and next-token loss under routing interventions, with intervals."""

from __future__ import annotations

import argparse

import numpy as np

from lazarus_core.analysis.loss_comparison import generate, loss_comparison
from lazarus_core.cli.routing_common import (Session, add_common, choose_layers, console, emit, experts_str, lit,
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


def _intervene_layers(args: argparse.Namespace, session: Session, edit=None) -> list[int] | None:
    """``--intervene-layers`` checked against the model, and ``edit`` checked at each of them (messages name flags)."""
    layers = parse_int_list(args.intervene_layers, "--intervene-layers")
    if layers is not None:
        bad = [l for l in layers if l not in session.info.layers]
        if bad:
            raise ValueError(f"--intervene-layers {bad} are out of range: the MoE layers are {sorted(session.info.layers)}")
    if edit is not None:
        for l in (layers if layers is not None else sorted(session.info.layers)):
            check_edit_flags(edit, session.info.layers[l].num_experts, session.info.layers[l].top_k, l)
    return layers


def check_edit_flags(edit, num_experts: int, top_k: int, layer: int) -> None:
    """Raise a one-line ValueError naming the flag when ``edit`` cannot apply to a layer of ``num_experts`` top-``top_k``."""
    flags = (("--ablate", edit.ablate), ("--force", edit.force), ("--boost/--suppress", tuple(edit.logit_delta)))
    for flag, experts in flags:
        bad = [int(e) for e in experts if not 0 <= int(e) < num_experts]
        if bad:
            raise ValueError(f"{flag}: expert {bad[0]} is out of range: layer {layer} has {num_experts} experts "
                             f"(0..{num_experts - 1})")
    k = edit.top_k if edit.top_k is not None else top_k
    if edit.top_k is not None and not 1 <= edit.top_k <= num_experts:
        raise ValueError(f"--top-k {edit.top_k} is out of range: layer {layer} has {num_experts} experts")
    if len(set(edit.force)) > k:
        raise ValueError(f"--force names {len(set(edit.force))} experts but {k} are chosen per token (raise --top-k)")
    both = sorted(set(edit.force) & set(edit.ablate))
    if both:
        raise ValueError(f"experts {both} are in both --force and --ablate")
    if num_experts - len(set(edit.ablate)) < k:
        raise ValueError(f"--ablate leaves {num_experts - len(set(edit.ablate))} experts at layer {layer}, fewer than "
                         f"the {k} chosen per token (lower --top-k)")


# ---------------------------------------------------------------------------------- computations
def _generate(session: Session, prompt: str, max_new_tokens: int, layer: int, edit=None, layers=None):
    g = generate(session.model, session.tokenizer, session.encode(prompt), max_new_tokens, layer, edit, layers,
                 info=session.info)
    return g.text, g.new_ids, g.topk_ids, g.topk_weights


def _loss(session: Session, prompts: list[str], edit, layers, seed: int = 0, *, per_document: bool = False):
    return loss_comparison(session.model, [session.encode(p) for p in prompts], edit, layers, info=session.info,
                           seed=seed, per_document=per_document)


def _units(ci) -> str:
    unit = "documents" if ci.method == "bootstrap-documents" else "tokens"
    return f"{ci.level:.0%} bootstrap over {ci.n_units} {unit}"


def _ci_text(res) -> str:
    """``delta +0.0123 [+0.0010, +0.0240] nats/token, perplexity x1.012 [1.001, 1.024] (95% bootstrap over ...)``."""
    ci, r = res.delta_nll_ci, res.perplexity_ratio_ci
    return (f"delta {res.delta_nll:+.4f} [{ci.low:+.4f}, {ci.high:+.4f}] nats/token, perplexity "
            f"x{r.estimate:.3f} [{r.low:.3f}, {r.high:.3f}] ({_units(ci)}; "
            + ("includes 0: no change detected)" if res.includes_zero else "excludes 0)"))


def _loss_line(res) -> str:
    return (f"next-token loss {res.nll_base:.3f} -> {res.nll_edit:.3f} nats/token, {_ci_text(res)}; "
            f"KL {res.kl:.4f} [{res.kl_ci.low:.4f}, {res.kl_ci.high:.4f}], top-1 agreement "
            f"{res.top1_agreement:.0%} [{res.top1_agreement_ci.low:.0%}, {res.top1_agreement_ci.high:.0%}] over "
            f"{res.tokens} tokens in {res.documents} document{'s' if res.documents != 1 else ''}")


_LOSS_COLUMNS = ("delta loss", "95% CI", "includes 0", "perplexity x [95% CI]")


def _loss_cells(delta: float, ci, includes_zero: bool, ratio) -> list[str]:
    return [f"{delta:+.4f}", f"[{ci.low:+.4f}, {ci.high:+.4f}]", "yes" if includes_zero else "no",
            f"{ratio.estimate:.3f} [{ratio.low:.3f}, {ratio.high:.3f}]"]


# ---------------------------------------------------------------------------------------- actions
def _edit_text(edit) -> str:
    if edit is None:
        return "none"
    d = edit.to_dict()
    return ", ".join(f"{k}={v}" for k, v in d.items() if v)


def run_chat(args: argparse.Namespace) -> int:
    """Generate from prompts (-p, or a REPL) with optional interventions; the prompt's loss change; experts per token."""
    from rich.table import Table

    session = Session(args)
    layer = choose_layers(args, sorted(session.info.layers), many=False)[0]
    edit = edit_from_args(args)
    layers = _intervene_layers(args, session, edit)
    con = console()
    turns = []

    def turn(prompt: str) -> None:
        text, new, rids, rw = _generate(session, prompt, args.max_new_tokens, layer, edit, layers)
        con.print(f"[bold]{lit(prompt)}[/bold]{lit(text)}")
        ids = session.encode(prompt)
        prompt_loss = None
        if edit is not None:
            if len(ids) < 2:
                con.print("prompt loss: the prompt has one token, nothing to predict")
            else:
                prompt_loss = loss_comparison(session.model, [ids], edit, layers, info=session.info, seed=args.seed)
                con.print(f"  prompt under the intervention ({_edit_text(edit)}): {_loss_line(prompt_loss)}")
        if args.verbose:
            t = Table(title=f"generated tokens, experts at layer {layer} (intervention: {_edit_text(edit)})")
            t.add_column("step")
            t.add_column("token")
            t.add_column("experts")
            for i, tid in enumerate(new[:-1]):
                row = len(ids) + i
                if row < len(rids):
                    t.add_row(str(i + 1), lit(repr(session.tokenizer.decode([tid]))[1:-1]),
                              experts_str(rids[row], rw[row]))
            con.print(t)
        turns.append({"prompt": prompt, "completion": text, "new_token_ids": new,
                      "routing_layer": layer, "topk_ids": rids.tolist(), "topk_weights": rw.tolist(),
                      "prompt_loss": prompt_loss.to_dict() if prompt_loss is not None else None})

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
    emit(args, {"action": "chat", "model": session.model_name, "intervention": edit.to_dict() if edit else None,
                "intervene_layers": layers, "turns": turns})
    return 0


def run_compare(args: argparse.Namespace) -> int:
    """The same prompts with and without an intervention: loss (with intervals), KL, top-1 agreement, routing change."""
    from rich.table import Table

    session = Session(args)
    edit = edit_from_args(args)
    layers = _intervene_layers(args, session, edit)
    if edit is None:
        raise ValueError("compare needs an intervention: --ablate, --force, --boost, --suppress or --top-k")
    prompts = args.prompt or ["King is to queen as man is to woman", "2 + 3 = 5"]
    layer = choose_layers(args, sorted(session.info.layers), many=False)[0]
    loss = _loss(session, prompts, edit, layers, args.seed, per_document=True)
    per_doc = {d.document: d for d in loss.per_document}
    con = console()
    rows = []
    t = Table(title=f"compare: baseline vs intervention ({lit(_edit_text(edit))}) at layers {layers or 'all'}; "
                    "loss delta per prompt, 95% CI over its tokens")
    for col in ("prompt", "baseline continuation", "intervened continuation", f"L{layer} top-k changed", *_LOSS_COLUMNS):
        t.add_column(col)
    for i, p in enumerate(prompts):
        base = _generate(session, p, args.max_new_tokens, layer)
        edited = _generate(session, p, args.max_new_tokens, layer, edit, layers)
        n = min(len(base[2]), len(edited[2]), len(session.encode(p)))
        changed = float(np.mean([set(base[2][j]) != set(edited[2][j]) for j in range(n)])) if n else 0.0
        d = per_doc.get(i)
        rows.append({"prompt": p, "baseline": base[0], "intervened": edited[0], "topk_changed_on_prompt": changed,
                     "loss": d.to_dict() if d is not None else None})
        cells = (_loss_cells(d.delta_nll, d.delta_nll_ci, d.includes_zero, d.perplexity_ratio_ci) if d is not None
                 else ["-"] * len(_LOSS_COLUMNS))
        t.add_row(lit(p), lit(base[0]), lit(edited[0]), f"{changed:.0%}", *cells)
    con.print(t)
    con.print(f"all prompts: {_loss_line(loss)}")
    if args.verbose:
        con.print(loss.to_dict())
    emit(args, {"action": "compare", "model": session.model_name, "loss": loss.to_dict(), "prompts": rows})
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
        edit = RoutingEdit(ablate=tuple(experts))
        layers = _intervene_layers(args, session)
        if args.layer is not None:
            layers = choose_layers(args, sorted(session.info.layers), many=False)
        for l in (layers if layers is not None else sorted(session.info.layers)):
            check_edit_flags(edit, session.info.layers[l].num_experts, session.info.layers[l].top_k, l)
        res = _loss(session, prompts, edit, layers, args.seed)
        con.print(f"ablating experts {experts} at layers {layers or 'all'}: {_loss_line(res)}")
        if args.verbose:
            con.print(res.to_dict())
        emit(args, {"action": "ablate", "model": session.model_name, "results": [res.to_dict()]})
        return 0
    layer = choose_layers(args, sorted(session.info.layers), many=False)[0]
    results = [_loss(session, prompts, RoutingEdit(ablate=(e,)), [layer], args.seed)
               for e in range(session.info.layers[layer].num_experts)]
    first = results[0]
    t = Table(title=f"ablate each expert of layer {layer} ({first.tokens} tokens in {first.documents} documents, baseline "
                    f"{first.nll_base:.3f} nats/token; {_units(first.delta_nll_ci)})")
    for col in ("expert", *_LOSS_COLUMNS, "KL", "top-1 agreement", *(("loss",) if args.verbose else ())):
        t.add_column(col, justify="right")
    order = sorted(range(len(results)), key=lambda e: -results[e].delta_nll)
    for e in order:
        r = results[e]
        t.add_row(f"E{e}", *_loss_cells(r.delta_nll, r.delta_nll_ci, r.includes_zero, r.perplexity_ratio_ci),
                  f"{r.kl:.4f}", f"{r.top1_agreement:.0%}", *((f"{r.nll_edit:.4f}",) if args.verbose else ()))
    con.print(t)
    excluded = sum(not r.includes_zero for r in results)
    con.print(f"{excluded} of {len(results)} experts change the loss with an interval that excludes 0 "
              "(no correction for testing every expert)")
    emit(args, {"action": "ablate", "model": session.model_name, "layer": layer,
                "results": [dict(r.to_dict(), expert=e) for e, r in enumerate(results)]})
    return 0


def register(actions: argparse._SubParsersAction) -> None:
    """Add chat, compare and ablate."""
    p = actions.add_parser("chat", help="generate with optional routing interventions; experts of each new token")
    add_common(p, many_layers=False, trace=False, model_required=True, classifier=False)
    p.add_argument("-p", "--prompt", action="append", default=None, help="prompt(s); without -p: interactive")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap intervals")
    add_intervention_flags(p)
    p.set_defaults(func=run_chat)
    p = actions.add_parser("compare", help="baseline vs intervention: loss, KL, continuations, routing change")
    add_common(p, many_layers=False, trace=False, model_required=True, classifier=False)
    p.add_argument("-p", "--prompt", action="append", default=None, help="prompt(s) (default: two built-in)")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap intervals")
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
