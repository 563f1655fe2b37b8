"""Actions `full-taxonomy` and `domain-test`: trigram specialisation per category, and the domain-expert test."""

from __future__ import annotations

import argparse

import numpy as np

from lazarus_core.cli.routing_common import Session, add_common, choose_layers, console, emit, lit


def _labels(session: Session, trace):
    from lazarus_core.trigram.labels import label_trace

    return label_trace(trace, session.tokenizer, session.classifier)


def run_full_taxonomy(args: argparse.Namespace) -> int:
    """Trigram specialisation of every expert against the layer's null, and the experts each category uses."""
    from rich.table import Table

    from lazarus_core.tokens import trigram_name
    from lazarus_core.trigram.enrichment import expert_enrichment
    from lazarus_core.trigram.prompts import resolve_categories, taxonomy_corpus
    from lazarus_core.trigram.specialisation import trigram_specialisation

    categories = resolve_categories(args.categories)
    session = Session(args)
    texts, cats = taxonomy_corpus(categories, args.prompts_per_category, args.seed) if not args.trace else ([], [])
    trace, doc_labels = session.trace(texts, cats)
    layers = choose_layers(args, trace.layers, many=True)
    labels = _labels(session, trace)
    trigrams = labels.trigrams(args.view)
    report = trigram_specialisation(trigrams, {l: trace.layer(l).topk_ids for l in layers}, trace.num_experts,
                                    token_ids=trace.token_ids, view=args.view, slots=args.slots,
                                    permutations=args.permutations,
                                    min_activations=args.min_activations, seed=args.seed)
    doc_ids = trace.doc_ids
    per_category = []
    present = sorted(set(doc_labels.values()))
    if args.trace and args.categories is None:          # a reused trace: every label it carries
        known = present
    else:
        known = [c for c in categories if c in present]
    focus = layers[len(layers) // 2]
    for c in known:
        docs = np.array([d for d, lab in doc_labels.items() if lab == c])
        mask = np.isin(doc_ids, docs)
        tri, counts = np.unique(trigrams[mask], return_counts=True)
        order = np.argsort(-counts, kind="stable")[:3]
        entry = {"category": c, "num_tokens": int(mask.sum()),
                 "top_trigrams": [{"trigram": trigram_name(tri[i]), "count": int(counts[i])} for i in order],
                 "layers": {}}
        for l in layers:
            enr = expert_enrichment(trace.layer(l).topk_ids, mask, trace.num_experts, top=3)
            entry["layers"][str(l)] = [e.to_dict() for e in enr]
        per_category.append(entry)

    # The most frequent trigrams and the experts they over-use at the middle layer (lift over the layer's rate).
    uniq_t, uniq_c = np.unique(trigrams, return_counts=True)
    patterns = []
    for i in np.argsort(-uniq_c, kind="stable")[: args.patterns]:
        enr = expert_enrichment(trace.layer(focus).topk_ids, trigrams == uniq_t[i], trace.num_experts, top=3)
        patterns.append({"trigram": trigram_name(uniq_t[i]), "count": int(uniq_c[i]), "layer": focus,
                         "experts": [e.to_dict() for e in enr]})

    con = console()
    con.print(f"[bold]full-taxonomy[/bold]  {trace.num_tokens} tokens, {len(layers)} layers, {trace.num_experts} "
              f"experts, top-{trace.top_k}, {report.num_trigrams} distinct {args.view} trigrams, "
              f"test: {report.test}, counting {args.slots} slots")
    if per_category:
        t = Table(title=f"Categories (experts enriched at layer {focus}: lift over the layer's rate)")
        for col in ("category", "tokens", "top trigrams", f"L{focus} experts (lift, q)"):
            t.add_column(col)
        for entry in per_category:
            t.add_row(lit(entry["category"]), str(entry["num_tokens"]),
                      lit(", ".join(f"{x['trigram']}({x['count']})" for x in entry["top_trigrams"])),
                      " ".join(f"E{e['expert']}({e['lift']:.1f}x,{e['q_value']:.0e})" for e in entry["layers"][str(focus)]))
        con.print(t)
    if patterns:
        t = Table(title=f"Frequent trigrams and the experts they over-use at layer {focus} (lift, q)")
        for col in ("trigram", "tokens", "experts"):
            t.add_column(col, overflow="fold")
        for p in patterns:
            t.add_row(lit(p["trigram"]), str(p["count"]),
                      " ".join(f"E{e['expert']}({e['lift']:.1f}x,{e['q_value']:.0e})" for e in p["experts"]))
        con.print(t)
    t = Table(title="Trigram specialists: concentration vs the layer's null and beyond the current token "
                    "(context lift = conc. / expected given the token id; most significant in context first; "
                    "q = BH over all experts)")
    for col in ("layer", "expert", "tokens", "top pattern", "conc.", "expected", "lift", "q", "context lift",
                "context q", "causal PREV→CUR (ctx lift, q)"):
        t.add_column(col, justify="right" if col not in ("top pattern",) else "left", overflow="fold")
    if args.verbose:
        t.add_column("next patterns (share, lift)", overflow="fold")
    experts = sorted(report.experts(), key=lambda e: (e.context_q_value, -e.context_lift, e.q_value))
    shown = [e for e in experts if e.activations >= args.min_activations][: args.top]
    for e in shown:
        extra = [lit(" ".join(f"{p.trigram}({p.share:.0%},{p.lift:.1f}x)" for p in e.top_patterns[1:]))] if args.verbose else []
        c = e.causal
        t.add_row(str(e.layer), f"E{e.expert}", str(e.activations), lit(e.top_pattern or "-"), f"{e.concentration:.0%}",
                  f"{e.expected:.1%}", f"{e.lift:.1f}x", f"{e.q_value:.1e}", f"{e.context_lift:.2f}x",
                  f"{e.context_q_value:.1e}",
                  f"{lit(c.pattern)} ({c.context_lift:.2f}x, {c.context_q_value:.1e})" if c else "-", *extra,
                  style="bold" if e.context_q_value < 0.05 else "dim")
    con.print(t)
    sig, ctx = report.significant(), report.significant(context=True)
    con.print(f"{len(sig)} of {len(report.experts())} (layer, expert) pairs beat the layer's trigram distribution "
              f"(q < 0.05); {len(ctx)} specialise beyond their tokens' ids (context q < 0.05). "
              "NMI(expert; trigram) per layer, observed / shuffled labels: "
              + ", ".join(f"L{l.layer} {l.normalized_mutual_information:.3f}/{l.shuffled_nmi:.3f}" for l in report.layers))
    emit(args, {"action": "full-taxonomy", "model": session.model_name, "categories": categories,
                "trace": str(trace.path) if args.trace or args.save_trace else None,
                "specialisation": report.to_dict(), "categories_detail": per_category, "patterns": patterns})
    return 0


def run_domain_test(args: argparse.Namespace) -> int:
    """Chi-square and Cramer's V of expert x domain tables per layer (plus a document-level permutation test)."""
    from rich.table import Table

    from lazarus_core.trigram.domains import domain_test
    from lazarus_core.trigram.prompts import domain_corpus

    session = Session(args)
    domains = [d.strip() for d in args.domains.split(",")] if args.domains else None
    texts, labels = domain_corpus(args.prompts_per_domain, args.seed, domains) if not args.trace else ([], [])
    trace, doc_labels = session.trace(texts, labels)
    if not doc_labels:
        raise ValueError(f"--trace {args.trace} has no document labels ({'lazarus_labels.json'}); "
                         "domain-test needs a labelled capture (run it without --trace and --save-trace DIR)")
    layers = choose_layers(args, trace.layers, many=True)
    results = [domain_test(trace.layer(l).topk_ids, trace.doc_ids, doc_labels, trace.num_experts, layer=l,
                           slots=args.slots, permutations=args.permutations, seed=args.seed) for l in layers]
    con = console()
    t = Table(title=f"domain-test: does the expert depend on the domain? ({args.slots} expert per token)")
    for col in ("layer", "tokens", "chi2", "dof", "p (tokens)", "p (doc perm.)", "V (raw)", "V (bias-corrected)",
                "reading"):
        t.add_column(col, justify="right")
    for r in results:
        perm = "-" if r.permutation_p_value is None else (
            f"< 1/{r.permutations + 1}" if r.permutation_p_at_floor else f"{r.permutation_p_value:.3f}")
        t.add_row(str(r.layer), str(r.num_tokens), f"{r.chi2:.1f}", str(r.dof), f"{r.p_value:.1e}", perm,
                  f"{r.cramers_v:.3f}", f"{r.cramers_v_corrected:.3f}", r.strength)
    con.print(t)
    shown = results if args.verbose else [next(r for r in results if r.layer == layers[len(layers) // 2])]
    for focus in shown:
        t = Table(title=f"Layer {focus.layer}: tokens of each domain per expert (share of that domain's tokens)")
        t.add_column("expert")
        for d in focus.domains:
            t.add_column(lit(d), justify="right")
        t.add_column("top domain")
        totals = {d: sum(e.counts[d] for e in focus.experts) for d in focus.domains}
        for e in focus.experts[: None if args.verbose else args.top]:
            t.add_row(f"E{e.expert}", *(f"{e.counts[d]} ({e.counts[d] / max(totals[d], 1):.0%})" for d in focus.domains),
                      f"{lit(e.top_domain)} {e.top_domain_share:.0%}")
        con.print(t)
    con.print("Cramer's V is the effect size (0: every expert serves every domain alike); the plug-in V is biased "
              "upwards, the reading uses Bergsma's bias-corrected V. The token-level p-value treats tokens as "
              "independent; the document permutation test does not.")
    emit(args, {"action": "domain-test", "model": session.model_name, "layers": [r.to_dict() for r in results]})
    return 0


def register(actions: argparse._SubParsersAction) -> None:
    """Add full-taxonomy and domain-test."""
    p = actions.add_parser("full-taxonomy", help="semantic-trigram specialisation of every expert, against a null model")
    add_common(p, many_layers=True)
    p.add_argument("--categories", default=None, help="comma-separated categories (default all); see docs/trigram.md")
    p.add_argument("--prompts-per-category", type=int, default=12, help="default prompts per category (12)")
    p.add_argument("--slots", default="all", choices=("all", "primary"), help="count every top-k slot or the primary")
    p.add_argument("--permutations", type=int, default=0, help="permutation test rounds (default 0: binomial test)")
    p.add_argument("--min-activations", type=int, default=5, help="experts with fewer tokens are not tested")
    p.add_argument("--top", type=int, default=20, help="rows in the specialist table")
    p.add_argument("--patterns", type=int, default=10, help="frequent trigrams listed with their experts (10)")
    p.set_defaults(func=run_full_taxonomy)
    p = actions.add_parser("domain-test", help="are there domain experts? chi-square and Cramer's V per layer")
    add_common(p, many_layers=True, classifier=False)
    p.add_argument("--domains", default=None, help="comma-separated subset of math,code,language,reasoning")
    p.add_argument("--prompts-per-domain", type=int, default=12, help="default prompts per domain (12)")
    p.add_argument("--slots", default="primary", choices=("primary", "all"), help="expert(s) counted per token")
    p.add_argument("--permutations", type=int, default=500, help="document-level permutations (0 = skip)")
    p.add_argument("--top", type=int, default=16, help="experts listed for the middle layer")
    p.set_defaults(func=run_domain_test)
