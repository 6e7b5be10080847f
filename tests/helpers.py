"""Builders and checks only the tests use; fixtures around them live in conftest.py.

``tests/`` is on ``sys.path`` while pytest runs, so test files (and scripts they start in a
subprocess with ``cwd`` or ``PYTHONPATH`` at ``tests/``) import these as ``from helpers import plan``.

Builders
- :func:`plan`: a complete plan.json dict (z-score, no resampling unless ``target_spacing``).
- :func:`tiny_config`: a validated config with a tiny U-Net and in-process data loading.
- :func:`training_rows`: the training subjects of an extracted task as rows for ``msdseg.train``.

Checks that the package itself does not need
- :func:`assert_dice_floors`: every class's mean Dice in dice_summary.csv at least its floor (NaN fails).
- :func:`predicted_volumes`, :func:`resample_to_reference`, :func:`resample_label_to_reference`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk

from msdseg import images
from msdseg.config import load_config
from msdseg.data.resample import _check_grid, _resample, channels_on_reference
from msdseg.decathlon import foreground_labels, label_json, read_dataset_json, subject_id
from msdseg.metrics import volume_ml

SYNTHETIC_LABELS = {0: "background", 1: "liver", 2: "cancer"}
HIPPOCAMPUS_LABELS = {0: "background", 1: "Anterior", 2: "Posterior"}


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_archive(name: str) -> Path:
    """A real archive of ``../shared/data`` beside the checkout; the calling test skips, saying why, without it."""
    import pytest

    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(reason=f"real test data {path} not found (expected ../shared/data beside the checkout)")
    return path


# --------------------------------------------------------------------------- builders


def plan(
    task: str = "Task00_SyntheticLiver",
    labels: Mapping[Any, str] = SYNTHETIC_LABELS,
    *,
    modality: str = "CT",
    target_spacing: Sequence[float] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """A plan.json dict with every key :func:`msdseg.plan.preprocessing.read_plan` wants; ``overrides`` replace keys."""
    built = {
        "task": task, "labels": label_json(labels), "modality": {"0": modality}, "n_channels": 1,
        "target_spacing": None if target_spacing is None else list(target_spacing), "inplane_size": None,
        "image_interpolation": "linear", "clip": None, "normalization": "zscore",
        "ct_window": None, "ct_mean": None, "ct_std": None,
    }
    unknown = set(overrides) - set(built)
    assert not unknown, f"not plan keys: {sorted(unknown)}"
    return {**built, **overrides}


def tiny_config(
    task: str = "Task00_SyntheticLiver",
    model: Mapping[str, Any] | None = None,
    infer: Mapping[str, Any] | None = None,
    **train: Any,
) -> dict[str, Any]:
    """:func:`msdseg.config.load_config` with a 4-channel, depth-2 U-Net and ``num_workers: 0``.

    ``model`` and ``infer`` update those sections, ``train`` keywords the train section; every
    other key keeps its schema default.
    """
    return load_config({
        "task": task,
        "model": {"base_channels": 4, "depth": 2, **(model or {})},
        "train": {"num_workers": 0, **train},
        "infer": dict(infer or {}),
    })


def training_rows(task_dir: Path, n: int | None = None) -> list[dict[str, str]]:
    """The first ``n`` (default all) training subjects of dataset.json as {subject, image, label} rows."""
    dataset = read_dataset_json(Path(task_dir))
    return [{"subject": s.subject, "image": str(s.image), "label": str(s.label)} for s in dataset.training[:n]]


# --------------------------------------------------------------------------- checks


def assert_dice_floors(summary_csv: Path, floors: Mapping[str, float], fold: str = "all") -> None:
    """Each class's mean Dice over ``fold`` (default: all folds) in dice_summary.csv is at least its floor.

    A NaN mean (a class never scored, or a broken metric) fails: NaN is never >= a floor. Floors
    are set from measured runs with a margin (quoted beside each call).
    """
    summary = pd.read_csv(summary_csv, dtype={"fold": str})
    rows = summary[summary["fold"] == fold].set_index("class_name")
    measured = {name: float(rows.loc[name, "mean"]) if name in rows.index else float("nan") for name in floors}
    below = {name: value for name, value in measured.items() if not value >= floors[name]}
    assert not below, f"{summary_csv}: mean Dice {measured} below the floors {dict(floors)} for {sorted(below)}"


def predicted_volumes(prediction_paths: Iterable[str | os.PathLike[str]], labels: Mapping[Any, str]) -> pd.DataFrame:
    """Volume in mL of every foreground class per prediction (columns subject, label, class_name, volume_ml)."""
    rows = []
    classes = foreground_labels(labels)
    for path in prediction_paths:
        data, _, spacing = images.read_label_volume(path)
        for key, class_name in classes.items():
            rows.append({"subject": subject_id(path), "label": key, "class_name": class_name,
                         "volume_ml": volume_ml(data, key, spacing)})
    frame = pd.DataFrame(rows, columns=["subject", "label", "class_name", "volume_ml"])
    return frame.sort_values(["subject", "label"], kind="stable").reset_index(drop=True)


def resample_to_reference(
    probabilities: np.ndarray, source: sitk.Image | sitk.ImageFileReader, reference: sitk.Image | sitk.ImageFileReader
) -> np.ndarray:
    """(C, x, y, z) on ``source``'s grid -> (C, x', y', z') float32 on ``reference``'s, all channels at once.

    :func:`msdseg.data.resample.channels_on_reference` stacked, to compare whole volumes.
    """
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 4:
        raise ValueError(f"probabilities must be (C, x, y, z), got shape {probabilities.shape}")
    reference_grid = images.spatial_geometry(reference)
    result = np.empty((probabilities.shape[0], *reference_grid.size), dtype=np.float32)
    for index, channel in enumerate(channels_on_reference(probabilities, source, reference)):
        result[index] = channel
    return result


def resample_label_to_reference(
    label: np.ndarray, source: sitk.Image | sitk.ImageFileReader, reference: sitk.Image | sitk.ImageFileReader
) -> np.ndarray:
    """(x, y, z) label map on ``source``'s grid -> (x', y', z') on ``reference``'s, nearest neighbour.

    Keeps the integer dtype (bool becomes uint8).
    """
    label = np.asarray(label)
    if label.ndim != 3:
        raise ValueError(f"label must be (x, y, z), got shape {label.shape}")
    if label.dtype == bool:
        label = label.astype(np.uint8)
    source_grid = images.spatial_geometry(source)
    _check_grid(label, source_grid, "label")
    image = images.image_on_grid(label, source_grid)
    resampled = _resample(image, images.spatial_geometry(reference), sitk.sitkNearestNeighbor, image.GetPixelID())
    return images.to_xyz(resampled).astype(label.dtype, copy=False)


def write_task_folder(root: Path, name: str, *, labels: Sequence[str], channels: int = 1,
                      shape: Sequence[int] = (40, 40, 24), spacing: Sequence[float] = (1.0, 1.0, 1.0),
                      n_train: int = 10, n_test: int = 2, zero_background: bool = False,
                      modality: str = "MRI", seed: int = 0) -> Path:
    """A small Decathlon-format task folder of nested ellipsoids (one per foreground label), for planner runs.

    ``channels`` > 1 writes 4D images (x, y, z, c); ``zero_background`` sets every voxel outside the
    outer ellipsoid to exactly 0 in every channel (skull-stripped MRI, as BrainTumour).
    """
    import json

    import nibabel as nib

    rng = np.random.default_rng(seed)
    task = Path(root) / name
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (task / folder).mkdir(parents=True, exist_ok=True)
    affine = np.diag([*map(float, spacing), 1.0])
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    training, test = [], []
    for index in range(n_train + n_test):
        center = np.array(shape) / 2 + rng.uniform(-2, 2, 3)
        label = np.zeros(shape, dtype=np.uint8)
        radius = np.array(shape) * rng.uniform(0.3, 0.38)
        for value in range(1, len(labels)):
            inside = (((grid - center[:, None, None, None]) / radius[:, None, None, None]) ** 2).sum(0) <= 1
            label[inside] = value
            radius = radius * 0.6
        body = (((grid - center[:, None, None, None]) / (np.array(shape)[:, None, None, None] * 0.45)) ** 2).sum(0) <= 1
        image = np.stack([100.0 * (c + 1) + 40.0 * label + rng.normal(0, 10, shape) for c in range(channels)], -1)
        if zero_background:
            image[~body] = 0.0
        image = image.astype(np.float32)[..., 0] if channels == 1 else image.astype(np.float32)
        case = f"{name.lower()}_{index:03d}.nii.gz"
        if index < n_train:
            nib.save(nib.Nifti1Image(image, affine), task / "imagesTr" / case)
            nib.save(nib.Nifti1Image(label, affine), task / "labelsTr" / case)
            training.append({"image": f"./imagesTr/{case}", "label": f"./labelsTr/{case}"})
        else:
            nib.save(nib.Nifti1Image(image, affine), task / "imagesTs" / case)
            test.append(f"./imagesTs/{case}")
    names = {str(c): f"{modality}{c}" if channels > 1 else modality for c in range(channels)}
    dataset = {"name": name, "modality": names,
               "labels": {str(k): v for k, v in enumerate(labels)}, "training": training, "test": test}
    (task / "dataset.json").write_text(json.dumps(dataset, indent=1))
    return task


def merged_hippocampus(source: Path, root: Path, n: int = 16) -> Path:
    """A 2-label task from the real Task04 cases: anterior and posterior merged into one hippocampus."""
    import json

    import nibabel as nib

    dataset = read_dataset_json(Path(source))
    task = Path(root) / "Task84_Hippocampus2"
    entries = []
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (task / folder).mkdir(parents=True, exist_ok=True)
    training = [s for s in dataset.subjects if s.role == "train"][:n]
    for subject in training:
        label = nib.load(subject.label)
        merged = (np.asarray(label.dataobj) > 0).astype(np.uint8)
        nib.save(nib.Nifti1Image(merged, label.affine), task / "labelsTr" / subject.label.name)
        (task / "imagesTr" / subject.image.name).write_bytes(subject.image.read_bytes())
        entries.append({"image": f"./imagesTr/{subject.image.name}", "label": f"./labelsTr/{subject.label.name}"})
    tests = [s for s in dataset.subjects if s.role == "test"][:2]
    for subject in tests:
        (task / "imagesTs" / subject.image.name).write_bytes(subject.image.read_bytes())
    (task / "dataset.json").write_text(json.dumps({
        "name": task.name, "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "hippocampus"},
        "training": entries, "test": [f"./imagesTs/{s.image.name}" for s in tests]}, indent=1))
    return task
