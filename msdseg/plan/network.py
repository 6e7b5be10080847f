"""The U-Net's topology from the patch and spacing (nnU-Net's pooling rule), candidate patches and the memory model."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from msdseg.config import PLANNED_KEYS  # noqa: F401  (re-exported: the planner's keys)
from msdseg.plan.fingerprint import Fingerprint

if TYPE_CHECKING:  # annotations only: planning a known task's table needs no pandas or torch
    pass


MIN_FEATURE_SIZE = 4  # nnU-Net: stop pooling an axis when its feature map would fall below this


MAX_DEPTH = 5


BASE_CHANNELS = 32


MAX_CHANNELS = 320


# activation memory per (voxel x channel) of the U-Net at one sample, bytes, under mixed precision:
# feature maps and their gradients of every conv, norm and activation of encoder and decoder.
# Calibrated so that nnU-Net's Task03 plan (128^3, 32 -> 320 channels, batch 2) is about 10 GB.
BYTES_PER_ACTIVATION = 56.0


REFERENCE_MEMORY_GB = 10.0  # the patch is sized against this, more memory buys batch size


# a short budget buys fewer steps, not smaller patches below this context: half the median image per
# axis, at most 48 voxels (Task04 in 3 CPU minutes: a 12x16x14 patch with 1500 steps scored 0.45/0.62)
CONTEXT_SHARE, CONTEXT_CAP = 0.5, 48


MAX_CPU_BATCH = {3: 4, 2: 32}  # volumes per step on a CPU; 2D steps take a batch of slices


@dataclass(frozen=True)
class Network:
    """A U-Net shape: patch, pooling strides per level and axis, first-level width."""

    spatial_dims: int
    patch: tuple[int, int, int]
    strides: tuple[tuple[int, int, int], ...]
    base_channels: int

    @property
    def depth(self) -> int:
        return len(self.strides)

    def widths(self) -> list[int]:
        return [min(self.base_channels * 2**level, MAX_CHANNELS) for level in range(self.depth + 1)]

    def level_shapes(self) -> list[tuple[int, int, int]]:
        shapes, shape = [], list(self.patch)
        shapes.append(tuple(shape))
        for stride in self.strides:
            shape = [max(-(-s // k), 1) for s, k in zip(shape, stride)]
            shapes.append(tuple(shape))
        return shapes  # type: ignore[return-value]

    def activations(self) -> float:
        """Sum over levels of voxels x channels (encoder and decoder counted once: the memory model's unit)."""
        return float(sum(np.prod(shape) * width for shape, width in zip(self.level_shapes(), self.widths())))

    def flops(self, in_channels: int) -> float:
        """Multiply-adds of one sample's forward pass (3x for a training step)."""
        kernel = 27 if self.spatial_dims == 3 else 9
        total, widths = 0.0, self.widths()
        for level, (shape, width) in enumerate(zip(self.level_shapes(), widths)):
            voxels = float(np.prod(shape))
            c_in = in_channels if level == 0 else widths[level - 1]
            total += voxels * kernel * (c_in * width + width * width)  # encoder block
            if level < self.depth:
                total += voxels * kernel * (2 * width * width + width * width)  # decoder block (concat in)
        return total


def pooling_strides(patch: Sequence[int], spacing: Sequence[float],
                    spatial_dims: int) -> tuple[tuple[int, int, int], ...]:
    """nnU-Net's topology rule: pool an axis while it stays >= 2x the minimum feature size and its
    current spacing is at most twice the finest current spacing (anisotropic data pools in-plane first).
    """
    shape, current = [float(p) for p in patch], [float(s) for s in spacing]
    strides: list[tuple[int, int, int]] = []
    axes = (0, 1) if spatial_dims == 2 else (0, 1, 2)
    while len(strides) < MAX_DEPTH:
        poolable = [a for a in axes if shape[a] >= 2 * MIN_FEATURE_SIZE]
        if not poolable:
            break
        finest = min(current[a] for a in poolable)
        stride = tuple(2 if a in poolable and current[a] <= 2 * finest else 1 for a in range(3))
        if sum(k == 2 for k in stride) == 0:
            break
        strides.append(stride)  # type: ignore[arg-type]
        shape = [s / k for s, k in zip(shape, stride)]
        current = [c * k for c, k in zip(current, stride)]
    return tuple(strides)


def _divisible(patch: Sequence[int], strides: Sequence[Sequence[int]]) -> tuple[int, int, int]:
    multiple = [int(np.prod([s[a] for s in strides])) if strides else 1 for a in range(3)]
    return tuple(max(m, int(round(p / m)) * m) for p, m in zip(patch, multiple))  # type: ignore[return-value]


def network_for(patch: Sequence[int], spacing: Sequence[float], spatial_dims: int, base_channels: int) -> Network:
    """The U-Net for a patch: strides from the spacing, the patch rounded to what the pooling divides."""
    strides = pooling_strides(patch, spacing, spatial_dims)
    return Network(spatial_dims, _divisible(patch, strides), strides, base_channels)


def candidate_patches(fingerprint: Fingerprint, spatial_dims: int,
                      floor: Sequence[float] = (0.0, 0.0, 0.0)) -> Iterator[tuple[int, int, int]]:
    """Patches from the median image down: each step shrinks the axis that is largest relative to the
    median shape (in mm where it ties), as nnU-Net shrinks its initial patch; an axis at ``floor``
    stays there while the others shrink."""
    median = [max(int(round(s)), 1) for s in fingerprint.median_shape]
    patch = [float(v) for v in median]
    if spatial_dims == 2:
        patch[2] = 1.0
    axes = (0, 1) if spatial_dims == 2 else (0, 1, 2)
    seen: set[tuple[int, int, int]] = set()
    while True:
        network = network_for([int(round(p)) for p in patch], fingerprint.target_spacing, spatial_dims, 1)
        rounded_below = any(p < f for p, f in zip(network.patch, floor))  # the pooling's multiple undercut it
        if network.patch not in seen and not rounded_below:
            seen.add(network.patch)
            yield network.patch
        least = [max(2 * MIN_FEATURE_SIZE, floor[a]) for a in range(3)]
        shrinkable = [a for a in axes if patch[a] > least[a]]
        if not shrinkable:
            return
        ratio = {a: (patch[a] / median[a], patch[a] * fingerprint.target_spacing[a]) for a in shrinkable}
        axis = max(shrinkable, key=lambda a: ratio[a])
        patch[axis] = max(patch[axis] * 0.85, least[axis])


def memory_gb(network: Network, batch: int) -> float:
    """Activation memory estimate of a training step under mixed precision (weights are small beside it)."""
    return batch * network.activations() * BYTES_PER_ACTIVATION / 1e9


def batch_cap(fingerprint: Fingerprint, network: Network) -> int:
    """nnU-Net: one step sees at most 5% of the dataset's voxels (at least 2 samples)."""
    return max(2, int(0.05 * fingerprint.dataset_voxels / float(np.prod(network.patch))))


def planned_dims(median_shape: Sequence[float]) -> int:
    """3D unless the median image is thinner than two pooling steps' worth of slices (then 2D slices)."""
    return 2 if median_shape[2] < 2 * MIN_FEATURE_SIZE else 3


def context_floor(fingerprint: Fingerprint, dims: int) -> tuple[float, float, float]:
    """The least patch per axis a budget may shrink to (2D: one slice deep)."""
    floor = [min(CONTEXT_SHARE * size, CONTEXT_CAP) for size in fingerprint.median_shape]
    if dims == 2:
        floor[2] = 1.0
    return floor[0], floor[1], floor[2]
