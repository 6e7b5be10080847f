"""Sliding-window grid arithmetic, in pure Python (no torch): the one count of a volume's patches.

Inference (torchio's GridSampler), the planner's validation cost and the jobs' cost model all
count patches with :func:`grid_patch_count`, so that their estimates agree with what runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def default_overlap(patch_size: Sequence[int]) -> tuple[int, ...]:
    """Half the patch on each axis, rounded down to an even number (torchio needs even overlaps)."""
    return tuple(int(p) // 2 - (int(p) // 2) % 2 for p in patch_size)


def grid_patch_count(shape: Sequence[float], patch: Sequence[int], overlap: Sequence[int] | None = None) -> int:
    """How many patches a grid sampler takes from ``shape`` (padded to at least the patch).

    ``overlap`` None: :func:`default_overlap`, the sliding window's default.
    """
    laps = default_overlap(patch) if overlap is None else overlap
    count = 1
    for size, width, lap in zip(shape, patch, laps):
        step = max(int(width) - int(lap), 1)
        count *= max(1, math.ceil((max(size, int(width)) - int(lap)) / step))
    return count
