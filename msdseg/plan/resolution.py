"""The target spacing a CPU budget can afford: full resolution, or nnU-Net's low-resolution idea.

On a CPU a short budget cannot train a patch that covers much of a large image (Spleen, Liver,
Lung, BrainTumour at full resolution). Shrinking the patch loses the context a segmentation needs;
nnU-Net's ``3d_lowres`` configuration instead coarsens the spacing, so that the same number of
voxels covers more of the anatomy. Here the spacing coarsens (the finer axes first, as nnU-Net's
planner does) until the budget affords :data:`TARGET_ITERATIONS` steps of a patch covering half
the median image per axis, estimated from the network's multiply-adds and a CPU rate, or until the
median image is at most twice the CPU planner's context cap per axis (smaller images keep their
context at full resolution: the planner never shrinks the patch below half of them). Predictions
are resampled back to each subject's own geometry as at full resolution.

The decision is made when the workflow's graph is built (a parameter of the ``plan`` rule), from
the manifest, the budget and the device, and only the decided spacing reaches ``plan.json``: a
budget change reruns the resampling only where it changes the spacing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from msdseg.plan.budget import PIPELINE_OVERHEAD, TARGET_ITERATIONS, USABLE_SHARE
from msdseg.plan.network import CONTEXT_CAP, CONTEXT_SHARE, MIN_FEATURE_SIZE, network_for, planned_dims
from msdseg.plan.preprocessing import median_target_spacing

# multiply-adds per second and CPU thread of a U-Net training step (fp32, 16 channels): measured
# 28-47 GMAC/s/thread on this project's 2-core machines (Task04 24x40x24 batch 4: 0.278 s/step;
# BrainTumour 48^3 batch 4: 0.76 s/step). Machines differ ~2.5x; the decision only needs the scale.
CPU_MACS_PER_THREAD_S = 40e9

CONTEXT_WIDTH, CONTEXT_BATCH = 16, 2  # the smallest network and batch the CPU planner considers

COARSEN_STEP = 2 ** (1 / 3)  # per coarsened axis: the image halves in voxels per step when all three coarsen

MAX_COARSENING = 4.0  # of any axis's full-resolution spacing: beyond it small structures vanish


@dataclass(frozen=True)
class Resolution:
    """The plan's target spacing, the full-resolution one it came from, and why."""

    spacing: tuple[float, float, float]
    full_spacing: tuple[float, float, float]
    reason: str

    @property
    def factor(self) -> float:
        """The largest coarsening of any axis (1.0: full resolution)."""
        return float(max(s / f for s, f in zip(self.spacing, self.full_spacing)))

    def as_dict(self) -> dict[str, Any] | None:
        """What plan.json records (None at full resolution); it names no budget, so that a budget
        change that keeps the spacing changes nothing downstream."""
        if self.spacing == self.full_spacing:
            return None
        return {"spacing": list(self.spacing), "full_spacing": [round(v, 4) for v in self.full_spacing],
                "factor": round(self.factor, 3), "reason": self.reason}


def context_steps(median_shape: Sequence[float], spacing: Sequence[float], n_channels: int, threads: int,
                  budget_minutes: float) -> float:
    """Training steps the budget buys of the smallest network on a patch of half the median image per axis."""
    dims = planned_dims(median_shape)
    patch = [max(2 * MIN_FEATURE_SIZE, int(round(CONTEXT_SHARE * s))) for s in median_shape]
    if dims == 2:
        patch[2] = 1
    network = network_for(patch, spacing, dims, CONTEXT_WIDTH)
    macs_per_step = 3 * CONTEXT_BATCH * network.flops(max(n_channels, 1))
    step_s = macs_per_step / (CPU_MACS_PER_THREAD_S * max(threads, 1)) * PIPELINE_OVERHEAD["cpu"]
    return budget_minutes * 60.0 * USABLE_SHARE / step_s


def coarser(spacing: np.ndarray, full_spacing: np.ndarray) -> np.ndarray:
    """One step coarser: axes finer than half the coarsest first (anisotropic data), else all axes
    together; none once an axis has reached MAX_COARSENING (thicker slices alone lose the most)."""
    spacing = spacing.copy()
    room = spacing < MAX_COARSENING * full_spacing - 1e-9
    fine = (spacing < spacing.max() / 2) & room
    step = fine if fine.any() else (room if room.all() else np.zeros_like(room))  # never the coarse axis alone
    spacing[step] = np.minimum(spacing[step] * COARSEN_STEP, MAX_COARSENING * full_spacing[step])
    return spacing


def _coarsen(median_shape: np.ndarray, steps: float) -> bool:
    """Too few steps of the context patch, on an image large enough that the CPU plan would cut its context."""
    return steps < TARGET_ITERATIONS and float(np.max(median_shape)) > 2 * CONTEXT_CAP


def plan_resolution(full_spacing: Sequence[float], full_median_shape: Sequence[float], n_channels: int,
                    device_type: str, threads: int, budget_minutes: float) -> Resolution:
    """Full resolution unless a CPU budget cannot afford half the median image; then the least coarsening that can."""
    full = np.array(full_spacing, dtype=np.float64)
    shape = np.array(full_median_shape, dtype=np.float64)
    full_tuple = tuple(float(v) for v in full)
    steps = context_steps(shape, full, n_channels, threads, budget_minutes) if device_type == "cpu" else float("inf")
    spacing = full
    while _coarsen(shape * full / spacing, steps):
        step = coarser(spacing, full)
        if np.allclose(step, spacing):
            break
        spacing = step
        steps = context_steps(shape * full / spacing, spacing, n_channels, threads, budget_minutes)
    if np.allclose(spacing, full):
        return Resolution(full_tuple, full_tuple, "full resolution")  # type: ignore[arg-type]
    reason = (f"low resolution (nnU-Net's 3d_lowres idea): on the CPU the budget buys under {TARGET_ITERATIONS} "
              f"steps of a patch of half the median image at {[round(v, 4) for v in full_tuple]} mm; coarser "
              f"(the finer axes first, <= {MAX_COARSENING:g}x) until it does or the image is <= {2 * CONTEXT_CAP} "
              "voxels per axis. Predictions are resampled back to each subject's geometry")
    return Resolution(tuple(round(float(v), 4) for v in spacing), full_tuple, reason)  # type: ignore[arg-type]


def resolution_for_cohort(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[float]], n_channels: int,
                          spacing_setting: Any, inplane_size: Any, device_type: str, threads: int,
                          budget_minutes: float) -> dict[str, Any] | None:
    """The ``plan`` rule's decision from the training subjects' spacings and shapes: None at full
    resolution and where the user fixed the spacing (``preprocess.spacing`` a list or null, or
    ``inplane_size`` set): their choice is kept."""
    if spacing_setting != "median" or inplane_size is not None or not len(spacings):
        return None
    spacing_array = np.array([list(s)[:3] for s in spacings], dtype=np.float64)
    shape_array = np.array([list(s)[:3] for s in shapes], dtype=np.float64)
    full = np.array(median_target_spacing(spacing_array, shape_array), dtype=np.float64)
    median_shape = np.median(shape_array * spacing_array / full, axis=0)
    return plan_resolution(full, median_shape, n_channels, device_type, threads, budget_minutes).as_dict()
