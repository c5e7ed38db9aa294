"""Timing helper shared by the benchmarks."""

from __future__ import annotations

import time
from typing import Callable


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` runs: on a shared, noisy machine the minimum is the least disturbed reading."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best
