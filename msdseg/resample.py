"""The preprocessing plan (plan.json) and resampling onto it, and back (for predictions).

Grids: an output grid covers the same physical box as its input (the box of voxel *corners*,
centre +- spacing/2), with the same direction. Its size is ``round(old_size * old_spacing /
new_spacing)`` and it is centred on the input box, so after rounding each face is off by at most
a quarter of a new voxel. The first voxel centre (the NIfTI/ITK "origin") therefore moves by
about ``(new_spacing - old_spacing) / 2`` along each axis, as in torchio's Resample (which
centres the same way but floors the size): keeping the origin voxel centre fixed instead would
shift the whole volume by that much. There is no anti-aliasing filter before downsampling.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk

from msdseg import io
from msdseg.decathlon import TASKS, DatasetInfo
from msdseg.errors import DatasetError

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
)

_INTERPOLATORS = {"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline}


# --------------------------------------------------------------------------- plan


def _modality(dataset: DatasetInfo, task: str) -> str:
    """Modality of channel 0: dataset.json first, the task table when dataset.json has none."""
    if dataset.modality:
        return str(dataset.modality.get(0, next(iter(dataset.modality.values()))))
    if task in TASKS:
        return str(TASKS[task].modality)
    return ""


def make_plan(manifest: pd.DataFrame, dataset: DatasetInfo, preprocess: Mapping[str, Any], task: str) -> dict[str, Any]:
    """plan.json from the training subjects of the manifest and the ``preprocess`` config section.

    ``preprocess`` may be partial (library use): missing keys get the schema defaults.
    CT window from the data: the median over training subjects of each subject's foreground 0.5
    and 99.5 percentiles (a median of per-subject values, not percentiles of all pooled voxels);
    ct_mean/ct_std are the exact pooled foreground mean and standard deviation (nnU-Net's
    CTNormalization statistics), combined from the per-subject moments and voxel counts.
    """
    from msdseg.config import load_config

    settings = load_config({"preprocess": dict(preprocess)})["preprocess"]
    training = manifest[manifest["role"] == "train"]
    if training.empty:
        raise DatasetError("the manifest has no training subject; a plan needs labelled subjects.")

    channels = sorted({int(n) for n in manifest["n_channels"]})
    if len(channels) != 1:
        counts = manifest.groupby("n_channels")["subject"].apply(lambda s: list(s)[:3]).to_dict()
        raise DatasetError(
            f"subjects have different channel counts {channels} (examples {counts}); every image of "
            "a task needs the same channels: fix dataset.json or exclude the odd subjects."
        )

    spacing_setting = settings["spacing"]
    if spacing_setting == "median":
        spacings = np.array([list(s) for s in training["spacing"]], dtype=np.float64)
        target_spacing: list[float] | None = [float(v) for v in np.median(spacings, axis=0)]
    elif spacing_setting is None:
        target_spacing = None
    else:
        target_spacing = [float(v) for v in spacing_setting]
    inplane = settings["inplane_size"]

    normalization = settings["normalization"]
    if normalization == "auto":
        normalization = "ct" if _modality(dataset, task).strip().upper() == "CT" else "zscore"

    ct_window = ct_mean = ct_std = None
    if normalization == "ct":
        foreground_columns = [f"voxels_{k}" for k in sorted(int(k) for k in dataset.labels) if k != 0]
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
        ct_mean = float(np.sum(n * means) / np.sum(n))
        ct_std = float(math.sqrt(np.sum(n * (stds**2 + (means - ct_mean) ** 2)) / np.sum(n)))
        if settings["ct_window"] is not None:
            ct_window = [float(v) for v in settings["ct_window"]]
        else:
            ct_window = [
                float(np.median(subset["fg_p00_5"].to_numpy(dtype=np.float64))),
                float(np.median(subset["fg_p99_5"].to_numpy(dtype=np.float64))),
            ]

    return {
        "task": str(task),
        "labels": {str(int(k)): str(v) for k, v in sorted(dataset.labels.items())},
        "modality": {str(int(k)): str(v) for k, v in sorted(dataset.modality.items())},
        "n_channels": channels[0],
        "target_spacing": target_spacing,
        "inplane_size": [int(v) for v in inplane] if inplane is not None else None,
        "image_interpolation": settings["image_interpolation"],
        "clip": [float(v) for v in settings["clip"]] if settings["clip"] is not None else None,
        "normalization": normalization,
        "ct_window": ct_window,
        "ct_mean": ct_mean,
        "ct_std": ct_std,
    }


def write_plan(plan: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write plan.json atomically with sorted keys (same plan, same bytes)."""
    io.write_text(json.dumps(plan, indent=2, sort_keys=True) + "\n", path)


def read_plan(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read plan.json, checking it has every key this version writes."""
    with open(path) as handle:
        plan = json.load(handle)
    missing = [key for key in PLAN_KEYS if key not in plan]
    if missing:
        raise DatasetError(f"{path}: plan lacks {missing}; delete it so the plan rule writes it again.")
    return plan


# --------------------------------------------------------------------------- grids


def target_geometry(geometry: io.Geometry, plan: Mapping[str, Any]) -> io.Geometry:
    """The grid an image with ``geometry`` is resampled onto under ``plan`` (see the module docstring).

    Spacing per axis is the plan's ``target_spacing`` (the image's own when null). With
    ``inplane_size`` the x/y sizes are fixed and their spacing follows from the physical extent;
    z keeps ``target_spacing[2]`` (the image's own z spacing when target_spacing is null).
    """
    old_size = np.array(geometry.size, dtype=np.float64)
    old_spacing = np.array(geometry.spacing, dtype=np.float64)
    target = plan.get("target_spacing")
    new_spacing = old_spacing.copy() if target is None else np.array(target, dtype=np.float64)
    new_size = np.maximum(np.floor(old_size * old_spacing / new_spacing + 0.5), 1.0)
    inplane = plan.get("inplane_size")
    if inplane is not None:
        for axis in (0, 1):
            new_size[axis] = float(inplane[axis])
            new_spacing[axis] = old_size[axis] * old_spacing[axis] / new_size[axis]
    # centre the new box on the old one; the shift is exactly 0 on axes that do not change
    shift = old_spacing * (old_size - 1) / 2 - new_spacing * (new_size - 1) / 2
    direction = np.array(geometry.direction, dtype=np.float64).reshape(3, 3)
    origin = np.array(geometry.origin, dtype=np.float64) + direction @ shift
    return io.Geometry(
        size=tuple(int(v) for v in new_size),  # type: ignore[arg-type]
        spacing=tuple(float(v) for v in new_spacing),  # type: ignore[arg-type]
        origin=tuple(float(v) for v in origin),  # type: ignore[arg-type]
        direction=tuple(geometry.direction),
    )


def _resample(image: sitk.Image, grid: io.Geometry, interpolator: int, pixel_type: int) -> sitk.Image:
    """``image`` (3D) on ``grid``; points beyond the input take the nearest edge value, not a constant."""
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(v) for v in grid.size])
    resampler.SetOutputSpacing(grid.spacing)
    resampler.SetOutputOrigin(grid.origin)
    resampler.SetOutputDirection(grid.direction)
    resampler.SetInterpolator(interpolator)
    resampler.SetOutputPixelType(pixel_type)
    resampler.SetDefaultPixelValue(0)
    resampler.SetUseNearestNeighborExtrapolator(True)
    return resampler.Execute(image)


def _label_volume(label: sitk.Image, path: os.PathLike[str] | str) -> sitk.Image:
    """A label as a 3D scalar image (a 4D label with a single volume is accepted)."""
    if label.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path}: a label map must have one value per voxel")
    if label.GetDimension() == 4:
        size = list(label.GetSize())
        if size[3] != 1:
            raise ValueError(f"{path}: a label map must be 3D, got size {tuple(size)}")
        label = sitk.Extract(label, size[:3] + [0], [0, 0, 0, 0], sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
    return label


def resample_subject(
    image_in: os.PathLike[str] | str,
    image_out: os.PathLike[str] | str,
    plan: Mapping[str, Any],
    label_in: os.PathLike[str] | str | None = None,
    label_out: os.PathLike[str] | str | None = None,
) -> None:
    """Resample one subject onto the plan's grid: image float32 (linear/B-spline), label uint8 (nearest).

    Intensities are clipped to ``plan["clip"]`` before interpolation (so e.g. -3024 HU padding
    does not bleed into the body) and again after it (B-spline overshoots). A 4D image is
    resampled channel by channel and written back as a 4D (x, y, z, c) NIfTI. The label lands on
    exactly the image's output grid.
    """
    if (label_in is None) != (label_out is None):
        raise ValueError("give both label_in and label_out, or neither")
    interpolator = _INTERPOLATORS[plan.get("image_interpolation", "linear")]
    clip = plan.get("clip")

    image = io.read_image(image_in)
    grid = target_geometry(io.spatial_geometry(image), plan)
    channels = []
    for channel in io.iter_channels(image):
        channel = sitk.Cast(channel, sitk.sitkFloat32)
        if clip is not None:
            channel = sitk.Clamp(channel, sitk.sitkFloat32, float(clip[0]), float(clip[1]))
        channel = _resample(channel, grid, interpolator, sitk.sitkFloat32)
        if clip is not None and interpolator != sitk.sitkLinear:
            channel = sitk.Clamp(channel, sitk.sitkFloat32, float(clip[0]), float(clip[1]))
        channels.append(channel)
    del image
    io.write_image(io.join_channels(channels), image_out)
    del channels

    if label_in is not None and label_out is not None:
        label = _label_volume(io.read_image(label_in), label_in)
        io.write_image(_resample(label, grid, sitk.sitkNearestNeighbor, sitk.sitkUInt8), label_out)


# --------------------------------------------------------------------------- back to the original grid


def _check_grid(array: np.ndarray, source: io.Geometry, what: str) -> None:
    if tuple(array.shape[-3:]) != tuple(source.size):
        raise ValueError(
            f"{what} has spatial shape {tuple(array.shape[-3:])} but the source image's grid is {source.size}; "
            "pass the resampled image the array was predicted on as source"
        )


def resample_to_reference(
    probabilities: np.ndarray, source: sitk.Image | sitk.ImageFileReader, reference: sitk.Image | sitk.ImageFileReader
) -> np.ndarray:
    """(C, x, y, z) float32 on ``source``'s grid -> (C, x', y', z') on ``reference``'s grid, linearly.

    The inverse of :func:`resample_subject` for predictions: ``source`` is the resampled image,
    ``reference`` the original (a 4D one contributes its spatial grid). Only their grids are
    used, so header readers (:func:`msdseg.io.read_image_header`) do as well as images. Anything
    ``np.asarray`` takes (a CPU torch tensor too) is accepted.
    """
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 4:
        raise ValueError(f"probabilities must be (C, x, y, z), got shape {probabilities.shape}")
    reference_grid = io.spatial_geometry(reference)
    result = np.empty((probabilities.shape[0], *reference_grid.size), dtype=np.float32)
    for index, channel in enumerate(channels_on_reference(probabilities, source, reference)):
        result[index] = channel
    return result


def _resampling_source(array: np.ndarray, grid: io.Geometry) -> sitk.Image:
    """An (x, y, z) array as an image to resample from, with one copy of it instead of two.

    SimpleITK reads arrays as (z, y, x), so :func:`msdseg.io.image_on_grid` transposes first,
    which copies a CT-sized channel once more. Taken as it is, the (x, y, z) buffer gives an image
    with its axes in reverse order; reversing the spacing and the direction's columns with them
    puts every voxel at the same physical point, and that is all resampling looks at. Only for
    reading by the resampler: the image's own index order is (z, y, x).
    """
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    image.SetSpacing(tuple(reversed(grid.spacing)))
    image.SetOrigin(grid.origin)
    image.SetDirection(tuple(np.asarray(grid.direction, dtype=float).reshape(3, 3)[:, ::-1].ravel()))
    return image


def channels_on_reference(
    probabilities: np.ndarray, source: sitk.Image | sitk.ImageFileReader, reference: sitk.Image | sitk.ImageFileReader
) -> Iterator[np.ndarray]:
    """Each channel of (C, x, y, z) ``probabilities`` on ``reference``'s grid, linearly, one at a time.

    For large CTs: at any moment only one channel exists on each grid. Each yielded array is a
    read-only float32 view that is valid until the next one is requested, so copy what you keep.
    When the two grids are the same (no resampling happened) the channels pass through uncopied.
    """
    probabilities = np.asarray(probabilities)
    source_grid = io.spatial_geometry(source)
    reference_grid = io.spatial_geometry(reference)
    _check_grid(probabilities, source_grid, "probabilities")
    identical = source_grid.same_as(reference_grid)
    for index in range(probabilities.shape[0]):
        channel = np.asarray(probabilities[index], dtype=np.float32)
        if identical:
            yield channel
            continue
        image = _resampling_source(channel, source_grid)
        del channel
        resampled = _resample(image, reference_grid, sitk.sitkLinear, sitk.sitkFloat32)
        del image
        yield io.xyz_view(resampled)
        del resampled


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
    source_grid = io.spatial_geometry(source)
    _check_grid(label, source_grid, "label")
    image = io.image_on_grid(label, source_grid)
    resampled = _resample(image, io.spatial_geometry(reference), sitk.sitkNearestNeighbor, image.GetPixelID())
    return io.to_xyz(resampled).astype(label.dtype, copy=False)

