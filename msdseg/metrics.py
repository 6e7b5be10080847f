"""Segmentation metrics: the only place a Dice is computed (training validation uses it too).

Conventions for empty structures (MONAI ``compute_hausdorff_distance`` /
``compute_surface_dice`` and nnU-Net's Dice), per foreground label:

======================  =======  ==========  ======
case                    Dice     HD95 (mm)   NSD
======================  =======  ==========  ======
both empty              NaN      NaN         NaN
only one empty          0        inf         0
both present            ...      ...         ...
======================  =======  ==========  ======

"Both empty" has nothing to score, so it is NaN and drops out of means (``dice_summary`` counts
only non-NaN values). "One empty" is a complete miss or a pure false positive: Dice and NSD are
0, and the distance to a surface that does not exist is infinite (a finite stand-in such as the
image diagonal would make the number depend on the field of view).

Surfaces are the voxels of a mask that touch the background through a face (the mask minus its
erosion with the 6-neighbourhood; voxels on the image border count as surface). Distances are
between voxel centres in millimetres (Euclidean distance transform with the voxel spacing), so
anisotropic voxels are handled. The Hausdorff distance at percentile p is MONAI's: the larger of
the two directed p-th percentiles (prediction -> reference and reference -> prediction). The
normalised surface Dice is MONAI's voxel version: the fraction of both surfaces' voxels that lie
within the tolerance of the other surface. Both give MONAI's numbers (1.6, checked in
tests/test_metrics.py when MONAI is installed); distances are computed on the bounding box of
the two masks only, which is exact and keeps liver-sized volumes cheap.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from msdseg.decathlon import foreground_labels, subject_id
from msdseg.errors import SubjectError
from msdseg.images import read_label_volume


def dice_from_counts(true_positives: int, false_positives: int, false_negatives: int) -> float:
    """2 TP / (2 TP + FP + FN); NaN when the label is in neither map (nnU-Net's convention: nothing to score)."""
    denominator = 2 * int(true_positives) + int(false_positives) + int(false_negatives)
    if denominator == 0:
        return float("nan")
    return 2.0 * int(true_positives) / denominator


def dice(prediction: np.ndarray, reference: np.ndarray, label: int) -> float:
    """Dice of one label. NaN when both are empty."""
    pred = prediction == label
    ref = reference == label
    overlap = int(np.logical_and(pred, ref).sum())
    return dice_from_counts(overlap, int(pred.sum()) - overlap, int(ref.sum()) - overlap)


def dice_per_label(prediction: np.ndarray, reference: np.ndarray, labels: Iterable[int]) -> dict[int, float]:
    """Dice for each label in ``labels`` (usually the foreground labels of dataset.json)."""
    return {int(label): dice(prediction, reference, int(label)) for label in labels}


# --------------------------------------------------------------------------- surface distances

_SURFACE_STRUCTURE = {n: ndimage.generate_binary_structure(n, 1) for n in (2, 3)}


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels: the mask minus its 6-connected erosion (border voxels are boundary)."""
    structure = _SURFACE_STRUCTURE.get(mask.ndim)
    if structure is None:
        structure = ndimage.generate_binary_structure(mask.ndim, 1)
    eroded = ndimage.binary_erosion(mask, structure=structure, border_value=0)
    return mask & ~eroded


def _crop_to_union(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union (plus one voxel).

    Exact for surface distances: every surface voxel of either mask lies inside the box, so the
    nearest one is found in the crop too. Keeps the distance transforms of a liver-sized volume
    small.
    """
    union = pred | ref
    slices = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        present = np.flatnonzero(union.any(axis=other))
        lo = max(int(present[0]) - 1, 0)
        hi = min(int(present[-1]) + 2, union.shape[axis])
        slices.append(slice(lo, hi))
    box = tuple(slices)
    return pred[box], ref[box]


def _directed_distances(
    from_surface: np.ndarray, to_surface: np.ndarray, spacing: Sequence[float]
) -> np.ndarray:
    """Distance (mm) from each voxel of ``from_surface`` to the nearest voxel of ``to_surface``."""
    distance_map = ndimage.distance_transform_edt(~to_surface, sampling=spacing)
    return np.asarray(distance_map[from_surface], dtype=np.float64)


def _masks(prediction: np.ndarray, reference: np.ndarray, label: int) -> tuple[np.ndarray, np.ndarray]:
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction shape {prediction.shape} != reference shape {reference.shape}")
    return prediction == label, reference == label


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    values = tuple(float(s) for s in spacing)
    if len(values) != ndim:
        raise ValueError(f"spacing {values} has {len(values)} entries for a {ndim}D array")
    return values


def _surface_distances(
    prediction: np.ndarray, reference: np.ndarray, label: int, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray] | float:
    """Both directed distance sets, or the metric value of an empty case (NaN / inf)."""
    pred, ref = _masks(prediction, reference, label)
    sampling = _check_spacing(spacing, pred.ndim)
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return float("nan")
    if not has_pred or not has_ref:
        return float("inf")
    pred, ref = _crop_to_union(pred, ref)
    pred_surface, ref_surface = _surface(pred), _surface(ref)
    return (
        _directed_distances(pred_surface, ref_surface, sampling),
        _directed_distances(ref_surface, pred_surface, sampling),
    )


def hausdorff95(
    prediction: np.ndarray,
    reference: np.ndarray,
    label: int,
    spacing: Sequence[float],
    percentile: float = 95.0,
) -> float:
    """Percentile Hausdorff distance in mm (``evaluate.hausdorff_percentile``; 100 = Hausdorff).

    NaN when both masks are empty, inf when only one is (see the module docstring).
    """
    distances = _surface_distances(prediction, reference, label, spacing)
    if isinstance(distances, float):
        return distances
    pred_to_ref, ref_to_pred = distances
    return float(max(np.percentile(pred_to_ref, percentile), np.percentile(ref_to_pred, percentile)))


def normalized_surface_dice(
    prediction: np.ndarray,
    reference: np.ndarray,
    label: int,
    spacing: Sequence[float],
    tolerance_mm: float,
) -> float:
    """Normalised surface Dice at ``tolerance_mm``: boundary agreement that forgives small shifts.

    NaN when both masks are empty, 0 when only one is.
    """
    distances = _surface_distances(prediction, reference, label, spacing)
    if isinstance(distances, float):
        return float("nan") if np.isnan(distances) else 0.0
    pred_to_ref, ref_to_pred = distances
    within = int((pred_to_ref <= tolerance_mm).sum()) + int((ref_to_pred <= tolerance_mm).sum())
    return within / (pred_to_ref.size + ref_to_pred.size)


def volume_ml(segmentation: np.ndarray, label: int, spacing: Sequence[float]) -> float:
    """Volume of one label in millilitres (voxel count x voxel volume in mm^3 / 1000)."""
    voxel_mm3 = float(np.prod([float(s) for s in spacing]))
    return int(np.count_nonzero(segmentation == label)) * voxel_mm3 / 1000.0


# --------------------------------------------------------------------------- one subject

METRIC_COLUMNS = [
    "subject",
    "label",
    "class_name",
    "dice",
    "hd95_mm",
    "nsd",
    "volume_ref_ml",
    "volume_pred_ml",
]


def evaluate_subject(
    pred_path: str | os.PathLike[str],
    ref_path: str | os.PathLike[str],
    labels: Mapping[Any, str],
    nsd_tolerance_mm: float = 1.0,
    hausdorff_percentile: float = 95.0,
    affine_tolerance: float = 1e-3,
) -> list[dict[str, Any]]:
    """One row per foreground class (``METRIC_COLUMNS``) for a prediction in original geometry.

    Metrics are computed against the original label, not the resampled one, so the numbers are
    those a user of the original images would measure. Shapes and affines must match: a
    prediction written on another grid would otherwise be scored voxel-against-wrong-voxel.
    """
    subject = subject_id(ref_path)
    prediction, pred_affine, _ = read_label_volume(pred_path)
    reference, ref_affine, spacing = read_label_volume(ref_path)
    if prediction.shape != reference.shape:
        raise SubjectError(
            subject,
            str(pred_path),
            f"shape {prediction.shape} differs from the reference {ref_path} {reference.shape}; "
            "predictions must be written in the original geometry (rerun the infer rule).",
        )
    if not np.allclose(pred_affine, ref_affine, rtol=0.0, atol=affine_tolerance):
        raise SubjectError(
            subject,
            str(pred_path),
            f"affine differs from the reference {ref_path} by up to "
            f"{np.abs(pred_affine - ref_affine).max():.4g} (tolerance {affine_tolerance}); "
            "predictions must be written in the original geometry (rerun the infer rule).",
        )
    rows = []
    for key, name in foreground_labels(labels).items():
        rows.append(
            {
                "subject": subject,
                "label": key,
                "class_name": name,
                "dice": dice(prediction, reference, key),
                "hd95_mm": hausdorff95(prediction, reference, key, spacing, hausdorff_percentile),
                "nsd": normalized_surface_dice(prediction, reference, key, spacing, nsd_tolerance_mm),
                "volume_ref_ml": volume_ml(reference, key, spacing),
                "volume_pred_ml": volume_ml(prediction, key, spacing),
            }
        )
    return rows
