"""New images for predict_folder: listing and grouping cases, checking them against the models, resampling plan."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import SimpleITK as sitk

from msdseg.data.resample import RESAMPLING_KEYS
from msdseg.decathlon import subject_id
from msdseg.errors import ModelError, SubjectError
from msdseg.images import channel_count, read_image_header, spatial_geometry
from msdseg.infer.predict import Loaded, check_models

if TYPE_CHECKING:
    pass




def resampling_plan(loaded: Loaded) -> dict[str, Any]:
    """The plan new images are resampled with: the models' own (model.pt), which must agree on the grid."""
    first_path, _, first = loaded[0]
    plan = dict(first.get("plan") or {})
    for path, _, meta in loaded[1:]:
        other = meta.get("plan") or {}
        differing = [key for key in RESAMPLING_KEYS if other.get(key) != plan.get(key)]
        if differing:
            raise ModelError(
                f"{path} and {first_path} resample differently ({', '.join(differing)}); an ensemble needs the "
                "models of one run: predict with one run's folds."
            )
    return plan


def _header(path: str) -> sitk.ImageFileReader:
    try:
        return read_image_header(path)
    except OSError as error:
        raise SubjectError(subject_id(path), path, f"{error}; replace the file") from error


def case_channels(files: Sequence[str], name: str) -> int:
    """Input channels of a case, after checking its files' dimensionality (and that channel files share a grid)."""
    headers = [_header(path) for path in files]
    for path, header in zip(files, headers):
        dimension = header.GetDimension()
        allowed = (3, 4) if len(files) == 1 else (3,)
        if dimension not in allowed:
            what = "a 3D volume or a 4D (x, y, z, channel) image" if len(files) == 1 else "3D (one file per channel)"
            raise SubjectError(name, path, f"is a {dimension}D image (size {tuple(header.GetSize())}); the models "
                               f"take {what}: give 3D/4D NIfTI images")
    if len(files) == 1:
        return channel_count(headers[0])
    first = spatial_geometry(headers[0])
    for path, header in zip(files[1:], headers[1:]):
        if not spatial_geometry(header).same_as(first):
            raise SubjectError(name, path, f"is not on the voxel grid of {files[0]} (channel 0); "
                               "all channel files of a case need one grid")
    return len(files)


def check_cases(loaded: Loaded, cases: Sequence[tuple[str, Sequence[str]]]) -> None:
    """Every case of a chunk fits the models (dimensionality, channels); one error listing all that do not."""
    metas = [(path, meta) for path, _, meta in loaded]
    problems = []
    for name, files in cases:
        try:
            check_models(metas, Path(files[0]), case_channels(files, name))
        except (ModelError, SubjectError) as error:
            problems.append(f"{name} ({files[0]}): {error}")
    if problems:
        raise ModelError(
            f"{len(problems)} image(s) do not fit the models, nothing of this chunk was predicted:\n  "
            + "\n  ".join(problems)
        )
