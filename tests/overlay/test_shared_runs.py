"""SharedRuns, the schedule of the one-call CPU forward's product stages: every item runs exactly once, each
thread streams its own run front to back, and the items left in a run are taken from its back."""

from __future__ import annotations

import pytest

from lazarus_core import _C


def _runs(n: int, runs: int) -> list[range]:
    return [range(n * r // runs, n * (r + 1) // runs) for r in range(runs)]


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 122, 1000])
@pytest.mark.parametrize("runs,threads", [(1, 1), (2, 2), (2, 1), (3, 2), (8, 3), (2, 5)])
def test_every_item_runs_once_owner_from_the_front_others_from_the_back(n, runs, threads):
    for _ in range(5):  # the interleaving differs from call to call
        count, by, when = _C.shared_runs_visits(n, runs, threads)
        assert count == [1] * n
        assert sorted(when) == list(range(n))
        assert all(0 <= t < threads for t in by)
        for owner, items in enumerate(_runs(n, runs)):
            own = [i for i in items if by[i] == owner]
            rest = [i for i in items if by[i] != owner]
            # The owner's items are a prefix of its run, run in order; the others took the rest from the back
            # (in order where one thread took them all: two thieves' claims and records may interleave).
            assert own == list(items[:len(own)])
            assert [when[i] for i in own] == sorted(when[i] for i in own)
            for thief in {by[i] for i in rest}:
                taken = [when[i] for i in rest if by[i] == thief]
                assert taken == sorted(taken, reverse=True)


def test_one_thread_runs_its_run_then_the_others_back_to_front():
    # Runs [0, 1), [1, 3), [3, 5): run 0, then run 1 from its back, then run 2 from its back.
    _, by, when = _C.shared_runs_visits(5, 3, 1)
    assert by == [0] * 5
    assert [i for _, i in sorted(zip(when, range(5)))] == [0, 2, 1, 4, 3]


def test_front_is_the_item_a_run_hands_out_next_or_minus_one():
    # Runs [0, 1), [1, 3), [3, 5) on one thread: 0, then run 1 from its back (2, 1), then run 2 (4, 3). front(r)
    # is the run's next item from its front while it holds any (what the one-call forward prefetches), -1 when it
    # is empty or r is out of range.
    seen = _C.shared_runs_fronts(5, 3)
    assert seen[0] == [-1, 0, 1, 3, -1]
    assert [tuple(s) for s in seen[1:]] == [(0, [-1, -1, 1, 3, -1]), (2, [-1, -1, 1, 3, -1]),
                                           (1, [-1, -1, -1, 3, -1]), (4, [-1, -1, -1, 3, -1]),
                                           (3, [-1, -1, -1, -1, -1])]
    assert _C.shared_runs_fronts(0, 2) == [[-1, -1, -1, -1]]


@pytest.mark.parametrize("n,runs,threads", [(-1, 2, 2), (1 << 32, 2, 2), (4, 2, 0)])
def test_bad_arguments_are_refused(n, runs, threads):
    with pytest.raises(ValueError, match="items must be in|threads must be"):
        _C.shared_runs_visits(n, runs, threads)
