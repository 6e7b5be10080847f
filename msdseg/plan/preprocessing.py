"""The plans: preprocessing (plan.json) from the training set's fingerprint.

plan.json holds what resampling and intensity preprocessing need (target spacing,
normalisation); :mod:`msdseg.plan.training` turns the same fingerprint, the device and the time budget
into the training plan (network, patch, batch, iterations). Two files, so that a change of a
training setting never redoes resampling.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from msdseg import files
from msdseg.config import load_config
from msdseg.decathlon import TASKS, DatasetInfo, foreground_labels, label_json
from msdseg.errors import DatasetError

if TYPE_CHECKING:  # annotations only
    import pandas as pd


ANISOTROPY = 3.0  # nnU-Net: an axis whose spacing is over 3x the others' is treated as low resolution


ZERO_BACKGROUND = 0.25  # share of voxels exactly 0 above which the background is taken to be 0 (masked z-score)


PLAN_KEYS = (
    "task",
    "labels",
    "modality",
    "n_channels",
    "target_spacing",
    "inplane_size",
    "image_interpolation",
    "clip",
    "normalization",
    "ct_window",
    "ct_mean",
    "ct_std",
    "resolution",
)


def _modality(dataset: DatasetInfo, task: str) -> str:
    """Modality of channel 0: dataset.json first, the task table when dataset.json has none."""
    if dataset.modality:
        return str(dataset.modality.get(0, next(iter(dataset.modality.values()))))
    if task in TASKS:
        return str(TASKS[task].modality)
    return ""


def median_target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> list[float]:
    """The median spacing per axis, except nnU-Net's rule for strongly anisotropic data.

    Where one axis's median spacing is over 3x the others' and it has under a third of their
    voxels, that axis gets the 10th percentile of its spacings (never finer than the other axes):
    a median of thick slices would throw away the thinner-sliced scans' resolution.
    """
    target = np.median(spacings, axis=0)
    median_shape = np.median(shapes, axis=0)
    worst = int(np.argmax(target))
    others = [axis for axis in range(len(target)) if axis != worst]
    if not others:
        return [float(v) for v in target]
    finest_other = float(np.max(target[others]))
    if target[worst] > ANISOTROPY * finest_other and median_shape[worst] * ANISOTROPY < np.max(median_shape[others]):
        target[worst] = max(float(np.percentile(spacings[:, worst], 10)), finest_other)
    return [float(v) for v in target]


def auto_normalization(modality: str, training: pd.DataFrame) -> str:
    """ct for CT; zscore_nonzero where most training images have a zero background; else zscore."""
    if modality.strip().upper() == "CT":
        return "ct"
    if "zero_fraction" in training.columns:
        zero = training["zero_fraction"].astype("float64")
        if len(zero) and float(zero.median()) > ZERO_BACKGROUND:
            return "zscore_nonzero"
    return "zscore"


def make_plan(manifest: pd.DataFrame, dataset: DatasetInfo, preprocess: Mapping[str, Any], task: str,
              resolution: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """plan.json from the training subjects of the manifest and the ``preprocess`` config section.

    ``preprocess`` may be partial (library use): missing keys get the schema defaults.
    ``resolution`` (:func:`msdseg.plan.resolution.resolution_for_cohort`): the spacing a CPU budget
    affords, where it is coarser than the median one; None keeps the spacing ``preprocess`` gives.
    """
    settings = load_config({"preprocess": dict(preprocess)})["preprocess"]
    training = manifest[manifest["role"] == "train"]
    if training.empty:
        raise DatasetError("the manifest has no training subject; a plan needs labelled subjects.")
    normalization = settings["normalization"]
    if normalization == "auto":
        normalization = auto_normalization(_modality(dataset, task), training)
    ct_window = ct_mean = ct_std = None
    if normalization == "ct":
        ct_window, ct_mean, ct_std = _ct_statistics(training, dataset, settings["ct_window"])
    inplane = settings["inplane_size"]
    target_spacing = _target_spacing(training, settings["spacing"])
    if resolution is not None:
        target_spacing = [float(v) for v in resolution["spacing"]]
    return {
        "task": str(task),
        "labels": label_json(dataset.labels),
        "modality": label_json(dataset.modality),
        "n_channels": _channels(manifest),
        "target_spacing": target_spacing,
        "inplane_size": [int(v) for v in inplane] if inplane is not None else None,
        "image_interpolation": settings["image_interpolation"],
        "clip": [float(v) for v in settings["clip"]] if settings["clip"] is not None else None,
        "normalization": normalization,
        "ct_window": ct_window,
        "ct_mean": ct_mean,
        "ct_std": ct_std,
        "resolution": dict(resolution) if resolution is not None else None,
    }


def _channels(manifest: pd.DataFrame) -> int:
    channels = sorted({int(n) for n in manifest["n_channels"]})
    if len(channels) != 1:
        counts = manifest.groupby("n_channels")["subject"].apply(lambda s: list(s)[:3]).to_dict()
        raise DatasetError(
            f"subjects have different channel counts {channels} (examples {counts}); every image of "
            "a task needs the same channels: fix dataset.json or exclude the odd subjects."
        )
    return channels[0]


def _target_spacing(training: pd.DataFrame, setting: Any) -> list[float] | None:
    """preprocess.spacing: 'median' (nnU-Net's rule), null (each image's own) or a list."""
    if setting == "median":
        spacings = np.array([list(s) for s in training["spacing"]], dtype=np.float64)
        shapes = np.array([list(s) for s in training["shape"]], dtype=np.float64)
        return median_target_spacing(spacings, shapes)
    return None if setting is None else [float(v) for v in setting]


def _ct_statistics(training: pd.DataFrame, dataset: DatasetInfo,
                   fixed_window: Sequence[float] | None) -> tuple[list[float], float, float]:
    """(window, mean, std) of CT foreground, as nnU-Net's CTNormalization.

    The window is the median over training subjects of each subject's foreground 0.5 and 99.5
    percentiles (a median of per-subject values, not percentiles of all pooled voxels); mean and
    std are the exact pooled foreground moments, combined from per-subject moments and voxel counts.
    """
    foreground_columns = [f"voxels_{k}" for k in foreground_labels(dataset.labels)]
    missing = [c for c in foreground_columns if c not in training.columns]
    if missing:
        raise DatasetError(f"the manifest lacks {missing} for the dataset.json labels; rebuild manifest.csv.")
    counts = training[foreground_columns].astype("float64").sum(axis=1).to_numpy() if foreground_columns else None
    usable = (
        (counts > 0) & np.isfinite(training["fg_mean"].to_numpy(dtype=np.float64))
        if counts is not None
        else np.zeros(len(training), dtype=bool)
    )
    if not usable.any():
        raise DatasetError(
            "normalization 'ct' needs foreground statistics, but no training label has a "
            "foreground voxel; set preprocess.ct_window and preprocess.normalization: zscore, or fix the labels."
        )
    subset = training[usable]
    n = counts[usable]
    means = subset["fg_mean"].to_numpy(dtype=np.float64)
    stds = subset["fg_std"].to_numpy(dtype=np.float64)
    mean = float(np.sum(n * means) / np.sum(n))
    std = float(math.sqrt(np.sum(n * (stds**2 + (means - mean) ** 2)) / np.sum(n)))
    if fixed_window is not None:
        return [float(v) for v in fixed_window], mean, std
    window = [float(np.median(subset["fg_p00_5"].to_numpy(dtype=np.float64))),
              float(np.median(subset["fg_p99_5"].to_numpy(dtype=np.float64)))]
    return window, mean, std


def write_plan(plan: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write plan.json atomically with sorted keys (same plan, same bytes)."""
    files.write_text(json.dumps(plan, indent=2, sort_keys=True) + "\n", path)


def read_plan(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read plan.json, checking it has every key this version writes."""
    return files.read_checked_json(path, PLAN_KEYS)
