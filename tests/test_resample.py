"""msdseg.data.resample on real CT (Task90_LiverCT, 3 mm) and MRI (Task04_Hippocampus)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from helpers import resample_label_to_reference, resample_to_reference, shared_archive
from msdseg import images
from msdseg.data.manifest import build_manifest
from msdseg.data.resample import channels_on_reference, resample_subject, target_geometry
from msdseg.decathlon import DatasetInfo, read_dataset_json
from msdseg.metrics import dice
from msdseg.plan.preprocessing import PLAN_KEYS, make_plan, read_plan, write_plan

LIVER_TASK = "Task90_LiverCT"


@pytest.fixture(scope="module")
def liver_dir(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from msdseg.data.archive import safe_extract

    archive = shared_archive(f"{LIVER_TASK}.tar")
    return safe_extract(archive, tmp_path_factory.mktemp("liver") / LIVER_TASK)


@pytest.fixture(scope="module")
def liver(liver_dir: Path) -> tuple[DatasetInfo, pd.DataFrame]:
    """The liver task and its manifest.

    It has one training subject, too few for two folds, so the manifest is built with a twin
    (the same files under another id) that is dropped afterwards.
    """
    dataset = read_dataset_json(liver_dir)
    assert len(dataset.training) == 1
    twin = dataclasses.replace(dataset.training[0], subject=dataset.training[0].subject + "_twin")
    manifest, _ = build_manifest(dataclasses.replace(dataset, subjects=(*dataset.subjects, twin)), n_folds=2, seed=0)
    return dataset, manifest[manifest.subject != twin.subject].reset_index(drop=True)


def _box_corners(grid: images.Geometry) -> np.ndarray:
    """Physical (mm) corners of the box the voxels cover: voxel centres +- spacing / 2."""
    direction = np.array(grid.direction).reshape(3, 3)
    corners = []
    for i in (-0.5, grid.size[0] - 0.5):
        for j in (-0.5, grid.size[1] - 0.5):
            for k in (-0.5, grid.size[2] - 0.5):
                corners.append(np.array(grid.origin) + direction @ (np.array([i, j, k]) * np.array(grid.spacing)))
    return np.array(corners)


def _liver_plan(liver: tuple[DatasetInfo, pd.DataFrame], **preprocess: Any) -> dict[str, Any]:
    dataset, manifest = liver
    return make_plan(manifest, dataset, preprocess, LIVER_TASK)


PLANS = {
    "iso_1.5mm": {"spacing": [1.5, 1.5, 1.5]},
    "inplane_256": {"spacing": None, "inplane_size": [256, 256], "image_interpolation": "bspline",
                    "clip": [-1000, 1000]},
}
EXPECTED_SIZE = {"iso_1.5mm": (244, 202, 60), "inplane_256": (256, 256, 30)}


@pytest.fixture(scope="module", params=sorted(PLANS))
def resampled_liver(request: pytest.FixtureRequest, liver, tmp_path_factory) -> dict[str, Any]:
    dataset, _ = liver
    subject = dataset.training[0]
    plan = _liver_plan(liver, **PLANS[request.param])
    out = tmp_path_factory.mktemp(request.param)
    resample_subject(subject.image, out / "image.nii.gz", plan, subject.label, out / "label.nii.gz")
    return {"name": request.param, "plan": plan, "subject": subject, "image": out / "image.nii.gz",
            "label": out / "label.nii.gz"}


def test_resampled_liver_keeps_physical_geometry_labels_and_volume(resampled_liver: dict[str, Any]) -> None:
    subject = resampled_liver["subject"]
    original, original_label = images.read_image(subject.image), images.read_image(subject.label)
    image, label = images.read_image(resampled_liver["image"]), images.read_image(resampled_liver["label"])
    old, new = images.spatial_geometry(original), images.spatial_geometry(image)

    assert new.size == EXPECTED_SIZE[resampled_liver["name"]]
    assert new == images.spatial_geometry(label) == target_geometry(old, resampled_liver["plan"])
    assert new.direction == old.direction
    if resampled_liver["name"] == "inplane_256":
        assert new.spacing[2] == old.spacing[2] == 3.0
        assert new.spacing[0] == pytest.approx(122 * 3.0 / 256)
    # the voxel boxes agree to within half a new voxel along every grid axis
    direction = np.array(old.direction).reshape(3, 3)
    offsets = np.abs((_box_corners(new) - _box_corners(old)) @ direction)  # per index axis
    assert (offsets <= np.array(new.spacing) / 2 + 1e-6).all(), offsets.max(axis=0)

    assert image.GetPixelID() == sitk.sitkFloat32 and label.GetPixelID() == sitk.sitkUInt8
    labels_new, labels_old = images.to_xyz(label), images.to_xyz(original_label)
    assert set(np.unique(labels_new).tolist()) == {0, 1}
    volume_old = np.count_nonzero(labels_old == 1) * np.prod(old.spacing) / 1000
    volume_new = np.count_nonzero(labels_new == 1) * np.prod(new.spacing) / 1000
    assert volume_new == pytest.approx(volume_old, rel=0.02)
    assert volume_old > 500  # a liver, in mL

    values = images.to_xyz(image)
    clip = resampled_liver["plan"]["clip"]
    if clip is not None:
        assert clip[0] <= values.min() and values.max() <= clip[1]
    # liver intensity survives (a liver is ~40-60 HU)
    original_values = images.to_xyz(original).astype(np.float64)
    assert values[labels_new == 1].mean() == pytest.approx(original_values[labels_old == 1].mean(), abs=5)


def test_round_trip_to_the_original_grid(resampled_liver: dict[str, Any], tmp_path: Path) -> None:
    subject = resampled_liver["subject"]
    original = images.read_image(subject.image)
    original_label = images.to_xyz(images.read_image(subject.label))
    source = images.read_image(resampled_liver["image"])
    resampled_label = images.to_xyz(images.read_image(resampled_liver["label"]))

    one_hot = np.stack([(resampled_label == k).astype(np.float32) for k in range(3)])
    back = resample_to_reference(one_hot, source, original)
    assert back.shape == (3, *original_label.shape) and back.dtype == np.float32
    assert np.allclose(back.sum(axis=0), 1.0, atol=1e-5)
    prediction = back.argmax(axis=0).astype(np.uint8)
    assert dice(prediction, original_label, 1) > 0.95
    # header readers give the grids as well as images (what inference passes)
    from_headers = resample_to_reference(
        one_hot, images.read_image_header(resampled_liver["image"]), images.read_image_header(subject.image)
    )
    np.testing.assert_array_equal(from_headers, back)

    nearest = resample_label_to_reference(resampled_label, source, original)
    assert nearest.dtype == np.uint8 and nearest.shape == original_label.shape
    assert dice(nearest, original_label, 1) > 0.95

    # written on the reference, the prediction has exactly the original shape and affine
    images.write_image(images.image_from_xyz(prediction, original), tmp_path / "prediction.nii.gz")
    written, reference = nib.load(str(tmp_path / "prediction.nii.gz")), nib.load(str(subject.image))
    assert written.shape == reference.shape
    np.testing.assert_allclose(written.affine, reference.affine, atol=1e-4)


def test_channels_on_the_same_grid_pass_through_uncopied(resampled_liver: dict[str, Any]) -> None:
    """No resampling happened (the grids agree): the channels are the input's own memory."""
    from msdseg.infer.predict import labels_in_reference_geometry

    source = images.read_image_header(resampled_liver["image"])
    size = images.spatial_geometry(source).size
    probabilities = np.random.default_rng(0).random((3, *size), dtype=np.float32)
    channels = [np.shares_memory(channel, probabilities)
                for channel in channels_on_reference(probabilities, source, source)]
    assert channels == [True, True, True]
    labels = labels_in_reference_geometry(probabilities, source, source)
    np.testing.assert_array_equal(labels, probabilities.argmax(axis=0))


def test_untransposed_resampling_source_matches_the_plain_image() -> None:
    """The copy-saving source image (axes reversed with their geometry) resamples identically."""
    from msdseg.data.resample import _resample, _resampling_source

    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, -1.0]])
    source = images.Geometry((17, 12, 9), (0.8, 1.1, 2.5), (-30.0, 12.5, 7.0), tuple(rotation.ravel()))
    reference = images.Geometry((23, 15, 20), (0.6, 0.9, 1.0), (-29.0, 13.0, -12.0), tuple(np.eye(3).ravel()))
    array = np.random.default_rng(0).random(source.size, dtype=np.float32)
    plain = images.to_xyz(_resample(images.image_on_grid(array, source), reference, sitk.sitkLinear, sitk.sitkFloat32))
    lean = images.to_xyz(_resample(_resampling_source(array, source), reference, sitk.sitkLinear, sitk.sitkFloat32))
    assert plain.std() > 0.1  # the reference grid overlaps the source: real values, not padding
    np.testing.assert_allclose(lean, plain, atol=1e-5)


def test_four_dimensional_image_is_resampled_per_channel(liver, tmp_path: Path) -> None:
    import torchio as tio

    dataset, _ = liver
    subject = dataset.training[0]
    original = nib.load(str(subject.image))
    data = np.asarray(original.dataobj).astype(np.float32)
    nib.save(nib.Nifti1Image(np.stack([data, 2 * data], axis=-1), original.affine), str(tmp_path / "two.nii.gz"))
    plan = _liver_plan(liver, spacing=[6.0, 6.0, 6.0])
    resample_subject(tmp_path / "two.nii.gz", tmp_path / "out.nii.gz", plan, subject.label, tmp_path / "label.nii.gz")

    out = images.read_image(tmp_path / "out.nii.gz")
    expected = target_geometry(images.spatial_geometry(images.read_image(subject.image)), plan)
    assert out.GetDimension() == 4 and tuple(out.GetSize()) == (*expected.size, 2)
    assert images.spatial_geometry(out) == images.spatial_geometry(images.read_image(tmp_path / "label.nii.gz"))
    np.testing.assert_allclose(images.spatial_geometry(out).origin, expected.origin, atol=1e-4)
    assert images.spatial_geometry(out).direction == expected.direction
    tensor = tio.ScalarImage(tmp_path / "out.nii.gz").data
    assert tuple(tensor.shape) == (2, *expected.size)
    np.testing.assert_allclose(tensor[1].numpy(), 2 * tensor[0].numpy(), rtol=1e-5, atol=1e-3)


def test_ct_plan_from_the_liver_foreground(liver, tmp_path: Path) -> None:
    dataset, manifest = liver
    plan = _liver_plan(liver)
    assert set(plan) == set(PLAN_KEYS)
    assert plan["normalization"] == "ct" and plan["modality"] == {"0": "CT"}
    assert plan["labels"] == {"0": "background", "1": "liver", "2": "cancer"}
    assert plan["target_spacing"] == [3.0, 3.0, 3.0] and plan["n_channels"] == 1
    # computed independently from the raw voxels (nibabel)
    subject = dataset.training[0]
    image = np.asarray(nib.load(str(subject.image)).dataobj).astype(np.float64)
    inside = image[np.asarray(nib.load(str(subject.label)).dataobj) > 0]
    assert plan["ct_mean"] == pytest.approx(inside.mean())
    assert plan["ct_std"] == pytest.approx(inside.std())
    assert plan["ct_window"] == pytest.approx(np.percentile(inside, [0.5, 99.5]).tolist())
    assert _liver_plan(liver, ct_window=[-100, 200])["ct_window"] == [-100.0, 200.0]
    zscore = _liver_plan(liver, normalization="zscore")
    assert zscore["ct_window"] is zscore["ct_mean"] is zscore["ct_std"] is None

    write_plan(plan, tmp_path / "plan.json")
    text = (tmp_path / "plan.json").read_text()
    assert list(json.loads(text)) == sorted(PLAN_KEYS)
    assert read_plan(tmp_path / "plan.json") == plan


def test_median_spacing_plan_on_hippocampus(hippocampus_dir: Path, tmp_path: Path) -> None:
    full = read_dataset_json(hippocampus_dir)
    dataset = dataclasses.replace(full, subjects=(*full.training[:20], *full.test[:2]))
    manifest, _ = build_manifest(dataset, n_folds=5, seed=0)
    plan = make_plan(manifest, dataset, {}, "Task04_Hippocampus")

    spacings = []
    for subject in dataset.training:
        spacings.append(images.spatial_geometry(images.read_image_header(subject.image)).spacing)
    assert plan["target_spacing"] == np.median(np.array(spacings), axis=0).tolist() == [1.0, 1.0, 1.0]
    assert plan["normalization"] == "zscore" and plan["modality"] == {"0": "MRI"}
    assert plan["ct_window"] is plan["ct_mean"] is plan["ct_std"] is plan["clip"] is None
    assert plan["inplane_size"] is None and plan["image_interpolation"] == "linear"

    # per-axis median of an anisotropic set (nnU-Net's target): x, y and z independently
    anisotropic = manifest.copy()
    training = anisotropic.index[anisotropic.role == "train"]
    anisotropic.loc[training, "spacing"] = pd.Series(
        [[0.8 + 0.01 * i, 0.7, 2.5 + 0.5 * (i % 3)] for i in range(len(training))], index=training, dtype=object
    )
    median = make_plan(anisotropic, dataset, {}, "Task04_Hippocampus")["target_spacing"]
    assert median == pytest.approx([0.8 + 0.01 * 9.5, 0.7, 3.0])

    # the plan's grid is the identity here: resampling changes neither grid nor voxels
    write_plan(plan, tmp_path / "a.json")
    write_plan(read_plan(tmp_path / "a.json"), tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    subject = dataset.training[0]
    resample_subject(subject.image, tmp_path / "i.nii.gz", plan, subject.label, tmp_path / "l.nii.gz")
    original = images.read_image(subject.image)
    assert images.spatial_geometry(images.read_image(tmp_path / "i.nii.gz")) == images.spatial_geometry(original)
    written = images.to_xyz(images.read_image(tmp_path / "i.nii.gz"))
    np.testing.assert_allclose(written, images.to_xyz(original), atol=1e-4)
    np.testing.assert_array_equal(images.to_xyz(images.read_image(tmp_path / "l.nii.gz")),
                                  images.to_xyz(images.read_image(subject.label)))
