"""torchio subjects from the manifest's files: the image/label keys, and padding to a patch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torchio as tio

from msdseg.errors import SubjectError

IMAGE = "image"


LABEL = "label"


SAMPLING_MAP = "sampling_map"


class PadToAtLeast(tio.SpatialTransform):
    """Pad every image to at least ``shape`` (centred, constant 0; labels get background).

    torchio's samplers refuse volumes smaller than the patch and ``CropOrPad`` would crop the
    larger axes, so this pads only where needed.
    """

    def __init__(self, shape: Sequence[int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.shape = tuple(int(s) for s in shape)
        self.args_names = ["shape"]

    @staticmethod
    def padding_for(spatial_shape: Sequence[int], shape: Sequence[int]) -> tuple[int, ...]:
        """(x_lo, x_hi, y_lo, y_hi, z_lo, z_hi) as ``tio.Pad`` takes it."""
        padding: list[int] = []
        for size, target in zip(spatial_shape, shape):
            missing = max(int(target) - int(size), 0)
            padding += [missing // 2, missing - missing // 2]
        return tuple(padding)

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        padding = self.padding_for(subject.spatial_shape, self.shape)
        if not any(padding):
            return subject
        return tio.Pad(padding, padding_mode=0)(subject)


def check_trainable(subject: str, image: str, has_label: bool, has_sampling_map: bool, sampler: str) -> None:
    """What every training loader needs of a subject (the patch loader and torchio's queue alike)."""
    if not has_label:
        raise SubjectError(subject, image,
                           "a training subject needs a label; only role 'train' rows can be trained on.")
    if sampler == "weighted" and not has_sampling_map:
        raise SubjectError(subject, image, "train.sampler 'weighted' needs a 'sampling_map' path per subject; "
                           "add the column or use train.sampler: label.")


def subjects_from_paths(rows: Sequence[Mapping[str, Any]]) -> list[tio.Subject]:
    """torchio subjects from rows with keys subject, image and (optional) label / sampling_map.

    4D images (x, y, z, c) become channels. Nothing is read yet (torchio loads lazily).
    """
    subjects = []
    for row in rows:
        name = str(row.get("subject", ""))
        if not row.get("image"):
            raise SubjectError(name or "?", "<no image>", "row has no image path; rebuild the manifest.")
        fields: dict[str, Any] = {"subject": name, IMAGE: tio.ScalarImage(str(row["image"]))}
        label = row.get("label")
        if label is not None and not _is_missing(label) and str(label):
            fields[LABEL] = tio.LabelMap(str(label))
        if row.get(SAMPLING_MAP):
            fields[SAMPLING_MAP] = tio.ScalarImage(str(row[SAMPLING_MAP]))
        subjects.append(tio.Subject(**fields))
    return subjects


def _is_missing(value: Any) -> bool:
    """pandas leaves NaN in empty label cells of test rows."""
    try:
        return bool(np.isnan(value))
    except TypeError:
        return False
