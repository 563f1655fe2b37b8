"""Tail probabilities against direct sums and textbook values; BH q-values by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lazarus_core.trigram.stats import benjamini_hochberg, binom_sf, chi2_sf


def _binom_sf_direct(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, x) * p ** x * (1 - p) ** (n - x) for x in range(max(k, 0), n + 1))


@pytest.mark.parametrize("k,n,p", [(0, 5, 0.3), (1, 5, 0.3), (3, 10, 0.2), (10, 10, 0.5), (11, 10, 0.5),
                                   (40, 200, 0.1), (7, 300, 0.001), (150, 400, 0.35)])
def test_binomial_tail_matches_direct_sum(k, n, p):
    assert binom_sf(k, n, p) == pytest.approx(_binom_sf_direct(k, n, p), rel=1e-9, abs=1e-300)


def test_binomial_tail_is_vectorised_and_handles_edges():
    got = binom_sf(np.array([0, 3, 5]), np.array([4, 4, 4]), np.array([0.5, 0.0, 0.5]))
    assert got.tolist() == [1.0, 0.0, 0.0]


def test_chi_square_tail_textbook_values():
    assert chi2_sf(3.841458820694124, 1) == pytest.approx(0.05, rel=1e-9)
    assert chi2_sf(5.991464547107979, 2) == pytest.approx(0.05, rel=1e-9)
    assert chi2_sf(2.0, 2) == pytest.approx(math.exp(-1.0), rel=1e-12)      # dof 2: exp(-x/2)


def test_benjamini_hochberg_by_hand():
    p = np.array([0.01, 0.04, 0.03, 0.20])
    # sorted 0.01, 0.03, 0.04, 0.20 -> 0.04, 0.06, 0.0533, 0.20 -> monotone: 0.04, 0.0533, 0.0533, 0.20
    assert benjamini_hochberg(p) == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.20])
