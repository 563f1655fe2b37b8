"""The top-1 agreement interval moe-overlay-verify reports (Wilson score interval)."""

import math
import random

import pytest

from lazarus_core.overlay.verify import agreement_interval


def test_bounds_solve_the_wilson_equation():
    # A Wilson bound p0 is where the observed share sits exactly z standard errors (taken at p0) away:
    # (p_hat - p0)^2 = z^2 p0 (1 - p0) / n. Check that defining property on fresh random counts.
    rng = random.Random(7)
    z = 1.96
    for _ in range(200):
        n = rng.randint(1, 100_000)
        k = rng.randint(0, n)
        lo, hi = agreement_interval(k, n)
        p_hat = k / n
        assert 0.0 <= lo <= p_hat <= hi <= 1.0
        for p0 in (lo, hi):
            lhs, rhs = (p_hat - p0) ** 2, z * z * p0 * (1 - p0) / n
            assert math.isclose(lhs, rhs, rel_tol=1e-6, abs_tol=1e-15)


def test_known_values_and_edges():
    lo, hi = agreement_interval(99, 100)  # textbook: 0.9455 .. 0.9982
    assert round(lo, 4) == 0.9455 and round(hi, 4) == 0.9982
    assert agreement_interval(10, 10)[1] == 1.0 and agreement_interval(10, 10)[0] < 1.0
    assert agreement_interval(0, 10)[0] == 0.0
    wide, narrow = agreement_interval(990, 1000), agreement_interval(99_000, 100_000)
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 5  # ~ 1 / sqrt(n)


@pytest.mark.parametrize("agree,count", [(1, 0), (0, 0), (5, 4), (-1, 4)])
def test_bad_counts_are_refused(agree, count):
    with pytest.raises(ValueError, match="agree <= count"):
        agreement_interval(agree, count)
