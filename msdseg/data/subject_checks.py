"""Checks of one subject's files (readable, geometry, label values, NaN/inf) and their statistics, for the manifest."""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk

from msdseg import images
from msdseg.decathlon import SubjectFiles

_SKIP_HINT = "or set manifest.on_invalid: skip to drop the subject and list it in excluded.csv"


_SLAB_VOXELS = 4_000_000  # voxels scanned at once: bounds the temporaries of a large CT


_MAX_LISTED = 20  # label values shown in a message


class _Invalid(Exception):
    """One subject failed a check: which file, what is wrong, how to fix it (without the skip hint)."""

    def __init__(self, path: str, problem: str, fix: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem
        self.fix = fix


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"


def _describe(geometry: images.Geometry) -> str:
    return (
        f"origin {_fmt(geometry.origin)}, spacing {_fmt(geometry.spacing)}, "
        f"direction {_fmt(geometry.direction)}"
    )


def _open(path: str, what: str) -> tuple[sitk.ImageFileReader, images.NiftiScan]:
    """Header and non-finite counts of an existing, complete image, or _Invalid saying what it is not.

    NaN/inf come from the raw file (:func:`msdseg.images.scan_nifti`): SimpleITK reads them as 0.
    """
    if not os.path.isfile(path):
        raise _Invalid(
            path,
            f"{what} file not found (listed in dataset.json)",
            "restore the file (extract the archive again) or remove the subject from dataset.json",
        )
    try:
        header = images.read_image_header(path)
        if header.GetDimension() not in (3, 4):
            raise _Invalid(
                path,
                f"{what} is {header.GetDimension()}D (size {tuple(header.GetSize())}); "
                "expected a 3D volume or a 4D (x, y, z, channel) NIfTI",
                "replace the file with a 3D/4D NIfTI or remove the subject from dataset.json",
            )
        scan = images.scan_nifti(path)
    except OSError as error:
        raise _Invalid(
            path,
            f"{what} is not a readable, complete NIfTI image ({error})",
            "replace the file (extract the archive again; a truncated download looks like this) "
            "or remove the subject from dataset.json",
        ) from None
    return header, scan


def _read(path: str, what: str) -> sitk.Image:
    try:
        return images.read_image(path)
    except OSError as error:
        raise _Invalid(
            path,
            f"{what} is not a readable NIfTI image ({error})",
            "replace the file or remove the subject from dataset.json",
        ) from None


def _nonfinite(path: str, n_nan: int, n_inf: int) -> _Invalid:
    return _Invalid(
        path,
        f"image has {n_nan} NaN and {n_inf} infinite voxel(s)",
        "replace the non-finite voxels (e.g. with the background value) or the file",
    )


def _clean(values: Sequence[float]) -> list[float]:
    """Floats with -0.0 written as 0.0 (NIfTI headers often hold signed zeros in the direction)."""
    return [float(v) + 0.0 for v in values]


def _slabs(depth: int, plane_voxels: int) -> Iterator[slice]:
    step = max(1, _SLAB_VOXELS // max(plane_voxels, 1))
    for start in range(0, depth, step):
        yield slice(start, min(start + step, depth))


def _geometry_mismatch(image: images.Geometry, label: images.Geometry, tolerance: float) -> str | None:
    """Which of origin/spacing/direction differ by more than ``tolerance`` (None if none)."""
    differing = [
        f"{name} by up to {difference:.4g}"
        for name in ("origin", "spacing", "direction")
        if (difference := float(np.max(np.abs(np.subtract(getattr(image, name), getattr(label, name)))))) > tolerance
    ]
    return ", ".join(differing) if differing else None


class _Moments:
    """Count, mean, M2, min, max merged slab by slab (Chan et al.), in float64."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.low = math.inf
        self.high = -math.inf

    def add(self, values: np.ndarray) -> None:
        n = int(values.size)
        if n == 0:
            return
        centred = values.astype(np.float64).reshape(-1)  # one float64 copy of the slab, then in place
        mean = float(centred.mean())
        centred -= mean
        m2 = float(np.square(centred, out=centred).sum())  # pairwise sum: same bits on any machine
        del centred
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total
        self.low = min(self.low, float(values.min()))
        self.high = max(self.high, float(values.max()))

    def stats(self) -> tuple[float, float, float, float]:
        if self.count == 0:
            return (math.nan,) * 4
        return self.mean, math.sqrt(self.m2 / self.count), self.low, self.high


def _is_integral(value: float) -> bool:
    return float(value).is_integer()


def _label_value_counts(slab: np.ndarray) -> Counter:
    """Voxel count per value of one label slab (bincount for small non-negative integers)."""
    flat = slab.reshape(-1)
    if flat.size == 0:
        return Counter()
    if np.issubdtype(flat.dtype, np.integer):
        low, high = int(flat.min()), int(flat.max())
        if low >= 0 and high < 65536:
            counts = np.bincount(flat, minlength=high + 1)
            return Counter({value: int(n) for value, n in enumerate(counts) if n})
    values, counts = np.unique(flat, return_counts=True)
    return Counter(
        {(int(v) if _is_integral(v) else float(v)): int(n) for v, n in zip(values.tolist(), counts.tolist())}
    )


def _label_array(label: sitk.Image) -> np.ndarray:
    """(x, y, z) view of a label map; a 4D label with one volume counts as 3D."""
    if label.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"a label map must have one value per voxel, got {label.GetNumberOfComponentsPerPixel()}")
    array = images.xyz_view(label)
    array = array.reshape(images.label_shape(array.shape))
    if array.ndim != 3:
        raise ValueError(f"a label map must be 3D, got size {tuple(label.GetSize())}")
    return array


def _inspect(files: SubjectFiles, labels: Mapping[int, str], tolerance: float) -> dict[str, Any]:
    """One manifest row for a subject, or _Invalid for its first problem (headers first: cheap)."""
    image_path = str(files.image)
    label_path = "" if files.label is None else str(files.label)
    image_header, image_scan = _open(image_path, "image")
    image_geometry = images.spatial_geometry(image_header)
    if image_scan.n_nan or image_scan.n_inf:
        raise _nonfinite(image_path, image_scan.n_nan, image_scan.n_inf)
    if files.label is not None:
        _check_label_header(label_path, image_path, image_geometry, tolerance)
    stats, value_counts = _scan_voxels(image_path, label_path if files.label is not None else None,
                                       labels, image_geometry.size)
    row: dict[str, Any] = {
        "subject": files.subject,
        "role": files.role,
        "fold": -1,
        "image": image_path,
        "label": label_path,
        "n_channels": images.channel_count(image_header),
        "shape": list(image_geometry.size),
        "spacing": _clean(image_geometry.spacing),
        "origin": _clean(image_geometry.origin),
        "direction": _clean(image_geometry.direction),
        **stats,
    }
    for key in labels:
        row[f"voxels_{key}"] = int(value_counts.get(key, 0)) if files.label is not None else pd.NA
    return row


def _check_label_header(label_path: str, image_path: str, image_geometry: images.Geometry, tolerance: float) -> None:
    """The label's header against the image's: finite values, the same grid (within the tolerance)."""
    label_header, label_scan = _open(label_path, "label")
    if label_scan.n_nan or label_scan.n_inf:
        raise _Invalid(
            label_path,
            f"label has {label_scan.n_nan} NaN and {label_scan.n_inf} infinite voxel(s)",
            "relabel the file with the dataset.json label values",
        )
    label_size = images.label_shape(label_header.GetSize())
    if label_size != image_geometry.size:
        raise _Invalid(
            label_path,
            f"label shape {label_size} differs from the image shape {image_geometry.size} ({image_path})",
            "the label must be on the image's voxel grid; replace the label",
        )
    label_geometry = images.spatial_geometry(label_header)
    mismatch = _geometry_mismatch(image_geometry, label_geometry, tolerance)
    if mismatch:
        raise _Invalid(
            label_path,
            f"label geometry differs from the image ({mismatch}; manifest.affine_tolerance is "
            f"{tolerance}): image {_describe(image_geometry)}; label {_describe(label_geometry)}",
            "if the difference is only header rounding, raise manifest.affine_tolerance; "
            "otherwise resample the label onto the image grid or replace it",
        )


def _scan_voxels(image_path: str, label_path: str | None, labels: Mapping[int, str],
                 size: Sequence[int]) -> tuple[dict[str, float], Counter]:
    """Intensity statistics of channel 0 (whole, foreground, zero share) and label value counts.

    The image once and the label beside it, slab by slab along z: a large CT costs about its size.
    """
    image = _read(image_path, "image")  # kept referenced: the arrays below are views of its buffer
    voxels = images.xyz_view(image)
    if voxels.ndim == 3:
        voxels = voxels[..., np.newaxis]
    first = voxels[..., 0]
    label_voxels = None
    if label_path is not None:
        label_image = _read(label_path, "label")
        try:
            label_voxels = _label_array(label_image)
        except ValueError as error:
            raise _Invalid(label_path, str(error), "replace the label with a 3D label map") from None
    floating = np.issubdtype(voxels.dtype, np.floating)
    whole, foreground = _Moments(), _Moments()
    fg_values: list[np.ndarray] = []
    value_counts: Counter = Counter()
    zeros = 0  # voxels exactly 0 in channel 0: a zero background (skull-stripped MRI) wants masked z-scores
    for z in _slabs(size[2], size[0] * size[1]):
        if floating and not np.isfinite(voxels[:, :, z]).all():  # non-NIfTI formats keep NaN in SimpleITK
            raise _nonfinite(
                image_path, int(np.count_nonzero(np.isnan(voxels))), int(np.count_nonzero(np.isinf(voxels)))
            )
        whole.add(first[:, :, z])
        zeros += int(np.count_nonzero(first[:, :, z] == 0))
        if label_voxels is not None:
            label_slab = label_voxels[:, :, z]
            value_counts.update(_label_value_counts(label_slab))
            inside = first[:, :, z][label_slab > 0]
            foreground.add(inside)
            fg_values.append(inside)
    if label_path is not None:
        _check_label_values(label_path, value_counts, labels)
    intensity = whole.stats()
    fg_mean, fg_std, _, _ = foreground.stats()
    p_low = p_high = math.nan
    if foreground.count:
        p_low, p_high = (float(v) for v in np.percentile(np.concatenate(fg_values), [0.5, 99.5]))
    stats = {"intensity_mean": intensity[0], "intensity_std": intensity[1], "intensity_min": intensity[2],
             "intensity_max": intensity[3], "fg_mean": fg_mean, "fg_std": fg_std, "fg_p00_5": p_low,
             "fg_p99_5": p_high, "zero_fraction": zeros / max(int(np.prod(size)), 1)}
    return stats, value_counts


def _check_label_values(label_path: str, value_counts: Counter, labels: Mapping[int, str]) -> None:
    allowed = set(labels)
    unknown = sorted((v for v in value_counts if not (isinstance(v, int) and v in allowed)), key=lambda v: float(v))
    if unknown:
        shown = ", ".join(f"{v} ({value_counts[v]} voxels)" for v in unknown[:_MAX_LISTED])
        more = f" and {len(unknown) - _MAX_LISTED} more" if len(unknown) > _MAX_LISTED else ""
        raise _Invalid(
            label_path,
            f"label values {shown}{more} are not in dataset.json labels {sorted(allowed)}",
            "relabel the file to the dataset.json labels or add the values to dataset.json 'labels'",
        )
