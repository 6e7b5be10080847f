"""Sliding-window grid arithmetic, in pure Python (no torch): the one count of a volume's patches.

The jobs' cost model (the runtime of an inference chunk) counts a volume's patches with
:func:`grid_patch_count`, the same count as torchio's GridSampler makes at inference
(``tests/test_inference_core.py`` compares them), so that its estimate agrees with what runs.
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
