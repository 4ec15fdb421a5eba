"""engines.parallel: candidates evaluated in forked workers, results in item order, and a greedy search
that chooses exactly the sequential loop's nodes (ties in name order) at any width."""

from __future__ import annotations

import os
import threading

import pytest

from engines import parallel
from engines.fallback import greedy_search


@pytest.fixture
def two_workers():
    parallel.configure(jobs=2)
    yield
    parallel.configure(jobs=1)


def test_items_run_in_worker_processes_and_come_back_in_order(two_workers) -> None:
    lock = threading.Lock()  # cannot be pickled: the workers inherit the closure, it is never sent
    results = parallel.parallel_map(lambda item: (item * item, os.getpid(), lock.locked()), list(range(7)))
    assert [value for value, _, _ in results] == [n * n for n in range(7)]
    assert os.getpid() not in {pid for _, pid, _ in results}


def test_a_worker_error_reaches_the_caller(two_workers) -> None:
    def fail(item: int) -> int:
        if item == 3:
            raise ValueError("candidate 3 is broken")
        return item

    with pytest.raises(ValueError, match="candidate 3 is broken"):
        parallel.parallel_map(fail, [1, 2, 3, 4])


# A ranking with ties (b and c, e and f score alike): order_ranking breaks them by name.
RANKING = [("f", 0.1), ("a", 0.5), ("c", 0.3), ("b", 0.3), ("e", 0.1), ("d", 0.2)]
GAIN = {"a": 0.004, "b": 0.003, "c": 0.002, "d": 0.0005, "e": 0.0001, "f": 0.0001}


def _score(names: list[str]) -> float:
    return 0.99 + sum(GAIN[name] for name in names)


@pytest.mark.parametrize("target, max_nodes", [(0.995, 6), (0.9985, 6), (0.9999, 6), (1.5, 6), (1.5, 2), (0.98, 6)])
def test_parallel_greedy_search_chooses_the_sequential_nodes(target: float, max_nodes: int) -> None:
    sequential = greedy_search(RANKING, _score, target, max_nodes, 0.99)
    for jobs in (2, 3):
        parallel.configure(jobs=jobs)
        try:
            fanned = greedy_search(RANKING, _score, target, max_nodes, 0.99)
        finally:
            parallel.configure(jobs=1)
        assert fanned.chosen == sequential.chosen and fanned.met == sequential.met
        assert [(t.excluded, t.metric) for t in fanned.trials] == [(t.excluded, t.metric) for t in sequential.trials]
    assert sequential.chosen == ["a", "b", "c", "d", "e", "f"][:len(sequential.chosen)], "ties broken by name"
