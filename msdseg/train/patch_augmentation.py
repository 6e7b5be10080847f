"""Augmentation of one patch: the spatial transform samples the patch straight from a region around it.

The same transforms, strengths and probabilities as :func:`msdseg.train.augmentation.augmentation`
(torchio's, on whole volumes), applied to what one patch needs:

- rotation and scaling: one ``torch.nn.functional.grid_sample`` from the region that the rotated,
  scaled patch covers (computed from the drawn matrix: about 1.2-1.45x the patch) to the patch.
  torchio's ``RandomAffine`` resamples each channel through SimpleITK over its whole input: 0.62 s
  for a 4 x 166^3 region on one core, against 0.16 s here for the patch;
- gamma and noise: torchio's formulas (``sign(x)|x|^gamma``, additive Gaussian noise) on the
  patch in place; torchio's versions deep-copy the subject and cost 0.1 s each at 4 x 128^3;
- mirroring: free: the region is read mirrored, or the mirroring is folded into the affine matrix;
- elastic deformation and bias field (off by default): torchio's own transforms on the patch.

Every random number comes from the ``numpy.random.Generator`` the caller passes (seeded per
patch), so a patch is the same whichever worker makes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from msdseg.train.augmentation import mirror_axes

AFFINE_P, ELASTIC_P, BIAS_P, GAMMA_P, NOISE_P = 0.3, 0.2, 0.2, 0.3, 0.15
SCALES, DEGREES, LOG_GAMMA, NOISE_STD = (0.85, 1.15), 15.0, 0.3, 0.1


@dataclass(frozen=True)
class PatchAugmentation:
    """``train.augmentation`` for one patch at a time (``spatial_dims`` 2: in-plane only)."""

    options: Mapping[str, Any]
    spatial_dims: int

    @property
    def mirrored(self) -> tuple[int, ...]:
        return mirror_axes(self.options, self.spatial_dims)

    def draw_matrix(self, rng: np.random.Generator) -> np.ndarray | None:
        """The (x, y, z) voxel-space matrix from patch offsets to region offsets, or None (no affine)."""
        if not self.options["affine"] or rng.random() >= AFFINE_P:
            return None
        planar = self.spatial_dims == 2
        scales = rng.uniform(*SCALES, size=3)
        angles = np.radians(rng.uniform(-DEGREES, DEGREES, size=3))
        if planar:
            scales[2], angles[:2] = 1.0, 0.0
        return rotation(angles) @ np.diag(1.0 / scales)  # a scale above 1 enlarges the anatomy (torchio's sense)

    def region(self, patch: tuple[int, ...], matrix: np.ndarray | None) -> np.ndarray:
        """Half-extents (voxels, per axis) of the region the patch samples from, around its centre."""
        half = (np.asarray(patch, dtype=np.float64) - 1) / 2
        return half if matrix is None else np.abs(matrix) @ half + 1  # +1: linear interpolation

    def draw_flips(self, rng: np.random.Generator) -> tuple[int, ...]:
        """The spatial axes this patch mirrors (each mirrored axis with probability 0.5)."""
        return tuple(axis for axis in self.mirrored if rng.random() < 0.5)

    def apply(self, image: np.ndarray, label: np.ndarray, centre: np.ndarray, patch: tuple[int, ...],
              matrix: np.ndarray | None, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """image (C, region) and label (region), fresh arrays read around ``centre`` -> the augmented patch.

        Mirroring is already done: by the reading (no affine) or folded into ``matrix``.
        """
        x, y = torch.from_numpy(image), torch.from_numpy(label)
        if matrix is not None:
            x, y = sample_patch(x, y, matrix, centre, patch)
        x = x.float()  # no copy when float32: the region is this patch's own array
        if self.options["elastic"] and rng.random() < ELASTIC_P:
            x, y = _torchio(x, y, "elastic", self.spatial_dims, rng)
        if self.options["bias_field"] and rng.random() < BIAS_P:
            x, y = _torchio(x, y, "bias_field", self.spatial_dims, rng)
        if self.options["gamma"] and rng.random() < GAMMA_P:
            gamma = float(np.exp(rng.uniform(-LOG_GAMMA, LOG_GAMMA)))
            # torchio's sign(x) |x|^gamma, as x |x|^(gamma - 1): one pass fewer (copysign costs as much as pow)
            x.mul_(x.abs().clamp_min_(1e-30).pow_(gamma - 1.0))
        if self.options["noise"] and rng.random() < NOISE_P:
            std = float(rng.uniform(0, NOISE_STD))
            noise = torch.Generator().manual_seed(int(rng.integers(2**62)))  # torch's normals: 2x numpy's speed
            x.add_(torch.randn(x.shape, generator=noise).mul_(std))
        return x.contiguous(), y.contiguous()


def rotation(angles: np.ndarray) -> np.ndarray:
    """Rotation about x, then y, then z by ``angles`` (radians)."""
    (cx, cy, cz), (sx, sy, sz) = np.cos(angles), np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def sample_patch(image: torch.Tensor, label: torch.Tensor, matrix: np.ndarray, centre: np.ndarray,
                 patch: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The patch whose voxel offset ``u`` from its centre reads the region at ``centre + matrix @ u``.

    Linear interpolation for the image, nearest for the label; outside the region reads 0.
    ``grid_sample`` orders the grid's components (last axis, ..., first axis): hence the reversals.
    """
    region = np.asarray(image.shape[1:], dtype=np.float64)
    out = np.asarray(patch, dtype=np.float64)
    scale_in = np.where(region > 1, 2.0 / np.maximum(region - 1, 1), 0.0)
    theta = np.zeros((3, 4))
    theta[:, :3] = scale_in[:, None] * matrix * ((out - 1) / 2)[None, :]
    theta[:, 3] = np.where(region > 1, scale_in * np.asarray(centre, dtype=np.float64) - 1, 0.0)
    theta = np.concatenate([theta[::-1, 2::-1], theta[::-1, 3:]], axis=1)  # (x, y, z) -> grid_sample's (z, y, x)
    grid = affine_grid(torch.from_numpy(np.ascontiguousarray(theta, dtype=np.float32)), patch)
    x = F.grid_sample(image[None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    y = F.grid_sample(label[None, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=True)
    return x, y[0, 0].to(label.dtype)


def affine_grid(theta: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """``F.affine_grid(theta[None], [1, 1, *size], align_corners=True)``, built by broadcasting.

    The grid is affine in the output index, so each component is a sum of three 1-D ramps: 5 ms
    for a 128^3 patch on one core, where ``F.affine_grid`` (a (N, 4) x (4, 3) product) takes 50.
    """
    ramps = [torch.linspace(-1, 1, n) if n > 1 else torch.zeros(1) for n in size]  # affine_grid's base grid
    grid = torch.empty(*size, 3)
    for k in range(3):  # theta's columns act on (x, y, z) = (last, middle, first) output axis
        grid[..., k] = ((theta[k, 2] * ramps[0])[:, None, None] + (theta[k, 1] * ramps[1])[None, :, None]
                        + (theta[k, 0] * ramps[2] + theta[k, 3])[None, None, :])
    return grid[None]


def _torchio(image: torch.Tensor, label: torch.Tensor, name: str, spatial_dims: int,
             rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """torchio's elastic deformation or bias field on the patch, seeded from ``rng``."""
    import torchio as tio

    from msdseg.data.subjects import IMAGE, LABEL

    if name == "elastic":
        transform: tio.Transform = tio.RandomElasticDeformation(
            max_displacement=(5.0, 5.0, 0.0) if spatial_dims == 2 else 5.0, p=1.0)
    else:
        transform = tio.RandomBiasField(coefficients=0.3, p=1.0, include=[IMAGE])
    subject = tio.Subject({IMAGE: tio.ScalarImage(tensor=image), LABEL: tio.LabelMap(tensor=label[None])})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(rng.integers(2**62)))
        done = transform(subject)
    return done[IMAGE].data.float(), done[LABEL].data[0].to(label.dtype)
