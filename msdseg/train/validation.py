"""Validation inside training: the same grid inference as the infer rules, Dice per label."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torchio as tio
from torch import nn

from msdseg.data.normalize import preprocessing
from msdseg.data.subjects import IMAGE, LABEL
from msdseg.decathlon import foreground_labels
from msdseg.grid import default_overlap
from msdseg.metrics import dice_per_label
from msdseg.model.sliding_window import predict_probabilities


def label_names(plan: Mapping[str, Any]) -> dict[int, str]:
    """Foreground labels -> names usable as CSV column suffixes (dataset.json names)."""
    return {label: "_".join(str(name).split()) for label, name in foreground_labels(plan["labels"]).items()}


def validate(model: nn.Module, subjects: Sequence[tio.Subject], plan: Mapping[str, Any],
             patch_size: Sequence[int], batch_size: int, precision: str, device: torch.device) -> dict[int, float]:
    """Mean Dice per foreground label over whole validation volumes (NaN when never present).

    Grid inference with the training patch, half-patch overlap and a hann window: validation is
    part of training and reads only training settings, so changing ``infer.*`` (which only the
    infer rules read) never reruns training.
    """
    patch = list(patch_size)
    overlap = default_overlap(patch)
    transform = preprocessing(plan)
    labels = list(label_names(plan))
    scores: dict[int, list[float]] = {label: [] for label in labels}
    for subject in subjects:
        prepared = transform(subject)
        probabilities = predict_probabilities(
            model, prepared[IMAGE].data, patch, overlap, batch_size=batch_size,
            device=device, overlap_mode="hann", tta=False, amp=precision)
        prediction = probabilities.argmax(0).numpy()
        reference = prepared[LABEL].data[0].numpy()
        for label, value in dice_per_label(prediction, reference, labels).items():
            scores[label].append(value)
    return {label: float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan")
            for label, values in scores.items()}


def mean_score(dice: Mapping[int, float]) -> float:
    """The validation score that picks the kept weights: mean Dice over labels present, else -inf."""
    valid = [v for v in dice.values() if not math.isnan(v)]
    return float(np.mean(valid)) if valid else -math.inf


def validated(row: Mapping[str, Any], names: Mapping[int, str]) -> bool:
    """Whether a training-log row carries validation Dice."""
    return any(row.get(f"val_dice_{n}") is not None for n in names.values())
