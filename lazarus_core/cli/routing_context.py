"""Actions `token-routing`, `context-test` and `context-window`: how one token's experts depend on its context."""

from __future__ import annotations

import argparse

from lazarus_core.cli.routing_common import Session, add_common, choose_layers, console, emit, experts_str


def default_contexts(token: str) -> list[str]:
    """Contexts for ``token`` of every kind (alone, after a number, after an operator, in a sentence, in code)."""
    return [token, f"111 {token}", f"= {token}", f"The value is {token}.", f"{token} + 5 = 9",
            f"x = {token}", f"I saw {token} birds in the park.", f"if count > {token}:\n    return {token}",
            f"Is {token} bigger than ten?", f"{token}, {token} and more"]


def _check_token(session: Session, token: str) -> None:
    if not token or not token.strip():
        raise ValueError("--token is empty")
    tok = session.tokenizer
    ids = tok(token, add_special_tokens=False)["input_ids"]
    unk = getattr(tok, "unk_token_id", None)
    if not ids or (unk is not None and unk in ids):
        raise ValueError(f"--token {token!r} is not in the tokenizer's vocabulary (it encodes to the unknown token)")


def _occurrences(session: Session, trace, token: str, view: str, contexts: list[str] | None):
    from lazarus_core.trigram.context import find_occurrences

    occ = find_occurrences(trace, session.decoder, session.classifier, token, view)
    if contexts:
        missing = sorted(set(range(len(contexts))) - {o.doc for o in occ})
        if missing:
            raise ValueError(f"--token {token!r} does not occur in context(s) " + ", ".join(repr(contexts[i]) for i in missing))
    if not occ:
        raise ValueError(f"--token {token!r} does not occur in the trace {trace.path}")
    return occ


def _capture(args: argparse.Namespace, session: Session, contexts: list[str] | None):
    if args.trace:
        return session.trace([])[0], None
    _check_token(session, args.token)
    contexts = contexts or default_contexts(args.token)
    return session.trace(contexts)[0], contexts


def run_token_routing(args: argparse.Namespace) -> int:
    """The experts one token gets in each context, at one layer, and the spread over layers."""
    from rich.table import Table

    from lazarus_core.trigram.context import context_dependence

    session = Session(args)
    trace, contexts = _capture(args, session, args.contexts)
    _check_token(session, args.token)
    layer = choose_layers(args, trace.layers, many=False)[0]
    occ = _occurrences(session, trace, args.token, args.view, contexts)
    lt = trace.layer(layer)
    con = console()
    t = Table(title=f"{args.token!r} at layer {layer}: experts per context")
    for col in ("context", "trigram", f"top-{trace.top_k} experts"):
        t.add_column(col)
    if args.verbose:
        t.add_column("primary per layer " + " ".join(f"L{l}" for l in trace.layers))
    for o in occ[: args.max_rows]:
        extra = [" ".join(f"E{int(trace.layer(l).topk_ids[o.row][0])}" for l in trace.layers)] if args.verbose else []
        t.add_row(o.context, o.trigram, experts_str(lt.topk_ids[o.row], lt.topk_weights[o.row]), *extra)
    con.print(t)
    rows = [o.row for o in occ]
    per_layer = [context_dependence(trace.layer(l).topk_ids, rows, [o.trigram for o in occ], trace.num_experts,
                                    layer=l, seed=args.seed) for l in trace.layers]
    t = Table(title="every layer: distinct primary experts over the occurrences, and top-k agreement vs random tokens")
    for col in ("layer", "occurrences", "distinct primary", "agreement (Jaccard)", "random pairs"):
        t.add_column(col, justify="right")
    for d in per_layer:
        t.add_row(str(d.layer), str(d.occurrences), f"{d.distinct_primary}/{trace.num_experts}", f"{d.consistency:.2f}",
                  f"{d.baseline:.2f}")
    con.print(t)
    focus = next(d for d in per_layer if d.layer == layer)
    con.print(f"{args.token!r} routes to {focus.distinct_primary} different primary experts in {len(occ)} occurrences "
              f"at layer {layer}.")
    emit(args, {"action": "token-routing", "model": session.spec, "token": args.token, "layer": layer,
                "occurrences": [dict(o.to_dict(), experts=lt.topk_ids[o.row].tolist(),
                                     weights=lt.topk_weights[o.row].tolist()) for o in occ],
                "layers": [d.to_dict() for d in per_layer]})
    return 0


def run_context_test(args: argparse.Namespace) -> int:
    """Does the trigram context predict a token's expert better than the token alone? Per layer, with a baseline."""
    from rich.table import Table

    from lazarus_core.trigram.context import context_dependence
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
    rows, tris = [o.row for o in occ], [o.trigram for o in occ]
    res = [context_dependence(trace.layer(l).topk_ids, rows, tris, trace.num_experts, layer=l, seed=args.seed)
           for l in layers]
    con = console()
    groups = {t: tris.count(t) for t in dict.fromkeys(tris)}
    con.print(f"{args.token!r}: {len(occ)} occurrences in {len(groups)} trigram contexts: "
              + ", ".join(f"{t}({n})" for t, n in sorted(groups.items(), key=lambda x: -x[1])[:8]))
    if args.verbose:
        t = Table(title="occurrences")
        for col in ("context", "trigram", *(f"L{l}" for l in layers)):
            t.add_column(col)
        for o in occ:
            t.add_row(o.context, o.trigram, *(experts_str(trace.layer(l).topk_ids[o.row]) for l in layers))
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
    emit(args, {"action": "context-test", "model": session.spec, "token": args.token,
                "occurrences": [o.to_dict() for o in occ], "layers": [d.to_dict() for d in res]})
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
    if not 0 <= pos < len(ids):
        raise ValueError(f"--position {pos} is out of range: the prompt has {len(ids)} tokens (0..{len(ids) - 1})")
    layers = choose_layers(args, sorted(session.info.layers), many=True)
    full = session.route_ids(ids[: pos + 1], layers)
    windows = sorted({0, *[w for w in (1, 2, 4, 8, 16, 32, 64, 128, 256) if w < pos], pos})
    con = console()
    piece = session.tokenizer.convert_ids_to_tokens(ids[pos])
    t = Table(title=f"position {pos} ({piece!r}): top-k overlap (Jaccard) with the full context, per left-context size")
    t.add_column("left tokens", justify="right")
    for l in layers:
        t.add_column(f"L{l}", justify="right")
    rows = []
    for w in windows:
        part = session.route_ids(ids[pos - w: pos + 1], layers)
        cells, entry = [], {"window": w, "layers": {}}
        for l in layers:
            a, b = set(full[l][0][-1].tolist()), set(part[l][0][-1].tolist())
            jac = len(a & b) / len(a | b)
            same = int(full[l][0][-1][0]) == int(part[l][0][-1][0])
            cells.append(f"{jac:.2f}{'' if same else '*'}" + (f" {experts_str(part[l][0][-1])}" if args.verbose else ""))
            entry["layers"][str(l)] = {"jaccard": jac, "same_primary": same, "experts": part[l][0][-1].tolist()}
        rows.append(entry)
        t.add_row(str(w), *cells)
    con.print(t)
    con.print("* = a different primary expert than with the full context")
    emit(args, {"action": "context-window", "model": session.spec, "prompt": args.prompt, "position": pos,
                "full_context_experts": {str(l): full[l][0][-1].tolist() for l in layers}, "windows": rows})
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
