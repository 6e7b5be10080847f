"""The benchmarks' one bootstrap: resample subjects with replacement, report a 95% interval."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def bootstrap_interval(statistic: Callable[..., np.ndarray], *per_subject: Sequence[float],
                       draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """2.5th and 97.5th percentiles of ``statistic`` over ``draws`` resamplings of the subjects.

    Every column is resampled with the same picks (paired measurements stay paired);
    ``statistic`` receives them as (draws, subjects) arrays and returns one value per draw.
    """
    columns = [np.asarray(column) for column in per_subject]
    picks = np.random.default_rng(seed).integers(0, len(columns[0]), size=(draws, len(columns[0])))
    low, high = np.percentile(statistic(*(column[picks] for column in columns)), [2.5, 97.5])
    return float(low), float(high)
