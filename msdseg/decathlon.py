"""The Medical Segmentation Decathlon: the task table and the dataset.json reader.

Subjects always come from dataset.json, never from globbing the folders: the official archives
hold macOS AppleDouble files (``imagesTr/._hippocampus_001.nii.gz``) that are not images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from msdseg.errors import DatasetError

SYNTHETIC_TASK = "Task00_SyntheticLiver"
"""The embedded demo task (``msdseg.synthetic``), the workflow's default dataset."""

_MIRROR = "https://msd-for-monai.s3-us-west-2.amazonaws.com"


@dataclass(frozen=True)
class TaskInfo:
    """Where an official task archive lives and the MD5 it must have."""

    name: str
    url: str
    md5: str
    modality: str
    description: str


def _task(name: str, md5: str, modality: str, description: str) -> TaskInfo:
    return TaskInfo(name=name, url=f"{_MIRROR}/{name}.tar", md5=md5, modality=modality, description=description)


# URLs and MD5s are the ones MONAI's ``monai.apps.DecathlonDataset`` verifies against.
TASKS: dict[str, TaskInfo] = {
    info.name: info
    for info in (
        _task("Task01_BrainTumour", "240a19d752f0d9e9101544901065d872", "MRI",
              "Gliomas: edema, non-enhancing and enhancing tumour; 4-channel MRI (FLAIR, T1w, T1gd, T2w)"),
        _task("Task02_Heart", "06ee59366e1e5124267b774dbd654057", "MRI",
              "Left atrium; mono-modal MRI"),
        _task("Task03_Liver", "a90ec6c4aa7f6a3d087205e23d4e6397", "CT",
              "Liver and liver tumours; portal venous CT"),
        _task("Task04_Hippocampus", "9d24dba78a72977dbd1d2e110310f31b", "MRI",
              "Anterior and posterior hippocampus; mono-modal MRI"),
        _task("Task05_Prostate", "35138f08b1efaef89d7424d2bcc928db", "MRI",
              "Prostate peripheral and transition zones; 2-channel MRI (T2, ADC)"),
        _task("Task06_Lung", "8afd997733c7fc0432f71255ba4e52dc", "CT",
              "Lung tumours; CT"),
        _task("Task07_Pancreas", "4f7080cfca169fa8066d17ce6eb061e4", "CT",
              "Pancreas and pancreatic tumour; portal venous CT"),
        _task("Task08_HepaticVessel", "641d79e80ec66453921d997fbf12a29c", "CT",
              "Hepatic vessels and tumour; CT"),
        _task("Task09_Spleen", "410d4a301da4e5b2f6f86ec3ddba524e", "CT",
              "Spleen; CT"),
        _task("Task10_Colon", "bad7a188931dc2f6acf72b08eb6202d0", "CT",
              "Colon cancer primaries; CT"),
    )
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


def subject_id(path: str | Path) -> str:
    """Subject id of an image path: the file name without ``.nii.gz`` / ``.nii``."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


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
    modality = _int_keyed(data["modality"], json_path, "modality") if "modality" in data else {}

    training = data["training"]
    if not isinstance(training, list):
        raise DatasetError(f"{json_path}: key 'training' must be a list of {{\"image\", \"label\"}} objects.")
    test = data.get("test", [])
    if not isinstance(test, list):
        raise DatasetError(f"{json_path}: key 'test' must be a list of image paths.")

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

    name = str(data.get("name") or task_dir.name)
    return DatasetInfo(name=name, root=task_dir, labels=labels, modality=modality, subjects=tuple(subjects))
