"""Training augmentation (spatial, intensity, mirroring) from the train config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torchio as tio

from msdseg.data.normalize import preprocessing
from msdseg.data.subjects import IMAGE, PadToAtLeast


def mirror_axes(options: Mapping[str, Any], spatial_dims: int) -> tuple[int, ...]:
    """Spatial axes mirrored in training (and so in test-time augmentation); 2D never mirrors z.

    ``options`` is the ``train.augmentation`` section.
    """
    if not options["flip"]:
        return ()
    axes = options["flip_axes"]
    return tuple(sorted(int(a) for a in axes if not (spatial_dims == 2 and int(a) == 2)))


def augmentation(options: Mapping[str, Any], spatial_dims: int) -> tio.Transform:
    """Random spatial and intensity augmentation after normalisation (nnU-Net-like strengths).

    Intensity changes touch the image only (not a weighted sampler's sampling_map).

    2D models (``model.spatial_dims: 2``) rotate, scale and flip in-plane only.
    """
    planar = spatial_dims == 2
    transforms: list[tio.Transform] = []
    axes = mirror_axes(options, spatial_dims)
    if axes:
        transforms.append(tio.RandomFlip(axes=axes, flip_probability=0.5))
    if options["affine"]:
        scales = (0.85, 1.15, 0.85, 1.15, 1.0, 1.0) if planar else (0.85, 1.15)
        degrees = (0, 0, 0, 0, -15, 15) if planar else 15
        transforms.append(tio.RandomAffine(scales=scales, degrees=degrees, p=0.3))
    if options["elastic"]:
        displacement = (5.0, 5.0, 0.0) if planar else 5.0
        transforms.append(tio.RandomElasticDeformation(max_displacement=displacement, p=0.2))
    if options["bias_field"]:
        transforms.append(tio.RandomBiasField(coefficients=0.3, p=0.2, include=[IMAGE]))
    if options["gamma"]:
        transforms.append(tio.RandomGamma(log_gamma=(-0.3, 0.3), p=0.3, include=[IMAGE]))
    if options["noise"]:
        transforms.append(tio.RandomNoise(std=(0, 0.1), p=0.15, include=[IMAGE]))
    return tio.Compose(transforms)


def training_transform(plan: Mapping[str, Any], cfg_train: Mapping[str, Any], spatial_dims: int) -> tio.Transform:
    """preprocessing -> augmentation -> pad to the patch (the order matters, see module doc)."""
    return tio.Compose([preprocessing(plan), augmentation(cfg_train["augmentation"], spatial_dims),
                        PadToAtLeast(cfg_train["patch_size"])])
