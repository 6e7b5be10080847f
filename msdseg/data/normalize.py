"""Intensity normalisation from plan.json: shared by training, validation and inference."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torchio as tio

from msdseg.data.subjects import IMAGE
from msdseg.errors import ConfigError, SubjectError


class ZScore(tio.IntensityTransform):
    """Z-score each channel over all its voxels (mean 0, unbiased standard deviation 1).

    Multi-channel tasks z-score every channel on its own (modalities differ in scale), where
    ``tio.ZNormalization`` pools them; for one channel both are the same. Unlike torchio's, no
    mask selects the voxels: torchio indexes with a boolean mask even when it is every voxel, and
    on a 512x512x400 CT that indexing builds about 3 GB of int64 indices for a 0.4 GB image.

    ``nonzero=True`` (nnU-Net's scheme where the background is exactly 0, as in skull-stripped
    BrainTumour MRI): statistics over the non-zero voxels of each channel, and the background
    stays 0, so the background's share of a volume does not set the brain's intensities.
    """

    def __init__(self, nonzero: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.nonzero = nonzero
        self.args_names = ["nonzero"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        for image in self.get_images_dict(subject).values():
            data = image.data.to(torch.float32, copy=True)
            for index, channel in enumerate(data):
                if self.nonzero:
                    self._zscore_nonzero(channel)
                    continue
                mean, std = channel.mean(), channel.std()
                if not bool(std > 0):
                    raise SubjectError(str(subject.get("subject", "?")), str(image.path),
                                       f"channel {index} is constant (standard deviation 0); "
                                       "exclude the subject (manifest.on_invalid: skip).")
                channel.sub_(mean).div_(std)
            image.set_data(data)
        return subject

    @staticmethod
    def _zscore_nonzero(channel: torch.Tensor) -> None:
        mask = channel != 0
        values = channel[mask]
        if values.numel() < 2 or not bool(values.std() > 0):
            return  # an empty or constant channel stays as it is (all background)
        channel[mask] = (values - values.mean()) / values.std()


def preprocessing(plan: Mapping[str, Any], copy: bool = True) -> tio.Transform:
    """The one intensity preprocessing of training and inference, chosen by the plan (image key only).

    ct: clip to ``ct_window`` and z-score with the training set's foreground ``ct_mean``/``ct_std``
    (nnU-Net's CT scheme, identical for every image); zscore: per image and channel; none:
    unchanged. ``copy=False`` changes the subject in place instead of a deep copy of it (inference,
    where the raw image is not needed afterwards: one CT-sized copy less).
    """
    method = plan.get("normalization", "zscore")
    if method == "ct":
        window, mean, std = plan.get("ct_window"), plan.get("ct_mean"), plan.get("ct_std")
        if window is None or mean is None or std is None or float(std) <= 0:
            raise ConfigError(
                "plan.json: normalization 'ct' needs ct_window, ct_mean and ct_std > 0 "
                f"(got {window}, {mean}, {std}); rebuild the plan (rule plan) or set "
                "preprocess.normalization: zscore."
            )
        # RescaleIntensity maps in_min_max linearly onto out_min_max: (x - mean) / std
        return tio.Compose([  # the steps change what Compose hands them; Compose copies (or not) once
            tio.Clamp(out_min=float(window[0]), out_max=float(window[1]), include=[IMAGE], copy=False),
            tio.RescaleIntensity(out_min_max=(0.0, 1.0), in_min_max=(float(mean), float(mean) + float(std)),
                                 include=[IMAGE], copy=False),
        ], copy=copy)
    if method == "zscore":
        return ZScore(include=[IMAGE], copy=copy)
    if method == "zscore_nonzero":
        return ZScore(nonzero=True, include=[IMAGE], copy=copy)
    if method == "none":
        return tio.Compose([], copy=copy)
    raise ConfigError(f"plan.json: unknown normalization {method!r}; use ct, zscore, zscore_nonzero or none.")
