"""Metrics on small masks whose answers are known by hand or by brute force."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from msdseg.errors import SubjectError
from msdseg.metrics import (
    METRIC_COLUMNS,
    dice,
    dice_per_label,
    evaluate_subject,
    hausdorff95,
    normalized_surface_dice,
    volume_ml,
)


def _cube(shape=(16, 16, 16), lo=(2, 2, 2), size=(6, 6, 6), label=1) -> np.ndarray:
    volume = np.zeros(shape, dtype=np.uint8)
    volume[tuple(slice(a, a + s) for a, s in zip(lo, size))] = label
    return volume


def _brute_force_percentile_hd(a: np.ndarray, b: np.ndarray, spacing, percentile) -> float:
    """Pairwise distances between boundary voxels: the definition, without distance transforms."""
    structure = ndimage.generate_binary_structure(3, 1)

    def surface(mask):
        return np.argwhere(mask & ~ndimage.binary_erosion(mask, structure, border_value=0)) * np.asarray(spacing)

    sa, sb = surface(a > 0), surface(b > 0)
    pairwise = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1))
    return max(np.percentile(pairwise.min(1), percentile), np.percentile(pairwise.min(0), percentile))


def test_dice_of_two_cubes_with_known_overlap():
    a = _cube(lo=(2, 2, 2))
    b = _cube(lo=(4, 2, 2))  # shifted by 2 of 6 along x: overlap 4*6*6
    assert dice(a, b, 1) == pytest.approx(2 * 144 / (216 + 216))
    assert dice_per_label(a, b, [1]) == {1: pytest.approx(2 / 3)}


def test_prediction_against_itself_is_perfect():
    a = _cube() + _cube(lo=(9, 9, 9), size=(3, 4, 5), label=2)
    for label in (1, 2):
        assert dice(a, a, label) == 1.0
        assert hausdorff95(a, a, label, (1.0, 1.0, 1.0)) == 0.0
        assert normalized_surface_dice(a, a, label, (0.7, 1.0, 2.5), 0.0) == 1.0


def test_empty_cases_follow_the_documented_conventions():
    empty = np.zeros((8, 8, 8), dtype=np.uint8)
    full = _cube(shape=(8, 8, 8), lo=(2, 2, 2), size=(3, 3, 3))
    spacing = (1.0, 1.0, 1.0)
    # both empty: nothing to score
    assert math.isnan(dice(empty, empty, 1))
    assert math.isnan(hausdorff95(empty, empty, 1, spacing))
    assert math.isnan(normalized_surface_dice(empty, empty, 1, spacing, 1.0))
    # one empty (missed structure, or a false positive): Dice/NSD 0, distance inf
    for pred, ref in ((empty, full), (full, empty)):
        assert dice(pred, ref, 1) == 0.0
        assert hausdorff95(pred, ref, 1, spacing) == math.inf
        assert normalized_surface_dice(pred, ref, 1, spacing, 1.0) == 0.0


def test_parallel_plates_have_exact_distance_and_nsd_threshold():
    a = np.zeros((12, 10, 10), dtype=np.uint8)
    b = np.zeros_like(a)
    a[2] = 1
    b[5] = 1  # every surface voxel is exactly 3 voxels away along x
    spacing = (1.5, 0.8, 2.0)
    assert hausdorff95(a, b, 1, spacing) == pytest.approx(4.5)
    assert normalized_surface_dice(a, b, 1, spacing, tolerance_mm=4.4) == 0.0
    assert normalized_surface_dice(a, b, 1, spacing, tolerance_mm=4.5) == 1.0
    assert dice(a, b, 1) == 0.0


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.7, 1.2, 3.0)])
def test_shifted_cubes_hausdorff_matches_definition(spacing):
    a = _cube(shape=(20, 14, 14), lo=(3, 3, 3), size=(8, 7, 6))
    b = _cube(shape=(20, 14, 14), lo=(6, 4, 3), size=(8, 7, 6))  # shift (3, 1, 0) voxels
    # the full Hausdorff distance of a translated box is the translation length
    expected_max = math.hypot(3 * spacing[0], 1 * spacing[1])
    assert hausdorff95(a, b, 1, spacing, percentile=100) == pytest.approx(expected_max)
    for percentile in (95, 50):
        assert hausdorff95(a, b, 1, spacing, percentile) == pytest.approx(
            _brute_force_percentile_hd(a, b, spacing, percentile)
        )


def test_nsd_counts_surface_voxels_within_tolerance():
    a = _cube(shape=(20, 14, 14), lo=(3, 3, 3), size=(8, 7, 6))
    b = _cube(shape=(20, 14, 14), lo=(4, 3, 3), size=(8, 7, 6))  # shift 1 voxel along x
    assert normalized_surface_dice(a, b, 1, (1.0, 1.0, 1.0), 1.0) == 1.0
    partial = normalized_surface_dice(a, b, 1, (1.0, 1.0, 1.0), 0.0)
    assert 0.0 < partial < 1.0


def test_volume_in_millilitres():
    a = _cube(size=(10, 10, 10))
    assert volume_ml(a, 1, (1.0, 1.0, 1.0)) == pytest.approx(1.0)
    assert volume_ml(a, 1, (2.0, 0.5, 3.0)) == pytest.approx(3.0)
    assert volume_ml(a, 2, (1.0, 1.0, 1.0)) == 0.0


def _save(path, data, affine):
    nib.save(nib.Nifti1Image(data.astype(np.uint8), affine), str(path))
    return path


def test_evaluate_subject_rows(tmp_path):
    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    affine[:3, 3] = [-10.0, 4.0, 30.0]
    ref = _cube(shape=(16, 16, 12), lo=(2, 2, 2), size=(6, 6, 6)) + _cube(
        shape=(16, 16, 12), lo=(10, 10, 2), size=(4, 4, 4), label=2
    )
    pred = ref.copy()
    pred[ref == 2] = 0  # class 2 missed completely
    (tmp_path / "ref").mkdir()
    ref_path = _save(tmp_path / "ref" / "case_007.nii.gz", ref, affine)
    pred_path = _save(tmp_path / "case_007.nii.gz", pred, affine)
    rows = evaluate_subject(pred_path, ref_path, {"0": "background", "1": "A", "2": "B", "3": "C"}, 1.0, 95)
    assert [list(r) for r in rows] == [METRIC_COLUMNS] * 3
    by_label = {r["label"]: r for r in rows}
    assert by_label[1]["subject"] == "case_007" and by_label[1]["class_name"] == "A"
    assert by_label[1]["dice"] == 1.0 and by_label[1]["hd95_mm"] == 0.0 and by_label[1]["nsd"] == 1.0
    assert by_label[1]["volume_ref_ml"] == pytest.approx(216 * 3.0 / 1000)
    assert by_label[2]["dice"] == 0.0 and by_label[2]["hd95_mm"] == math.inf and by_label[2]["nsd"] == 0.0
    assert by_label[2]["volume_pred_ml"] == 0.0
    assert math.isnan(by_label[3]["dice"]) and math.isnan(by_label[3]["hd95_mm"])


def test_evaluate_subject_rejects_other_geometry(tmp_path):
    data = _cube(shape=(10, 10, 10))
    ref_path = _save(tmp_path / "ref.nii.gz", data, np.eye(4))
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    pred_path = _save(tmp_path / "pred.nii.gz", data, shifted)
    with pytest.raises(SubjectError, match="affine.*ref.nii.gz"):
        evaluate_subject(pred_path, ref_path, {0: "bg", 1: "fg"})
    other_shape = _save(tmp_path / "pred2.nii.gz", data[:9], np.eye(4))
    with pytest.raises(SubjectError, match="shape.*ref.nii.gz"):
        evaluate_subject(other_shape, ref_path, {0: "bg", 1: "fg"})


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_matches_monai_when_installed():
    """Same numbers as MONAI's compute_hausdorff_distance / compute_surface_dice (benchmark installs it)."""
    monai_metrics = pytest.importorskip("monai.metrics", reason="MONAI is installed only for the benchmarks")
    import torch

    rng = np.random.default_rng(1)
    ref = ndimage.binary_dilation(rng.random((18, 16, 14)) > 0.97, iterations=2).astype(np.int64)
    pred = ndimage.binary_dilation(rng.random((18, 16, 14)) > 0.97, iterations=2).astype(np.int64)
    spacing = (0.8, 1.2, 2.0)

    def onehot(a):
        return torch.nn.functional.one_hot(torch.as_tensor(a), 2).permute(3, 0, 1, 2)[None]

    hd = monai_metrics.compute_hausdorff_distance(onehot(pred), onehot(ref), percentile=95, spacing=spacing)
    nsd = monai_metrics.compute_surface_dice(onehot(pred), onehot(ref), [1.5], spacing=spacing)
    assert hausdorff95(pred, ref, 1, spacing) == pytest.approx(float(hd[0, 0]), rel=1e-5)
    assert normalized_surface_dice(pred, ref, 1, spacing, 1.5) == pytest.approx(float(nsd[0, 0]), rel=1e-5)
