"""Actions `token-routing`, `context-test` and `context-window`: how one token's experts depend on its context."""

from __future__ import annotations

import argparse

from lazarus_core.analysis.context_routing import (check_token, context_test, context_window, default_contexts,
                                                   token_occurrences, token_routing)
from lazarus_core.cli.routing_common import Session, add_common, choose_layers, console, emit, experts_str, lit


def _check_token(session: Session, token: str) -> None:
    check_token(session.tokenizer, token)


def _occurrences(session: Session, trace, token: str, view: str, contexts: list[str] | None):
    return token_occurrences(trace, session.decoder, session.classifier, token, view, contexts)


def _capture(args: argparse.Namespace, session: Session, contexts: list[str] | None):
    if args.trace:
        return session.trace([])[0], None
    _check_token(session, args.token)
    contexts = contexts or default_contexts(args.token)
    return session.trace(contexts)[0], contexts


def run_token_routing(args: argparse.Namespace) -> int:
    """The experts one token gets in each context, at one layer, and the spread over layers."""
    from rich.table import Table

    session = Session(args)
    trace, contexts = _capture(args, session, args.contexts)
    _check_token(session, args.token)
    layer = choose_layers(args, trace.layers, many=False)[0]
    occ = _occurrences(session, trace, args.token, args.view, contexts)
    res = token_routing(trace, occ, args.token, layer, seed=args.seed)
    con = console()
    t = Table(title=f"{lit(repr(args.token))} at layer {layer}: experts per context")
    for col in ("context", "trigram", f"top-{trace.top_k} experts"):
        t.add_column(col)
    if args.verbose:
        t.add_column("primary per layer " + " ".join(f"L{l}" for l in trace.layers))
    for o, e, w in list(zip(occ, res.experts, res.weights))[: args.max_rows]:
        extra = [" ".join(f"E{int(trace.layer(l).topk_ids[o.row][0])}" for l in trace.layers)] if args.verbose else []
        t.add_row(lit(o.context), lit(o.trigram), experts_str(e, w), *extra)
    con.print(t)
    t = Table(title="every layer: distinct primary experts over the occurrences, and top-k agreement vs random tokens")
    for col in ("layer", "occurrences", "distinct primary", "agreement (Jaccard)", "random pairs"):
        t.add_column(col, justify="right")
    for d in res.layers:
        t.add_row(str(d.layer), str(d.occurrences), f"{d.distinct_primary}/{trace.num_experts}", f"{d.consistency:.2f}",
                  f"{d.baseline:.2f}")
    con.print(t)
    focus = res.layer_result(layer)
    con.print(f"{lit(repr(args.token))} routes to {focus.distinct_primary} different primary experts in {len(occ)} occurrences "
              f"at layer {layer}.")
    emit(args, {"action": "token-routing", "model": session.model_name, **res.to_dict()})
    return 0


def run_context_test(args: argparse.Namespace) -> int:
    """Does the trigram context predict a token's expert better than the token alone? Per layer, with a baseline."""
    from rich.table import Table

    from lazarus_core.trigram.prompts import resolve_categories, taxonomy_corpus

    session = Session(args)
    if args.trace:
        trace = session.trace([])[0]
        contexts = None
    elif args.contexts:
        trace, contexts = _capture(args, session, args.contexts)
    else:
        texts, _ = taxonomy_corpus(resolve_categories(args.categories), args.prompts_per_category, args.seed)
        trace = session.trace(texts)[0]
        contexts = None
    _check_token(session, args.token)
    layers = choose_layers(args, trace.layers, many=True)
    occ = _occurrences(session, trace, args.token, args.view, contexts)
    result = context_test(trace, occ, args.token, layers, seed=args.seed)
    res = result.layers
    con = console()
    groups = result.trigram_counts()
    con.print(f"{lit(repr(args.token))}: {len(occ)} occurrences in {len(groups)} trigram contexts: "
              + ", ".join(f"{lit(t)}({n})" for t, n in list(groups.items())[:8]))
    if args.verbose:
        t = Table(title="occurrences")
        for col in ("context", "trigram", *(f"L{l}" for l in layers)):
            t.add_column(col)
        for o in occ:
            t.add_row(lit(o.context), lit(o.trigram), *(experts_str(trace.layer(l).topk_ids[o.row]) for l in layers))
        con.print(t)
    t = Table(title="context dependence per layer")
    for col in ("layer", "distinct primary", "agreement", "random pairs", "LOO: token mode",
                "LOO: trigram mode"):
        t.add_column(col, justify="right")
    for d in res:
        t.add_row(str(d.layer), str(d.distinct_primary), f"{d.consistency:.2f}", f"{d.baseline:.2f}",
                  f"{d.primary_by_token:.0%}", f"{d.primary_by_trigram:.0%}")
    con.print(t)
    con.print("agreement near the random-pair level means the token alone does not fix its experts; a trigram-mode "
              "share well above the token-mode share means the context (trigram) predicts the expert.")
    emit(args, {"action": "context-test", "model": session.model_name, **result.to_dict()})
    return 0


def run_context_window(args: argparse.Namespace) -> int:
    """How many preceding tokens a position needs before its experts match those of the full context."""
    from rich.table import Table

    session = Session(args)
    if not args.prompt:
        from lazarus_core.trigram.prompts import category_prompts

        args.prompt = category_prompts("analogy", 1, args.seed)[0]
    ids = session.encode(args.prompt)
    pos = len(ids) - 1 if args.position is None else args.position
    layers = choose_layers(args, sorted(session.info.layers), many=True)
    res = context_window(session.model, ids, pos, layers, info=session.info)
    con = console()
    piece = session.tokenizer.convert_ids_to_tokens(ids[pos])
    t = Table(title=f"position {pos} ({lit(repr(piece))}): top-k overlap (Jaccard) with the full context, per left-context size")
    t.add_column("left tokens", justify="right")
    for l in layers:
        t.add_column(f"L{l}", justify="right")
    for row in res.windows:
        t.add_row(str(row.window), *(f"{row.jaccard[l]:.2f}{'' if row.same_primary[l] else '*'}"
                                     + (f" {experts_str(row.experts[l])}" if args.verbose else "") for l in layers))
    con.print(t)
    con.print("* = a different primary expert than with the full context")
    emit(args, {"action": "context-window", "model": session.model_name, "prompt": args.prompt, **res.to_dict()})
    return 0


def register(actions: argparse._SubParsersAction) -> None:
    """Add token-routing, context-test and context-window."""
    p = actions.add_parser("token-routing", help="one token in many contexts: how many experts does it get?")
    add_common(p, many_layers=False)
    p.add_argument("--token", required=True, help="the word or token to follow (e.g. 127)")
    p.add_argument("--contexts", nargs="+", default=None, metavar="TEXT", help="contexts (default: ten built-in kinds)")
    p.add_argument("--max-rows", type=int, default=40, help="rows in the per-context table")
    p.set_defaults(func=run_token_routing)
    p = actions.add_parser("context-test", help="does the trigram context predict a token's expert? per layer")
    add_common(p, many_layers=True)
    p.add_argument("--token", default="is", help="the word to follow (default 'is')")
    p.add_argument("--contexts", nargs="+", default=None, metavar="TEXT", help="contexts (default: taxonomy prompts)")
    p.add_argument("--categories", default=None, help="categories of the default prompts")
    p.add_argument("--prompts-per-category", type=int, default=8)
    p.set_defaults(func=run_context_test)
    p = actions.add_parser("context-window", help="how much left context a token needs for its full-context experts")
    add_common(p, many_layers=True, trace=False, model_required=True, classifier=False)
    p.add_argument("-p", "--prompt", default=None, help="the prompt (default: an analogy prompt)")
    p.add_argument("--position", type=int, default=None, help="token position (default: the last)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_context_window)
