"""The cost model of resample and infer jobs (measured rates), which sizes their chunks and runtime."""

from __future__ import annotations

import gzip
import math
import os
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from msdseg.errors import DatasetError
from msdseg.grid import grid_patch_count
from msdseg.infer.cases import Case
from msdseg.jobs.cohort import Subject

START_UP_SHARE = 0.1
"""Largest share of a job that may go to its start-up when ``subjects_per_job: auto``."""


MIN_WORK_S = 10.0
"""Least estimated work per job with ``auto`` (where start-up alone would allow less)."""


RESAMPLE_STARTUP_S = 0.4
"""Start-up of a resampling job: Python, numpy, SimpleITK, manifest.csv (0.2-0.5 s measured, by load)."""


RESAMPLE_FIXED_S = 0.01
"""Per subject: opening, reading and writing the compressed NIfTIs (12x12x8 voxels: 0.010 s)."""


RESAMPLE_S_PER_VOXEL = 1.5e-7
"""Per output voxel and channel (read, linear interpolation, gzip write): hippocampus (63 k voxels,
image and label) 0.032 s; a 122x101x112 CT resampled to 37 M voxels 4.4 s (estimated 5.6 s)."""


RESAMPLE_LABEL_FACTOR = 0.3
"""A label map (nearest neighbour, uint8) costs this share of an image channel."""


INFER_STARTUP_S = 3.0
"""Start-up of an inference job: Python, torch, torchio, the msdseg modules, loading model.pt
(2.0 s measured in a workflow job on an idle machine, imports alone 2.2-3.1 s under load)."""


INFER_FIXED_S = 0.1
"""Per subject: reading the image, intensity preprocessing, writing the uint8 prediction."""


INFER_S_PER_ORIGINAL_VOXEL = 1.0e-7
"""Per voxel of the original image: class probabilities resampled back onto its grid, argmax."""


INFER_S_PER_PATCH_VOXEL = 1.0e-6
"""Per voxel of every grid patch, per model and mirrored pass, for a U-Net with 16 base channels
(1.0e-6 on hippocampus, 1.35e-6 on a 122x101x112 CT at 3 mm, 2.1e-6 on 244x202x224 at 1.5 mm).
Scaled by (base_channels / 16) ** :data:`INFER_WIDTH_EXPONENT`."""


INFER_WIDTH_EXPONENT = 1.25
"""Measured on hippocampus: 32 base channels (depth 3) 2.3x the time of 16 (depth 4), 4 channels 0.13x."""


def target_seconds(startup_s: float) -> float:
    """Work per job that keeps ``startup_s`` at most :data:`START_UP_SHARE` of it (and at least :data:`MIN_WORK_S`)."""
    return max(MIN_WORK_S, startup_s * (1.0 - START_UP_SHARE) / START_UP_SHARE)


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], preprocess: Mapping[str, Any]) -> tuple[int, ...]:
    """The voxel grid an image is resampled onto, estimated from the preprocess config.

    A fixed ``spacing`` and ``inplane_size`` are exact (as :func:`msdseg.data.resample.target_geometry`);
    ``median`` (or anything else the planner decides) is taken as the image's own spacing, which
    the median of a cohort is close to on average.
    """
    target = preprocess.get("spacing")
    if isinstance(target, (list, tuple)) and len(target) == 3:
        size = [max(1, round(n * s / t)) for n, s, t in zip(shape[:3], spacing[:3], target)]
    else:
        size = [int(n) for n in shape[:3]]
    inplane = preprocess.get("inplane_size")
    if isinstance(inplane, (list, tuple)) and len(inplane) == 2:
        size[0], size[1] = int(inplane[0]), int(inplane[1])
    return tuple(size)


def resample_seconds(subject: Subject, preprocess: Mapping[str, Any], with_label: bool) -> float:
    """Estimated resampling time of one subject (image channels, and its label when ``with_label``)."""
    voxels = math.prod(resampled_shape(subject.shape, subject.spacing, preprocess))
    channels = max(subject.n_channels, 1) + (RESAMPLE_LABEL_FACTOR if with_label else 0.0)
    return RESAMPLE_FIXED_S + RESAMPLE_S_PER_VOXEL * voxels * channels


def mirrored_passes(config: Mapping[str, Any]) -> int:
    """Forward passes per patch: 1, or 2**axes with mirroring test-time augmentation."""
    if not config["infer"]["tta"]:
        return 1
    augmentation = config["train"]["augmentation"]
    axes = augmentation["flip_axes"] if augmentation["flip"] else []
    return 2 ** len(axes) if axes else 1


def infer_seconds(shape: Sequence[int], spacing: Sequence[float], config: Mapping[str, Any], n_models: int) -> float:
    """Estimated inference time of one image of ``shape`` and ``spacing`` with ``n_models`` models.

    ``config`` is validated (:func:`msdseg.config.load_config`): the schema's defaults are the only defaults.
    """
    infer = config["infer"]
    grid = resampled_shape(shape, spacing, config["preprocess"])
    patch = list(infer["patch_size"] or config["train"]["patch_size"])
    patch_voxels = grid_patch_count(grid, patch, infer["overlap"]) * math.prod(patch)
    width = (float(config["model"]["base_channels"]) / 16.0) ** INFER_WIDTH_EXPONENT
    network = INFER_S_PER_PATCH_VOXEL * patch_voxels * width * mirrored_passes(config) * max(n_models, 1)
    return INFER_FIXED_S + INFER_S_PER_ORIGINAL_VOXEL * math.prod(shape[:3]) + network


def nifti_grid(path: str | os.PathLike[str]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(dimensions, spacing) from a NIfTI-1/2 header, reading only its first bytes (no nibabel).

    For estimating work while the DAG is built; the jobs check images properly.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            header = handle.read(540)
    except (OSError, EOFError) as error:
        raise DatasetError(f"{path}: not a readable NIfTI file ({error})") from error
    for order in ("<", ">"):
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            pixdim = struct.unpack(order + "8f", header[76:108])
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            dims = struct.unpack(order + "8q", header[16:80])
            pixdim = struct.unpack(order + "8d", header[104:168])
            break
    else:
        raise DatasetError(f"{path}: not a NIfTI-1/2 file (header size field); give .nii/.nii.gz images.")
    rank = max(0, min(int(dims[0]), 7))
    return tuple(int(v) for v in dims[1:rank + 1]), tuple(abs(float(v)) or 1.0 for v in pixdim[1:rank + 1])


def case_seconds(case: Case, config: Mapping[str, Any], n_models: int) -> float:
    """Estimated time to resample and predict one folder case (its first file's grid)."""
    shape, spacing = nifti_grid(case.files[0])
    if len(shape) < 3:
        return INFER_FIXED_S  # the job refuses it, naming the file
    spatial, spacing3 = shape[:3], (tuple(spacing[:3]) + (1.0, 1.0, 1.0))[:3]
    channels = (shape[3] if len(shape) > 3 else 1) * len(case.files)
    resample = RESAMPLE_FIXED_S + RESAMPLE_S_PER_VOXEL * channels * math.prod(
        resampled_shape(spatial, spacing3, config["preprocess"]))
    return resample + infer_seconds(spatial, spacing3, config, n_models)


def runtime_minutes(seconds: float, floor: int = 10) -> int:
    """A scheduler time limit for an estimated ``seconds`` of work: 3x the estimate, at least ``floor``."""
    return max(int(floor), math.ceil(3.0 * seconds / 60.0))
