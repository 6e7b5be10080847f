"""read_dataset_json() on the real hippocampus task and on broken files; the TASKS table."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from msdseg.decathlon import (
    SYNTHETIC_TASK,
    TASKS,
    foreground_labels,
    int_keys,
    label_json,
    label_map,
    read_dataset_json,
    subject_id,
)
from msdseg.errors import DatasetError


def test_real_hippocampus(hippocampus_dir: Path) -> None:
    info = read_dataset_json(hippocampus_dir)
    assert info.name == "Hippocampus" and info.root == hippocampus_dir
    assert len(info.training) == 200 and len(info.test) == 10 and len(info.subjects) == 210
    assert info.labels == {0: "background", 1: "Anterior", 2: "Posterior"}
    assert info.modality == {0: "MRI"}
    assert not [s for s in info.subjects if s.subject.startswith("._")]
    # the archive does hold AppleDouble junk; dataset.json is what keeps it out
    assert list((hippocampus_dir / "imagesTr").glob("._*"))
    first = info.training[0]
    assert first.subject == "hippocampus_001" and first.role == "train"
    assert first.image == hippocampus_dir / "imagesTr" / "hippocampus_001.nii.gz"
    assert first.label == hippocampus_dir / "labelsTr" / "hippocampus_001.nii.gz"
    assert all(s.image.is_file() and s.label is not None and s.label.is_file() for s in info.training)
    assert all(s.label is None and s.role == "test" and s.image.is_file() for s in info.test)


def _write(folder: Path, content: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = content if isinstance(content, str) else json.dumps(content)
    (folder / "dataset.json").write_text(text)
    return folder


GOOD = {
    "name": "Mini",
    "labels": {"0": "background", "1": "organ"},
    "modality": {"0": "CT"},
    "training": [{"image": "./imagesTr/a_1.nii.gz", "label": "./labelsTr/a_1.nii.gz"}],
    "test": ["./imagesTs/a_2.nii.gz", {"image": "./imagesTs/a_3.nii"}],
}


def test_minimal_dataset_with_test_dicts_and_missing_files(tmp_path: Path) -> None:
    info = read_dataset_json(_write(tmp_path, GOOD))
    assert [s.subject for s in info.subjects] == ["a_1", "a_2", "a_3"]
    assert info.test[1].image == tmp_path / "imagesTs" / "a_3.nii"
    assert not info.training[0].image.exists()  # existence is the manifest's job


def test_missing_dataset_json(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"dataset\.json: not found.*source\.folder"):
        read_dataset_json(tmp_path)


def test_not_json(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"dataset\.json: not valid JSON"):
        read_dataset_json(_write(tmp_path, '{"labels": {"0": "background"},'))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"training": None}, "key 'training' is missing"),
        ({"labels": None}, "key 'labels' is missing"),
        ({"labels": {"zero": "background"}}, "key 'labels' has entry 'zero'"),
        ({"labels": {}}, "key 'labels' must be a non-empty object"),
        ({"training": [{"image": "./imagesTr/a_1.nii.gz"}]}, r"'training\[0\]' lacks key 'label'"),
        ({"training": ["./imagesTr/a_1.nii.gz"]}, r"'training\[0\]' must be an object"),
        ({"test": [{"label": "x"}]}, r"'test\[0\]' lacks key 'image'"),
        ({"test": [42]}, r"'test\[0\]' must be a path string"),
        ({"test": ["./imagesTs/a_1.nii.gz"]}, "subject 'a_1' is listed twice"),
    ],
)
def test_malformed_dataset_names_file_and_key(tmp_path: Path, change: dict, expected: str) -> None:
    content = {**GOOD, **change}
    content = {key: value for key, value in content.items() if value is not None}
    folder = _write(tmp_path, content)
    with pytest.raises(DatasetError, match=expected) as caught:
        read_dataset_json(folder)
    assert str(folder / "dataset.json") in str(caught.value)


def test_subject_id() -> None:
    assert subject_id("./imagesTr/liver_0.nii.gz") == "liver_0"
    assert subject_id("prostate_00.nii") == "prostate_00"


def test_label_keys() -> None:
    """JSON keeps label values as strings; code gets integers in ascending order, JSON gets strings back."""
    stored = {"10": "ten", "2": "two", "0": "background"}
    assert list(label_map(stored).items()) == [(0, "background"), (2, "two"), (10, "ten")]
    assert label_map({0: "background", 1: 7}) == {0: "background", 1: "7"} and label_map(None) == {}
    assert foreground_labels(stored) == {2: "two", 10: "ten"}
    assert list(label_json({1: "liver", 0: "background"}).items()) == [("0", "background"), ("1", "liver")]
    assert list(int_keys({"2": 0.5, "0": 0.1}).items()) == [(2, 0.5), (0, 0.1)]  # order kept: values untouched


def test_tasks_table() -> None:
    assert list(TASKS) == [
        "Task01_BrainTumour", "Task02_Heart", "Task03_Liver", "Task04_Hippocampus", "Task05_Prostate",
        "Task06_Lung", "Task07_Pancreas", "Task08_HepaticVessel", "Task09_Spleen", "Task10_Colon",
    ]  # fmt: skip
    for name, task in TASKS.items():
        assert task.name == name
        assert re.fullmatch(r"[0-9a-f]{32}", task.md5), name
        assert task.url == f"https://msd-for-monai.s3-us-west-2.amazonaws.com/{name}.tar"
        assert task.modality in {"CT", "MRI"}
    assert len({task.md5 for task in TASKS.values()}) == 10
    assert TASKS["Task04_Hippocampus"].md5 == "9d24dba78a72977dbd1d2e110310f31b"
    assert SYNTHETIC_TASK not in TASKS
