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

import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import SimpleITK as sitk

from msdseg import files, images
from msdseg.errors import DatasetError

_INTERPOLATORS = {"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline}


def target_geometry(geometry: images.Geometry, plan: Mapping[str, Any]) -> images.Geometry:
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
    return images.Geometry(
        size=tuple(int(v) for v in new_size),  # type: ignore[arg-type]
        spacing=tuple(float(v) for v in new_spacing),  # type: ignore[arg-type]
        origin=tuple(float(v) for v in origin),  # type: ignore[arg-type]
        direction=tuple(geometry.direction),
    )


def _resample(image: sitk.Image, grid: images.Geometry, interpolator: int, pixel_type: int) -> sitk.Image:
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
        raise DatasetError(f"{path}: a label map must have one value per voxel; fix the file or remove "
                           "the subject from dataset.json.")
    if label.GetDimension() == 4:
        size = images.label_shape(label.GetSize())
        if len(size) != 3:
            raise DatasetError(f"{path}: a label map must be 3D, got size {size}; fix the file or remove "
                               "the subject from dataset.json.")
        label = sitk.Extract(label, [*size, 0], [0, 0, 0, 0], sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
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
    interpolator = _INTERPOLATORS[plan["image_interpolation"]]
    clip = plan.get("clip")

    image = images.read_image(image_in)
    grid = target_geometry(images.spatial_geometry(image), plan)
    channels = []
    for channel in images.iter_channels(image):
        channel = sitk.Cast(channel, sitk.sitkFloat32)
        if clip is not None:
            channel = sitk.Clamp(channel, sitk.sitkFloat32, float(clip[0]), float(clip[1]))
        channel = _resample(channel, grid, interpolator, sitk.sitkFloat32)
        if clip is not None and interpolator != sitk.sitkLinear:
            channel = sitk.Clamp(channel, sitk.sitkFloat32, float(clip[0]), float(clip[1]))
        channels.append(channel)
    del image
    images.write_image(images.join_channels(channels), image_out)
    del channels

    if label_in is not None and label_out is not None:
        label = _label_volume(images.read_image(label_in), label_in)
        images.write_image(_resample(label, grid, sitk.sitkNearestNeighbor, sitk.sitkUInt8), label_out)


def _check_grid(array: np.ndarray, source: images.Geometry, what: str) -> None:
    if tuple(array.shape[-3:]) != tuple(source.size):
        raise ValueError(
            f"{what} has spatial shape {tuple(array.shape[-3:])} but the source image's grid is {source.size}; "
            "pass the resampled image the array was predicted on as source"
        )


def _resampling_source(array: np.ndarray, grid: images.Geometry) -> sitk.Image:
    """An (x, y, z) array as an image to resample from, with one copy of it instead of two.

    SimpleITK reads arrays as (z, y, x), so :func:`msdseg.images.image_on_grid` transposes first,
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

    The inverse of :func:`resample_subject` for predictions: ``source`` is the resampled image,
    ``reference`` the original (a 4D one contributes its spatial grid). Only their grids are
    used, so header readers (:func:`msdseg.images.read_image_header`) do as well as images. Anything
    ``np.asarray`` takes (a CPU torch tensor too) is accepted.

    For large CTs: at any moment only one channel exists on each grid. Each yielded array is a
    read-only float32 view that is valid until the next one is requested, so copy what you keep.
    When the two grids are the same (no resampling happened) the channels pass through uncopied.
    """
    probabilities = np.asarray(probabilities)
    source_grid = images.spatial_geometry(source)
    reference_grid = images.spatial_geometry(reference)
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
        yield images.xyz_view(resampled)
        del resampled


RESAMPLING_KEYS = ("target_spacing", "inplane_size", "image_interpolation", "clip")
"""The keys of plan.json that resampling reads."""


def read_resampling_plan(path: str | os.PathLike[str]) -> dict[str, Any]:
    """plan.json for resampling: the keys it reads checked, without :mod:`msdseg.plan.preprocessing`.

    That module imports the config machinery (yaml, the task table): 0.03 s of each resampling
    job's start-up. A plan of another version lacking other keys fails where those are read.
    """
    return files.read_checked_json(path, RESAMPLING_KEYS)
