"""The Medical Segmentation Decathlon: the task table and the dataset.json reader.

Subjects always come from dataset.json, never from globbing the folders: the official archives
hold macOS AppleDouble files (``imagesTr/._hippocampus_001.nii.gz``) that are not images.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from msdseg.errors import DatasetError

_V = TypeVar("_V")

SYNTHETIC_TASK = "Task00_SyntheticLiver"
"""The embedded demo task (``msdseg.data.synthetic``), the workflow's default dataset."""
SYNTHETIC_LABELS = {"0": "background", "1": "liver", "2": "cancer"}
"""The demo's dataset.json labels (the torchio liver tutorial's classes)."""

_MIRROR = "https://msd-for-monai.s3-us-west-2.amazonaws.com"


@dataclass(frozen=True)
class TaskInfo:
    """An official task: where its archive lives, the MD5 it must have, its labels and channels, and
    its published fingerprint (median shape in voxels [x, y, z], median spacing, and the 10th
    percentile of the coarsest axis's spacing, from the nnU-Net paper's dataset table): enough to
    check a config before any download and to plan without the data."""

    name: str
    url: str
    md5: str
    modality: str
    description: str
    labels: tuple[str, ...]
    channels: int
    median_shape: tuple[int, int, int]
    median_spacing: tuple[float, float, float]
    n_training: int
    coarse_p10_spacing: float | None = None  # only where nnU-Net's anisotropy rule applies


def _task(name: str, md5: str, modality: str, description: str, labels: tuple[str, ...], channels: int,
          shape: tuple[int, int, int], spacing: tuple[float, float, float], n_training: int,
          coarse_p10: float | None = None) -> TaskInfo:
    return TaskInfo(name, f"{_MIRROR}/{name}.tar", md5, modality, description, labels, channels, shape, spacing,
                    n_training, coarse_p10)


# URLs and MD5s are the ones MONAI's ``monai.apps.DecathlonDataset`` verifies against.
TASKS: dict[str, TaskInfo] = {
    info.name: info
    for info in (
        _task("Task01_BrainTumour", "240a19d752f0d9e9101544901065d872", "MRI",
              "Gliomas: edema, non-enhancing and enhancing tumour; 4-channel MRI (FLAIR, T1w, T1gd, T2w)",
              ("background", "edema", "non-enhancing tumor", "enhancing tumour"), 4,
              (138, 169, 138), (1.0, 1.0, 1.0), 484),
        _task("Task02_Heart", "06ee59366e1e5124267b774dbd654057", "MRI", "Left atrium; mono-modal MRI",
              ("background", "left atrium"), 1, (232, 320, 115), (1.25, 1.25, 1.37), 20),
        _task("Task03_Liver", "a90ec6c4aa7f6a3d087205e23d4e6397", "CT", "Liver and liver tumours; portal venous CT",
              ("background", "liver", "cancer"), 1, (512, 512, 432), (0.77, 0.77, 1.0), 131),
        _task("Task04_Hippocampus", "9d24dba78a72977dbd1d2e110310f31b", "MRI",
              "Anterior and posterior hippocampus; mono-modal MRI",
              ("background", "Anterior", "Posterior"), 1, (35, 50, 36), (1.0, 1.0, 1.0), 260),
        _task("Task05_Prostate", "35138f08b1efaef89d7424d2bcc928db", "MRI",
              "Prostate peripheral and transition zones; 2-channel MRI (T2, ADC)",
              ("background", "PZ", "TZ"), 2, (320, 319, 20), (0.62, 0.62, 3.6), 32, 3.6),
        _task("Task06_Lung", "8afd997733c7fc0432f71255ba4e52dc", "CT", "Lung tumours; CT",
              ("background", "cancer"), 1, (512, 512, 252), (0.79, 0.79, 1.24), 63),
        _task("Task07_Pancreas", "4f7080cfca169fa8066d17ce6eb061e4", "CT",
              "Pancreas and pancreatic tumour; portal venous CT",
              ("background", "pancreas", "cancer"), 1, (512, 512, 96), (0.8, 0.8, 2.5), 281),
        _task("Task08_HepaticVessel", "641d79e80ec66453921d997fbf12a29c", "CT", "Hepatic vessels and tumour; CT",
              ("background", "Vessel", "Tumour"), 1, (512, 512, 49), (0.8, 0.8, 5.0), 303, 1.5),
        _task("Task09_Spleen", "410d4a301da4e5b2f6f86ec3ddba524e", "CT", "Spleen; CT",
              ("background", "spleen"), 1, (512, 512, 90), (0.79, 0.79, 5.0), 41, 1.6),
        _task("Task10_Colon", "bad7a188931dc2f6acf72b08eb6202d0", "CT", "Colon cancer primaries; CT",
              ("background", "colon cancer primaries"), 1, (512, 512, 95), (0.78, 0.78, 5.0), 126, 3.0),
    )
}


# nnU-Net's published 3d_fullres plans (patch [x, y, z], target spacing), as MONAI's dynunet_pipeline
# task parameters copy them: the reference the planner's choices are compared with (tests, benchmarks).
NNUNET_PLANS: dict[str, tuple[tuple[int, int, int], tuple[float, float, float]]] = {
    "Task01_BrainTumour": ((128, 128, 128), (1.0, 1.0, 1.0)),
    "Task02_Heart": ((160, 192, 80), (1.25, 1.25, 1.37)),
    "Task03_Liver": ((128, 128, 128), (0.77, 0.77, 1.0)),
    "Task04_Hippocampus": ((40, 56, 40), (1.0, 1.0, 1.0)),
    "Task05_Prostate": ((320, 256, 20), (0.62, 0.62, 3.6)),
    "Task06_Lung": ((192, 160, 80), (0.79, 0.79, 1.24)),
    "Task07_Pancreas": ((224, 224, 40), (0.8, 0.8, 2.5)),
    "Task08_HepaticVessel": ((192, 192, 64), (0.8, 0.8, 1.5)),
    "Task09_Spleen": ((192, 160, 64), (0.79, 0.79, 1.6)),
    "Task10_Colon": ((192, 160, 56), (0.78, 0.78, 3.0)),
}


@dataclass(frozen=True)
class SubjectFiles:
    """One subject as dataset.json lists it; ``label`` is None for test subjects."""

    subject: str
    image: Path
    label: Path | None
    role: str  # "train" | "test"


@dataclass(frozen=True)
class DatasetInfo:
    """The parsed dataset.json of an extracted task folder (``root``)."""

    name: str
    root: Path
    labels: dict[int, str]
    modality: dict[int, str]
    subjects: tuple[SubjectFiles, ...]

    @property
    def training(self) -> tuple[SubjectFiles, ...]:
        return tuple(s for s in self.subjects if s.role == "train")

    @property
    def test(self) -> tuple[SubjectFiles, ...]:
        return tuple(s for s in self.subjects if s.role == "test")


NIFTI_SUFFIXES = (".nii.gz", ".nii")
"""The image file suffixes msdseg reads and writes (longest first, so that ``.nii.gz`` is stripped whole)."""


def subject_id(path: str | Path) -> str:
    """Subject id of an image path: the file name without ``.nii.gz`` / ``.nii``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def int_keys(mapping: Mapping[Any, _V] | None) -> dict[int, _V]:
    """``{"1": x}`` -> ``{1: x}`` in the given order: JSON and YAML keep label values as strings.

    The one key conversion for every mapping keyed by label value (labels, label_probabilities).
    """
    return {int(key): value for key, value in (mapping or {}).items()}


def label_map(mapping: Mapping[Any, Any] | None) -> dict[int, str]:
    """Label value -> class name with integer keys in ascending order (``{"0": "background", ...}``).

    For the labels of dataset.json, plan.json and checkpoints, which store the keys as strings.
    """
    return {key: str(name) for key, name in sorted(int_keys(mapping).items())}


def foreground_labels(mapping: Mapping[Any, Any] | None) -> dict[int, str]:
    """:func:`label_map` without the background (label 0)."""
    return {key: name for key, name in label_map(mapping).items() if key != 0}


def label_json(mapping: Mapping[Any, Any] | None) -> dict[str, str]:
    """:func:`label_map` with the keys as strings again, for JSON files (``{"0": "background", ...}``)."""
    return {str(key): name for key, name in label_map(mapping).items()}


def _int_keyed(mapping: Any, json_path: Path, key: str) -> dict[int, str]:
    """``{"0": "background"}`` -> ``{0: "background"}``, naming the key when that fails."""
    if not isinstance(mapping, dict) or not mapping:
        raise DatasetError(
            f"{json_path}: key '{key}' must be a non-empty object like "
            f'{{"0": "background", "1": "liver"}}; fix dataset.json.'
        )
    result: dict[int, str] = {}
    for raw_key, value in mapping.items():
        try:
            result[int(raw_key)] = str(value)
        except (TypeError, ValueError):
            raise DatasetError(
                f"{json_path}: key '{key}' has entry {raw_key!r}, which is not an integer; "
                f'use integer keys as strings, e.g. "1": "{value}".'
            ) from None
    return dict(sorted(result.items()))


def _entry_path(value: Any, json_path: Path, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(
            f"{json_path}: '{key}' must be a path string like './imagesTr/case_001.nii.gz' "
            f"(got {value!r}); fix dataset.json."
        )
    return value


def read_dataset_json(task_dir: Path) -> DatasetInfo:
    """Parse ``task_dir/dataset.json`` into subjects; files listed are not checked for existence.

    Whether a listed file exists is the manifest's job, which can skip such subjects per config.
    """
    task_dir = Path(task_dir)
    json_path = task_dir / "dataset.json"
    if not json_path.is_file():
        raise DatasetError(
            f"{json_path}: not found. Point source.folder at an extracted Decathlon task "
            "(the folder that holds dataset.json, imagesTr/, labelsTr/), or delete the extracted "
            "folder so the archive is extracted again."
        )
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{json_path}: not valid JSON ({error}); fix or replace the file.") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{json_path}: the top level must be a JSON object with 'labels' and 'training'.")

    for key in ("training", "labels"):
        if key not in data:
            raise DatasetError(
                f"{json_path}: key '{key}' is missing; a Decathlon dataset.json needs 'labels' "
                "({\"0\": \"background\", ...}) and 'training' ([{\"image\": ..., \"label\": ...}])."
            )
    labels = _int_keyed(data["labels"], json_path, "labels")
    if sorted(labels) != list(range(len(labels))):
        raise DatasetError(
            f"{json_path}: label values {sorted(labels)} are not 0..{len(labels) - 1}; the network's classes are "
            "0..K-1, so relabel the label maps (and dataset.json 'labels') to consecutive values from 0 (background)."
        )
    modality = _int_keyed(data["modality"], json_path, "modality") if "modality" in data else {}

    training = data["training"]
    if not isinstance(training, list):
        raise DatasetError(f"{json_path}: key 'training' must be a list of {{\"image\", \"label\"}} objects.")
    test = data.get("test", [])
    if not isinstance(test, list):
        raise DatasetError(f"{json_path}: key 'test' must be a list of image paths.")

    subjects = _listed_subjects(task_dir, json_path, training, test)
    name = str(data.get("name") or task_dir.name)
    return DatasetInfo(name=name, root=task_dir, labels=labels, modality=modality, subjects=tuple(subjects))


def _listed_subjects(task_dir: Path, json_path: Path, training: list[Any], test: list[Any]) -> list[SubjectFiles]:
    """dataset.json's 'training' and 'test' entries as subjects, each id once."""
    subjects: list[SubjectFiles] = []
    for index, entry in enumerate(training):
        key = f"training[{index}]"
        if not isinstance(entry, dict):
            raise DatasetError(f"{json_path}: '{key}' must be an object with 'image' and 'label' (got {entry!r}).")
        for field in ("image", "label"):
            if field not in entry:
                raise DatasetError(f"{json_path}: '{key}' lacks key '{field}'; add it or remove the entry.")
        image = _entry_path(entry["image"], json_path, f"{key}.image")
        label = _entry_path(entry["label"], json_path, f"{key}.label")
        subjects.append(SubjectFiles(subject_id(image), task_dir / image, task_dir / label, "train"))
    for index, entry in enumerate(test):
        key = f"test[{index}]"
        if isinstance(entry, dict):
            if "image" not in entry:
                raise DatasetError(f"{json_path}: '{key}' lacks key 'image'; add it or remove the entry.")
            entry = entry["image"]
        image = _entry_path(entry, json_path, key)
        subjects.append(SubjectFiles(subject_id(image), task_dir / image, None, "test"))

    seen: set[str] = set()
    for subject in subjects:
        if subject.subject in seen:
            raise DatasetError(
                f"{json_path}: subject '{subject.subject}' is listed twice; subject ids (file names "
                "without .nii.gz) must be unique across 'training' and 'test'."
            )
        seen.add(subject.subject)
    return subjects
