"""msdseg.data.manifest on the real hippocampus archive, and on real files broken on purpose."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from msdseg.data.manifest import (
    EXCLUDED_COLUMNS,
    assign_folds,
    build_manifest,
    manifest_columns,
    read_manifest,
    split_fold,
    write_excluded,
    write_manifest,
)
from msdseg.decathlon import DatasetInfo, read_dataset_json
from msdseg.errors import ConfigError, DatasetError, SubjectError

EXPECTED_COLUMNS = [
    "subject", "role", "fold", "image", "label", "n_channels", "shape", "spacing", "origin",
    "direction", "voxels_0", "voxels_1", "voxels_2", "intensity_mean", "intensity_std",
    "intensity_min", "intensity_max", "fg_mean", "fg_std", "fg_p00_5", "fg_p99_5", "zero_fraction",
]


@pytest.fixture(scope="module")
def hippocampus(hippocampus_dir: Path) -> DatasetInfo:
    return read_dataset_json(hippocampus_dir)


@pytest.fixture(scope="module")
def hippocampus_manifest(hippocampus: DatasetInfo) -> tuple[pd.DataFrame, pd.DataFrame]:
    return build_manifest(hippocampus, n_folds=5, seed=0)


# --------------------------------------------------------------------------- folds


def test_assign_folds_is_deterministic_balanced_and_order_independent() -> None:
    ids = [f"case_{i:03d}" for i in range(23)]
    folds = assign_folds(ids, n_folds=5, seed=3)
    assert folds == assign_folds(list(reversed(ids)), n_folds=5, seed=3)
    assert sorted(np.bincount(list(folds.values()))) == [4, 4, 5, 5, 5]
    assert folds != assign_folds(ids, n_folds=5, seed=4)
    with pytest.raises(DatasetError, match="unique"):
        assign_folds(["a", "a", "b"], n_folds=2, seed=0)


def test_fewer_subjects_than_folds_leave_one_out_and_a_single_subject_is_not_held_out() -> None:
    three = assign_folds(["a", "b", "c"], n_folds=5, seed=0)
    assert sorted(three.values()) == [0, 1, 2]
    split = split_fold({**three, "test_1": -1}, three["b"])
    assert split.validation == ["b"] and split.training == ["a", "c"] and split.held_out
    with pytest.raises(ConfigError, match=r"fold 3 has no subjects.*folds \[0, 1, 2\]"):
        split_fold(three, 3)

    one = assign_folds(["only"], n_folds=5, seed=0)
    assert one == {"only": 0}
    alone = split_fold({**one, "test_1": -1}, 0)
    assert alone.training == alone.validation == ["only"] and not alone.held_out


# --------------------------------------------------------------------------- real hippocampus


def test_hippocampus_manifest(hippocampus_dir: Path, hippocampus_manifest: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    manifest, excluded = hippocampus_manifest
    assert list(manifest.columns) == EXPECTED_COLUMNS == manifest_columns({0: "b", 1: "a", 2: "p"})
    assert excluded.empty and list(excluded.columns) == EXCLUDED_COLUMNS
    train = manifest[manifest.role == "train"]
    test = manifest[manifest.role == "test"]
    assert len(train) == 200 and len(test) == 10
    # the archive holds AppleDouble files; none of them became a subject
    assert any((hippocampus_dir / "imagesTr").glob("._*.nii.gz"))
    assert not manifest.subject.str.startswith("._").any()
    # balanced folds, test fold -1
    assert sorted(train.fold.value_counts().to_dict().items()) == [(k, 40) for k in range(5)]
    assert (test.fold == -1).all()
    # labels: every training subject holds all three classes; test rows have none
    for column in ("voxels_0", "voxels_1", "voxels_2"):
        assert (train[column] > 0).all()
        assert test[column].isna().all()
    assert (test.label == "").all() and train.label.str.endswith(".nii.gz").all()
    assert (manifest.n_channels == 1).all()
    first = manifest.set_index("subject").loc["hippocampus_001"]
    assert first["shape"] == [35, 51, 35] and first.spacing == [1.0, 1.0, 1.0]
    assert len(first.direction) == 9 and first.image.endswith("imagesTr/hippocampus_001.nii.gz")
    # voxel counts add up to the volume; statistics are sane
    assert int(first.voxels_0 + first.voxels_1 + first.voxels_2) == 35 * 51 * 35
    assert train.fg_p00_5.le(train.fg_p99_5).all() and train.intensity_std.gt(0).all()
    assert test.fg_mean.isna().all() and test.intensity_mean.notna().all()


def test_hippocampus_manifest_bytes_are_deterministic(
    tmp_path: Path, hippocampus: DatasetInfo, hippocampus_manifest: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    manifest, excluded = hippocampus_manifest
    # a second build from the subjects in reverse order must give the same bytes
    reordered = dataclasses.replace(hippocampus, subjects=tuple(reversed(hippocampus.subjects)))
    again, _ = build_manifest(reordered, n_folds=5, seed=0)
    write_manifest(manifest, tmp_path / "a.csv")
    write_manifest(again, tmp_path / "b.csv")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()

    decoded = read_manifest(tmp_path / "a.csv")
    pd.testing.assert_frame_equal(decoded, manifest)
    assert decoded.loc[0, "spacing"] == [1.0, 1.0, 1.0]
    header, first_row = (tmp_path / "a.csv").read_text().splitlines()[:2]
    assert header == ",".join(EXPECTED_COLUMNS)
    assert '"[1.0, 1.0, 1.0]"' in first_row

    write_excluded(excluded, tmp_path / "excluded.csv")
    assert (tmp_path / "excluded.csv").read_text() == "subject,role,file,reason\n"
    assert not list(tmp_path.glob(".*part*"))  # atomic writes leave no temporaries


# --------------------------------------------------------------------------- faults


def _small_task(source: Path, target: Path, n_train: int, n_test: int = 1) -> tuple[Path, list[str]]:
    """A copy of the first hippocampus subjects with its own dataset.json."""
    full = json.loads((source / "dataset.json").read_text())
    training, test = full["training"][:n_train], full["test"][:n_test]
    for entry in training:
        for key in ("image", "label"):
            (target / entry[key]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / entry[key], target / entry[key])
    for entry in test:
        (target / entry).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / entry, target / entry)
    full.update(training=training, test=test, numTraining=len(training), numTest=len(test))
    (target / "dataset.json").write_text(json.dumps(full, indent=2))
    return target, [Path(e["image"]).name.removesuffix(".nii.gz") for e in training]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _not_nifti(path: Path) -> None:
    path.write_text("this is not an image\n")


def _crop(path: Path) -> None:
    image = sitk.ReadImage(str(path))
    size = list(image.GetSize())
    sitk.WriteImage(sitk.RegionOfInterest(image, [size[0] - 3, *size[1:]], [0, 0, 0]), str(path))


def _shift_origin(path: Path) -> None:
    image = sitk.ReadImage(str(path))
    origin = list(image.GetOrigin())
    image.SetOrigin((origin[0] + 0.5, *origin[1:]))
    sitk.WriteImage(image, str(path))


def _label_seven(path: Path) -> None:
    image = nib.load(str(path))
    data = np.asarray(image.dataobj).copy()
    data[10, 10, 10] = 7
    nib.save(nib.Nifti1Image(data, image.affine, image.header), str(path))


def _nan_voxels(path: Path) -> None:
    image = nib.load(str(path))
    data = np.asarray(image.dataobj, dtype=np.float32).copy()
    data[5:7, 5, 5] = np.nan
    data[8, 8, 8] = np.inf
    header = image.header.copy()
    header.set_data_dtype(np.float32)
    nib.save(nib.Nifti1Image(data, image.affine, header), str(path))


def _delete(path: Path) -> None:
    path.unlink()


# (fault, file it is made in, words the problem must contain)
FAULTS = {
    "truncated": (_truncate, "image", "truncated"),
    "not_nifti": (_not_nifti, "image", "not a readable"),
    "label_shape": (_crop, "label", "shape"),
    "shifted_origin": (_shift_origin, "label", "origin"),
    "label_value_7": (_label_seven, "label", "7 (1 voxels)"),
    "nan": (_nan_voxels, "image", "2 NaN and 1 infinite"),
    "missing": (_delete, "label", "not found"),
}


def _paths(task: Path, subject: str) -> dict[str, Path]:
    return {"image": task / "imagesTr" / f"{subject}.nii.gz", "label": task / "labelsTr" / f"{subject}.nii.gz"}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_invalid_subject_raises_naming_subject_file_and_fix(fault: str, hippocampus_dir: Path, tmp_path: Path) -> None:
    make, which, words = FAULTS[fault]
    task, subjects = _small_task(hippocampus_dir, tmp_path / "task", n_train=3, n_test=0)
    broken = subjects[1]
    make(_paths(task, broken)[which])
    with pytest.raises(SubjectError) as caught:
        build_manifest(read_dataset_json(task), n_folds=2, seed=0)
    error = caught.value
    message = str(error)
    assert error.subject == broken and Path(error.path) == _paths(task, broken)[which]
    assert broken in message and f"{broken}.nii.gz" in message and words in message
    assert "Fix:" in message and "manifest.on_invalid: skip" in message
    if fault == "shifted_origin":  # both geometries are shown
        assert "image origin (" in message and "label origin (" in message and "0.5" in message
    if fault == "label_value_7":
        assert "[0, 1, 2]" in message


def test_skip_drops_invalid_subjects_and_lists_them(hippocampus_dir: Path, tmp_path: Path) -> None:
    task, subjects = _small_task(hippocampus_dir, tmp_path / "task", n_train=len(FAULTS) + 3)
    broken = dict(zip(sorted(FAULTS), subjects))
    for fault, subject in broken.items():
        make, which, _ = FAULTS[fault]
        make(_paths(task, subject)[which])
    manifest, excluded = build_manifest(read_dataset_json(task), n_folds=2, seed=0, on_invalid="skip")

    assert list(excluded.columns) == EXCLUDED_COLUMNS
    assert sorted(excluded.subject) == sorted(broken.values())
    by_subject = excluded.set_index("subject")
    for fault, subject in broken.items():
        _, which, words = FAULTS[fault]
        assert words in by_subject.loc[subject, "reason"]
        assert by_subject.loc[subject, "file"] == str(_paths(task, subject)[which])
        assert by_subject.loc[subject, "role"] == "train"
    kept = sorted(set(subjects) - set(broken.values()))
    assert sorted(manifest[manifest.role == "train"].subject) == kept
    assert sorted(manifest[manifest.role == "train"].fold) == [0, 0, 1]
    assert (manifest.role == "test").sum() == 1

    write_excluded(excluded, tmp_path / "excluded.csv")
    written = pd.read_csv(tmp_path / "excluded.csv", dtype=str)
    assert sorted(written.subject) == sorted(broken.values())


def test_four_dimensional_image_counts_channels(hippocampus_dir: Path, tmp_path: Path) -> None:
    task, subjects = _small_task(hippocampus_dir, tmp_path / "task", n_train=2, n_test=0)
    for subject in subjects:
        path = _paths(task, subject)["image"]
        image = nib.load(str(path))
        data = np.asarray(image.dataobj).astype(np.int16)
        nib.save(nib.Nifti1Image(np.stack([data, data * 2], axis=-1), image.affine), str(path))
        # float label maps (0.0, 1.0, 2.0), as some archives store them, are valid too
        label_path = _paths(task, subject)["label"]
        label = nib.load(str(label_path))
        nib.save(nib.Nifti1Image(np.asarray(label.dataobj).astype(np.float32), label.affine), str(label_path))
    manifest, _ = build_manifest(read_dataset_json(task), n_folds=2, seed=0)
    assert (manifest.n_channels == 2).all()
    assert (manifest.voxels_1 > 0).all() and (manifest.voxels_2 > 0).all()
    first = manifest.iloc[0]
    assert len(first["shape"]) == 3 and len(first.spacing) == 3 and len(first.origin) == 3
    assert len(first.direction) == 9
    source = nib.load(str(hippocampus_dir / "imagesTr" / f"{first.subject}.nii.gz"))
    assert first["shape"] == list(source.shape)
    # statistics are those of the first channel
    assert first.intensity_max == pytest.approx(float(np.asarray(source.dataobj).max()))


def test_a_4d_label_with_one_volume_is_3d_everywhere(hippocampus_dir: Path, tmp_path: Path) -> None:
    """The manifest, the resample step and the metrics read an (x, y, z, 1) label as (x, y, z)."""
    from msdseg.data.resample import resample_subject
    from msdseg.images import label_shape, read_label_volume

    assert label_shape((4, 5, 6, 1)) == (4, 5, 6) and label_shape([4, 5, 6]) == (4, 5, 6)
    assert label_shape((4, 5, 6, 2)) == (4, 5, 6, 2)
    task, subjects = _small_task(hippocampus_dir, tmp_path / "task", n_train=2, n_test=0)
    labels = {}
    for subject in subjects:
        path = _paths(task, subject)["label"]
        label = nib.load(str(path))
        labels[subject] = np.asarray(label.dataobj)
        nib.save(nib.Nifti1Image(labels[subject][..., np.newaxis], label.affine), str(path))
    manifest, _ = build_manifest(read_dataset_json(task), n_folds=2, seed=0)
    assert (manifest.voxels_1 > 0).all()
    paths = _paths(task, subjects[0])
    data, _, _ = read_label_volume(paths["label"])
    np.testing.assert_array_equal(data, labels[subjects[0]])
    plan = {"target_spacing": None, "inplane_size": None, "clip": None, "image_interpolation": "linear"}
    resample_subject(paths["image"], tmp_path / "image.nii.gz", plan, paths["label"], tmp_path / "label.nii.gz")
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "label.nii.gz")).dataobj), labels[subjects[0]])

    two = _paths(task, subjects[1])["label"]
    image = nib.load(str(two))
    nib.save(nib.Nifti1Image(np.concatenate([np.asarray(image.dataobj)] * 2, axis=-1), image.affine), str(two))
    with pytest.raises(SubjectError, match="label"):
        build_manifest(read_dataset_json(task), n_folds=2, seed=0)
    with pytest.raises(SubjectError, match="must be 3D"):
        read_label_volume(two)
    with pytest.raises(DatasetError, match="must be 3D"):
        resample_subject(_paths(task, subjects[1])["image"], tmp_path / "i2.nii.gz", plan, two, tmp_path / "l2.nii.gz")
