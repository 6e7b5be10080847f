"""Validation inside training: a pseudo-Dice on a fixed, seeded set of validation patches.

nnU-Net's way: whole-volume validation of a large CT costs minutes per case on a CPU, more than a
small budget holds, so training scores patches drawn once from the fold's validation cases (the
label sampler's class probabilities, seeded) and sums true/false positives over all of them.
Its cost is a planned share of the budget (``train.validation_patches``); it picks the kept
weights (``keep: best``). Whole-volume Dice stays in the infer_fold and evaluate rules.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torchio as tio
from torch import nn

from msdseg.data.normalize import preprocessing
from msdseg.data.subjects import IMAGE, LABEL, PadToAtLeast
from msdseg.decathlon import foreground_labels
from msdseg.devices import resolve_precision
from msdseg.metrics import dice_from_counts
from msdseg.train.queue import make_sampler

PATCHES_PER_CASE = 4  # where the plan left train.validation_patches unset


def label_names(plan: Mapping[str, Any]) -> dict[int, str]:
    """Foreground labels -> names usable as CSV column suffixes (dataset.json names)."""
    return {label: "_".join(str(name).split()) for label, name in foreground_labels(plan["labels"]).items()}


@dataclass(frozen=True)
class ValidationPatches:
    """Preprocessed validation patches, drawn once per run and scored at every validation."""

    images: torch.Tensor  # (N, C, x, y, z) float32
    labels: torch.Tensor  # (N, x, y, z) uint8


def draw_validation_patches(subjects: Sequence[tio.Subject], plan: Mapping[str, Any],
                            cfg_train: Mapping[str, Any], n_patches: int | None, seed: int) -> ValidationPatches:
    """``n_patches`` patches (None: :data:`PATCHES_PER_CASE` per case), spread evenly over ``subjects``.

    Drawn with a label sampler (the training's class probabilities) from a torch random stream
    seeded by ``seed`` alone, inside a forked stream: the same patches whatever the iteration or
    resume, and the training's own random streams untouched. Subjects are read one at a time.
    """
    count = int(n_patches) if n_patches else PATCHES_PER_CASE * len(subjects)
    transform = tio.Compose([preprocessing(plan), PadToAtLeast(cfg_train["patch_size"])])
    # centred on each class as the label sampler does, whatever sampler trains: a uniform draw of
    # small patches often misses a small structure, and its Dice would be NaN
    sampler = make_sampler({**cfg_train, "sampler": "label"})
    images: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for index, subject in enumerate(subjects):
            share = count // len(subjects) + (index < count % len(subjects))
            if share == 0:
                continue
            prepared = transform(subject)
            for patch in itertools.islice(sampler(prepared), share):
                images.append(patch[IMAGE].data.to(torch.float32))
                labels.append(patch[LABEL].data[0].to(torch.uint8))
            del prepared
    return ValidationPatches(torch.stack(images), torch.stack(labels))


def pseudo_dice(model: nn.Module, patches: ValidationPatches, labels: Sequence[int], batch_size: int,
                precision: str, device: torch.device) -> dict[int, float]:
    """Dice per foreground label from true/false positives summed over every patch (NaN: never present)."""
    dtype = resolve_precision(precision, device)
    counts = np.zeros((len(labels), 3), dtype=np.int64)  # true positives, false positives, false negatives
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(patches.images), batch_size):
            x = patches.images[start:start + batch_size].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                predicted = model(x).argmax(1).cpu()
            reference = patches.labels[start:start + batch_size].to(torch.int64)
            for row, label in enumerate(labels):
                ours, theirs = predicted == label, reference == label
                overlap = int((ours & theirs).sum())
                counts[row] += (overlap, int(ours.sum()) - overlap, int(theirs.sum()) - overlap)
    return {label: dice_from_counts(*counts[row]) for row, label in enumerate(labels)}


def mean_score(dice: Mapping[int, float]) -> float:
    """The validation score that picks the kept weights: mean Dice over labels present, else -inf."""
    valid = [v for v in dice.values() if not math.isnan(v)]
    return float(np.mean(valid)) if valid else -math.inf


def validated(row: Mapping[str, Any], names: Mapping[int, str]) -> bool:
    """Whether a training-log row carries validation Dice."""
    return any(row.get(f"val_dice_{n}") is not None for n in names.values())
