"""Shared timing helper for the benchmarks: interleaved rounds, so load drifts hit every variant."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


def time_interleaved(
    fns: dict[str, Callable[[], Any]], rounds: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per call of each function, ``rounds`` times after ``warmup`` untimed rounds; the
    order rotates every round."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for r in range(warmup + rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for n in order:
                start = time.perf_counter()
                fns[n]()
                elapsed = time.perf_counter() - start
                if r >= warmup:
                    times[n].append(elapsed)
    return times
