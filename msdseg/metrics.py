"""Segmentation metrics: the only place a Dice is computed (training validation uses it too)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def dice(prediction: np.ndarray, reference: np.ndarray, label: int) -> float:
    """Dice of one label. NaN when both are empty (nnU-Net's convention: nothing to score)."""
    pred = prediction == label
    ref = reference == label
    denominator = int(pred.sum()) + int(ref.sum())
    if denominator == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(pred, ref).sum()) / denominator


def dice_per_label(prediction: np.ndarray, reference: np.ndarray, labels: Iterable[int]) -> dict[int, float]:
    """Dice for each label in ``labels`` (usually the foreground labels of dataset.json)."""
    return {int(label): dice(prediction, reference, int(label)) for label in labels}
