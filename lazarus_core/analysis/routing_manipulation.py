"""Can inputs be crafted to force routing? Gradient-guided token search vs random search, and routing robustness."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from lazarus_core.analysis.intervals import Interval, bootstrap_mean_ci, wilson_interval

DEFAULT_NOISE = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0)


class _RouterTap:
    """Keeps the last routing of one MoE layer: (logits [T, E], weights [T, k], ids [T, k]), for every family
    (DBRX routes in its block: :func:`lazarus_core.routing.interventions.rewrite_routing`)."""

    def __init__(self, layer) -> None:
        from lazarus_core.routing.interventions import rewrite_routing

        self.output = None
        self.handles = rewrite_routing(layer, self._keep)

    def _keep(self, logits, weights, ids):
        self.output = (logits, weights, ids)
        return weights, ids

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


class _Probe:
    """Runs the model on input embeddings and reads one layer's routing at one position of each sequence."""

    def __init__(self, model, layer: int, info) -> None:
        self.model, self.layer = model, info.layers[layer]
        self.embedding = model.get_input_embeddings().weight
        self.rule = info.rule

    def route_at(self, embeds: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits float32 [B, E] and primary expert int64 [B] at ``target`` of a batch embeds [B, n, H]."""
        tap = _RouterTap(self.layer)
        try:
            self.model(inputs_embeds=embeds, use_cache=False)
        finally:
            tap.close()
        logits, weights, ids = tap.output[0], tap.output[1], tap.output[2]
        B, n = embeds.shape[:2]
        logits = logits.reshape(B, n, -1)[:, target].float()
        weights, ids = weights.reshape(B, n, -1)[:, target], ids.reshape(B, n, -1)[:, target]
        primary = ids.gather(1, weights.float().argmax(1, keepdim=True)).squeeze(1).long()
        return logits, primary

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding[ids]


def router_margin(logits: torch.Tensor, expert: int) -> torch.Tensor:
    """Expert's raw router logit minus the best other expert's: float [B] (> 0: it ranks first)."""
    others = logits.clone()
    others[:, expert] = float("-inf")
    return logits[:, expert] - others.max(1).values


@dataclass
class SearchTrial:
    """One prompt's search for a substitution that makes the expert primary at the target.

    Attributes
    ----------
    prompt : int
    method : str
        ``"gradient"`` or ``"random"``.
    success : bool
    steps : int
        Steps run (at most the budget).
    edits : int
        Positions whose token differs from the prompt's at the end.
    margin_start, margin_end : float
        The expert's router-logit margin at the target before and after.
    ids : list of int
        Final token ids.
    """

    prompt: int
    method: str
    success: bool
    steps: int
    edits: int
    margin_start: float
    margin_end: float
    ids: list[int]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SearchSummary:
    """Success rate and edits of one search method over the trials.

    Attributes
    ----------
    method : str
    trials : int
        Prompts searched (those where the expert was not already primary).
    successes : int
    success_rate : Interval
        Wilson interval.
    mean_edits : float or None
        Over the successes.
    mean_steps : float or None
        Over the successes.
    mean_margin_gain : float
        Mean ``margin_end - margin_start``.
    """

    method: str
    trials: int
    successes: int
    success_rate: Interval | None
    mean_edits: float | None
    mean_steps: float | None
    mean_margin_gain: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["success_rate"] = self.success_rate.to_dict() if self.success_rate is not None else None
        return d


@dataclass
class FlipRate:
    """Share of perturbations that change the primary expert at the target.

    Attributes
    ----------
    perturbation : str
        ``"context-token"`` (a random token at a random position before the target), ``"target-token"``
        (the target's own token replaced), or ``"noise"``.
    noise_ratio : float or None
        Noise norm as a multiple of each position's embedding norm (noise rows only).
    draws : int
    flips : int
    rate : Interval
        Bootstrap over prompts (draws of one prompt are not independent).
    """

    perturbation: str
    noise_ratio: float | None
    draws: int
    flips: int
    rate: Interval

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rate"] = self.rate.to_dict()
        return d


@dataclass
class RoutingManipulation:
    """The routing-manipulation report (see :func:`routing_manipulation`).

    Attributes
    ----------
    layer, expert, num_experts : int
    target_idx : int or None
        The target position as given (None: each prompt's last position).
    steps, candidates, topk_tokens : int
        Search budget: steps, substitutions evaluated per step, gradient-ranked tokens per position.
    edit_target : bool
        Whether the target's own token could be substituted.
    prompts : int
    already_primary : int
        Prompts where the expert was primary before any edit (not searched).
    primary_share : Interval
        Share of prompts with the expert already primary (Wilson); the chance level is about 1/E.
    gradient, random : SearchSummary
    gradient_minus_random : Interval or None
        Per prompt, gradient success minus random success (paired), mean with a bootstrap over prompts.
    trials : list of SearchTrial
    flips : list of FlipRate
    """

    layer: int
    expert: int
    num_experts: int
    target_idx: int | None
    steps: int
    candidates: int
    topk_tokens: int
    edit_target: bool
    prompts: int
    already_primary: int
    primary_share: Interval
    gradient: SearchSummary
    random: SearchSummary
    gradient_minus_random: Interval | None = None
    trials: list[SearchTrial] = field(default_factory=list)
    flips: list[FlipRate] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if isinstance(v, (int, float, bool, str)) or v is None}
        out["primary_share"] = self.primary_share.to_dict()
        out["gradient"], out["random"] = self.gradient.to_dict(), self.random.to_dict()
        out["gradient_minus_random"] = (self.gradient_minus_random.to_dict() if self.gradient_minus_random is not None
                                        else None)
        out["trials"] = [t.to_dict() for t in self.trials]
        out["flips"] = [f.to_dict() for f in self.flips]
        return out

    def tables(self) -> dict[str, list[dict]]:
        """Flat rows for CSV files."""
        trials = [dict(t.to_dict(), ids=" ".join(map(str, t.ids))) for t in self.trials]
        flips = [dict(perturbation=f.perturbation, noise_ratio=f.noise_ratio, draws=f.draws, flips=f.flips,
                      rate=f.rate.estimate, rate_low=f.rate.low, rate_high=f.rate.high) for f in self.flips]
        return {"trials": trials, "flips": flips}


def _search(probe: _Probe, ids: list[int], target: int, expert: int, editable: np.ndarray, allowed: torch.Tensor,
            *, method: str, steps: int, candidates: int, topk_tokens: int, rng: np.random.Generator,
            progress: Callable[[], None] | None):
    """Greedy token substitution; returns (success, steps, final ids, margin start, margin end)."""
    device = probe.embedding.device
    cur = torch.tensor(ids, device=device)
    with torch.no_grad():
        logits, primary = probe.route_at(probe.embed(cur)[None], target)
    margin = float(router_margin(logits, expert)[0])
    start = margin
    V = probe.embedding.shape[0]
    for step in range(1, steps + 1):
        pos = rng.choice(editable, size=candidates)
        if method == "gradient":
            onehot = torch.zeros(len(ids), V, device=device, dtype=probe.embedding.dtype)
            onehot[torch.arange(len(ids)), cur] = 1.0
            onehot.requires_grad_(True)
            with torch.enable_grad():
                lg, _ = probe.route_at((onehot @ probe.embedding)[None], target)
                grad = torch.autograd.grad(router_margin(lg, expert)[0], onehot)[0].detach()
            grad[:, ~allowed] = float("-inf")
            grad[torch.arange(len(ids)), cur] = float("-inf")
            best = grad.topk(min(topk_tokens, int(allowed.sum())), dim=1).indices.cpu().numpy()
            tok = best[pos, rng.integers(0, best.shape[1], size=candidates)]
        else:
            pool = torch.nonzero(allowed).flatten().cpu().numpy()
            tok = pool[rng.integers(0, len(pool), size=candidates)]
        batch = cur.repeat(candidates, 1)
        batch[torch.arange(candidates), torch.as_tensor(pos, device=device)] = torch.as_tensor(tok, device=device)
        with torch.no_grad():
            logits, primary = probe.route_at(probe.embed(batch), target)
        margins = router_margin(logits, expert)
        hit = torch.nonzero(primary == expert).flatten()
        choice = int(hit[margins[hit].argmax()]) if len(hit) else int(margins.argmax())
        if progress is not None:
            progress()
        if len(hit) or float(margins[choice]) > margin:
            cur, margin = batch[choice].clone(), float(margins[choice])
        if len(hit):
            return True, step, cur.tolist(), start, margin
    return False, steps, cur.tolist(), start, margin


def _summary(method: str, trials: list[SearchTrial]) -> SearchSummary:
    mine = [t for t in trials if t.method == method]
    wins = [t for t in mine if t.success]
    return SearchSummary(method, len(mine), len(wins), wilson_interval(len(wins), len(mine)) if mine else None,
                         float(np.mean([t.edits for t in wins])) if wins else None,
                         float(np.mean([t.steps for t in wins])) if wins else None,
                         float(np.mean([t.margin_end - t.margin_start for t in mine])) if mine else float("nan"))


def routing_manipulation(model, prompts: Sequence[Sequence[int]], layer: int, expert: int, *,
                         target_idx: int | None = None, steps: int = 10, candidates: int = 32, topk_tokens: int = 32,
                         edit_target: bool = False, protected_ids: Sequence[int] = (), substitutions: int = 32,
                         noise: Sequence[float] = DEFAULT_NOISE, noise_draws: int = 8, info=None, n_boot: int = 2000,
                         seed: int = 0, progress: Callable[[], None] | None = None) -> RoutingManipulation:
    """Search token substitutions that make ``expert`` primary at a target position, and measure robustness.

    The search (HotFlip / GCG style) runs ``steps`` steps per prompt. Each gradient step takes the
    gradient of the expert's router-logit margin (:func:`router_margin` at ``layer`` and the target
    position) with respect to the one-hot input, keeps per editable position the ``topk_tokens`` tokens
    with the largest gradient, evaluates ``candidates`` single substitutions drawn from them (one forward
    pass, batched) and keeps the best if it raises the margin; it stops as soon as the expert is the
    primary (highest-weight) expert there. The random baseline runs the same steps and evaluates the same
    number of substitutions per step, drawn uniformly (same forward budget; it skips the gradient pass).

    Robustness at the unedited prompts: the flip rate (primary expert at the target changes) under random
    single-token substitutions before the target, under substitution of the target's own token, and
    under Gaussian noise added to every input embedding with norm ``ratio x`` that embedding's norm.

    Parameters
    ----------
    model : nn.Module
        A transformers MoE causal LM.
    prompts : sequence of sequence of int
        Token ids [n] per prompt (each needs a position to edit before the target).
    layer, expert : int
        Model layer index of the MoE layer and the expert to make primary.
    target_idx : int, optional
        Target position (negative counts from the end; default the last).
    steps, candidates, topk_tokens : int
        Search budget.
    edit_target : bool
        Allow substituting the target's own token (default: only the positions before it).
    protected_ids : sequence of int
        Token ids never substituted in or out (special tokens).
    substitutions : int
        Random single substitutions per prompt (robustness), context and target each.
    noise : sequence of float
        Noise ratios of the robustness curve.
    noise_draws : int
        Noise draws per prompt and ratio.
    info : MoeModelInfo, optional
    n_boot, seed : int
    progress : callable, optional
        Called after each evaluated batch.

    Returns
    -------
    RoutingManipulation

    Raises
    ------
    ValueError
        No prompts, a layer that is not an MoE layer, an expert out of range, or a target position
        outside a prompt / with nothing to edit before it.
    """
    from lazarus_core.routing import find_moe_layers

    info = info or find_moe_layers(model)
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or not all(prompts):
        raise ValueError("no prompts: give at least one non-empty prompt (-p / --trials)")
    if layer not in info.layers:
        raise ValueError(f"--layer {layer} is out of range: the MoE layers are {sorted(info.layers)}")
    E = info.layers[layer].num_experts
    if not 0 <= expert < E:
        raise ValueError(f"--expert {expert} is out of range: layer {layer} has {E} experts (0..{E - 1})")
    probe = _Probe(model, layer, info)
    V = probe.embedding.shape[0]
    allowed = torch.ones(V, dtype=torch.bool, device=probe.embedding.device)
    protected = sorted({int(i) for i in protected_ids if 0 <= int(i) < V})
    allowed[protected] = False
    rng = np.random.default_rng(seed)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    trials, flips = [], {("context-token", None): [], ("target-token", None): []}
    flips.update({("noise", float(r)): [] for r in noise})
    already = 0
    for pi, ids in enumerate(prompts):
        n = len(ids)
        target = (n - 1) if target_idx is None else (target_idx if target_idx >= 0 else n + target_idx)
        if not 0 <= target < n:
            raise ValueError(f"--target-idx {target_idx} is outside prompt {pi} ({n} tokens)")
        editable = np.array([p for p in range(target + (1 if edit_target else 0)) if ids[p] not in protected])
        context = np.array([p for p in range(target) if ids[p] not in protected])
        if len(editable) == 0:
            raise ValueError(f"prompt {pi} has no token to edit before position {target}: give longer prompts "
                             "or --edit-target")
        cur = torch.tensor(ids, device=probe.embedding.device)
        with torch.no_grad():
            emb = probe.embed(cur)[None]
            _, primary0 = probe.route_at(emb, target)
            primary0 = int(primary0[0])
            pool = torch.nonzero(allowed).flatten().cpu().numpy()
            for kind, positions in (("context-token", context), ("target-token", np.array([target]))):
                if len(positions) == 0 or (kind == "target-token" and ids[target] in protected):
                    continue
                batch = cur.repeat(substitutions, 1)
                pos = rng.choice(positions, size=substitutions)
                batch[torch.arange(substitutions), torch.as_tensor(pos)] = torch.as_tensor(
                    pool[rng.integers(0, len(pool), size=substitutions)], device=cur.device)
                _, prim = probe.route_at(probe.embed(batch), target)
                flips[(kind, None)].append((pi, (prim != primary0).cpu().numpy()))
            norms = emb.norm(dim=-1, keepdim=True)
            for r in noise:
                z = torch.randn((noise_draws, *emb.shape[1:]), generator=gen).to(emb)
                z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-30) * norms * float(r)
                _, prim = probe.route_at(emb + z, target)
                flips[("noise", float(r))].append((pi, (prim != primary0).cpu().numpy()))
            if progress is not None:
                progress()
        if primary0 == expert:
            already += 1
            continue
        for method in ("gradient", "random"):
            ok, used, final, m0, m1 = _search(probe, ids, target, expert, editable, allowed, method=method, steps=steps,
                                              candidates=candidates, topk_tokens=topk_tokens, rng=rng,
                                              progress=progress)
            trials.append(SearchTrial(pi, method, ok, used, int(sum(a != b for a, b in zip(ids, final))), m0, m1, final))
    rows = []
    for (kind, ratio), per_prompt in flips.items():
        if not per_prompt:
            continue
        values = np.concatenate([f.astype(np.float64) for _, f in per_prompt])
        groups = np.concatenate([np.full(len(f), p) for p, f in per_prompt])
        rows.append(FlipRate(kind, ratio, int(values.size), int(values.sum()),
                             bootstrap_mean_ci(values, groups, n_boot=n_boot, seed=seed)))
    paired = None
    searched = sorted({t.prompt for t in trials})
    if searched:
        won = {(t.prompt, t.method): float(t.success) for t in trials}
        paired = bootstrap_mean_ci(np.array([won[(p, "gradient")] - won[(p, "random")] for p in searched]),
                                   np.asarray(searched), n_boot=n_boot, seed=seed)   # one unit per prompt
    return RoutingManipulation(layer, expert, E, target_idx, steps, candidates, topk_tokens, edit_target, len(prompts),
                               already, wilson_interval(already, len(prompts)), _summary("gradient", trials),
                               _summary("random", trials), paired, trials, rows)
