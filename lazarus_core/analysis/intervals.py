"""Confidence intervals the routing analyses share: a bootstrap over documents (clusters) and Wilson's for a share."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class Interval:
    """A point estimate with a two-sided confidence interval.

    Attributes
    ----------
    estimate : float
        The statistic on the full data.
    low, high : float
        Interval bounds (``level`` coverage).
    level : float
        Nominal coverage, e.g. 0.95.
    method : str
        How the interval was formed (``"bootstrap-documents"``, ``"bootstrap-tokens"``, ``"wilson"``).
    n_units : int
        Number of resampled units (documents, tokens or trials).
    """

    estimate: float
    low: float
    high: float
    level: float
    method: str
    n_units: int

    @property
    def includes_zero(self) -> bool:
        """True when the interval covers 0 (an effect not distinguishable from none)."""
        return self.low <= 0.0 <= self.high

    def to_dict(self) -> dict:
        return {k: (round(v, 8) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def bootstrap_mean_ci(values: np.ndarray, groups: np.ndarray | None = None, *, weights: np.ndarray | None = None,
                      n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of a (weighted) mean, resampling whole groups (documents).

    Tokens of one document are not independent, so with ``groups`` the resampled unit is the group:
    each replicate draws groups with replacement and recomputes ``sum(w * v) / sum(w)`` over the
    drawn groups' tokens. With one group (or ``groups=None``) tokens are resampled.

    Parameters
    ----------
    values : np.ndarray
        float [n], one value per token (e.g. a per-token loss delta).
    groups : np.ndarray, optional
        int [n], the unit of each value (document id). None: every value is its own unit.
    weights : np.ndarray, optional
        float [n], non-negative token weights (default 1).
    n_boot : int
        Bootstrap replicates.
    level : float
        Coverage in (0, 1).
    seed : int
        Seed of the resampling.

    Returns
    -------
    Interval

    Raises
    ------
    ValueError
        Empty ``values``, mismatched lengths, or ``level`` outside (0, 1).
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("bootstrap_mean_ci: no values")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    w = np.ones_like(values) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape != values.shape:
        raise ValueError(f"weights has {w.size} entries, values {values.size}")
    if groups is None or len(np.unique(groups)) < 2:
        method, unit = "bootstrap-tokens", np.arange(values.size)
    else:
        method, unit = "bootstrap-documents", np.asarray(groups).reshape(-1)
        if unit.shape != values.shape:
            raise ValueError(f"groups has {unit.size} entries, values {values.size}")
    _, inverse = np.unique(unit, return_inverse=True)
    n_units = int(inverse.max()) + 1
    sum_wv = np.bincount(inverse, weights=w * values, minlength=n_units)
    sum_w = np.bincount(inverse, weights=w, minlength=n_units)
    estimate = float(sum_wv.sum() / sum_w.sum()) if sum_w.sum() > 0 else float("nan")
    rng = np.random.default_rng(seed)
    # Multinomial counts per unit are equivalent to drawing units with replacement.
    counts = rng.multinomial(n_units, np.full(n_units, 1.0 / n_units), size=n_boot).astype(np.float64)
    num, den = counts @ sum_wv, counts @ sum_w
    reps = np.divide(num, den, out=np.full(n_boot, np.nan), where=den > 0)
    alpha = (1.0 - level) / 2.0
    low, high = np.nanquantile(reps, [alpha, 1.0 - alpha])
    return Interval(estimate, float(low), float(high), level, method, n_units)


def wilson_interval(successes: int, trials: int, *, level: float = 0.95) -> Interval:
    """Wilson score interval of a binomial share ``successes / trials``.

    Parameters
    ----------
    successes, trials : int
        Counts (0 <= successes <= trials, trials >= 1).
    level : float
        Coverage in (0, 1).

    Returns
    -------
    Interval
    """
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"wilson_interval needs 0 <= successes <= trials and trials >= 1, got {successes}/{trials}")
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    p = successes / trials
    denom = 1.0 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return Interval(p, float(max(0.0, centre - half)), float(min(1.0, centre + half)), level, "wilson", trials)
