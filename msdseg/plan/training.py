"""The training plan: network, patch, batch, sampler and iterations from the data, the device and the budget.

nnU-Net configures itself from the dataset's fingerprint; msdseg does the same and also fits the
device the training job gets and the time the user gives it (``train.max_minutes``):

- the network follows the patch and the spacing (pooling per axis while an axis is at least 8
  voxels and not much coarser than the finest one, as nnU-Net), width 32 doubling to 320;
- on a GPU the patch shrinks from the median image until an activation-memory estimate at batch 2
  fits nnU-Net's reference budget (so patches stay near nnU-Net's), and the rest of the memory
  buys batch size (capped at 5% of the dataset's voxels per step, nnU-Net's rule);
- on a CPU (and on any device, for the iteration count) a short measured probe of step time picks
  the largest patch and width that still allow :data:`TARGET_ITERATIONS` steps in the budget;
- the budget becomes recorded numbers (iterations, validation and checkpoint cadence) before the
  loop starts, so the schedule never reads the clock and the same plan and seed give the same
  weights however busy the machine is.

Every value carries a one-line reason; values the user set are kept and marked ``user``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from msdseg.config import PLANNED_KEYS  # noqa: F401  (re-exported: the planner's keys)
from msdseg.decathlon import foreground_labels
from msdseg.errors import PlanError
from msdseg.plan.budget import _fit_budget, _plan_budget
from msdseg.plan.fingerprint import DeviceSpec, Fingerprint
from msdseg.plan.network import (
    BASE_CHANNELS,
    MAX_CPU_BATCH,
    REFERENCE_MEMORY_GB,
    Network,
    batch_cap,
    candidate_patches,
    context_floor,
    memory_gb,
    network_for,
    planned_dims,
)
from msdseg.plan.record import StepProbe, TrainingPlan

if TYPE_CHECKING:  # annotations only: planning a known task's table needs no pandas or torch
    pass


def plan_training(fingerprint: Fingerprint, device: DeviceSpec, budget_minutes: float,
                  user: Mapping[str, Any], probe: StepProbe | None = None, n_folds: int = 5,
                  cpu_native_bf16: bool = False) -> TrainingPlan:
    """The training plan (see the module docstring). ``probe(network, batch)`` measures a step; without
    one (a table from published fingerprints) the iteration count is left to the train job."""
    plan = TrainingPlan(device=device, budget_minutes=float(budget_minutes),
                        fingerprint={"median_shape": [round(v, 1) for v in fingerprint.median_shape],
                                     "target_spacing": list(fingerprint.target_spacing),
                                     "n_channels": fingerprint.n_channels, "n_training": fingerprint.n_training,
                                     "labels": {str(k): v for k, v in fingerprint.labels.items()}})
    dims = plan.put("model.spatial_dims", planned_dims(fingerprint.median_shape),
                    "3D unless thinner than 8 slices (Task04, 15 CPU min: 3D beat 2D by 0.02 Dice)", user)
    _plan_sampling(plan, fingerprint, user)
    network, batch, step_s = _plan_network(plan, fingerprint, device, user, int(dims), probe)
    _plan_queue(plan, fingerprint, network, batch, user)
    plan.put("model.strides", [list(s) for s in network.strides],
             "pool an axis while >= 8 voxels and not > 2x coarser than the finest (nnU-Net)", user)
    precision = "auto" if device.type == "cuda" else ("bf16" if cpu_native_bf16 else "fp32")
    plan.put("train.precision", precision, "CUDA: bf16 where native, else fp16; CPU: bf16 only where native", user)
    plan.seconds_per_step = step_s
    _plan_budget(plan, fingerprint, network, batch, step_s, n_folds, user)
    return plan


def _plan_sampling(plan: TrainingPlan, fingerprint: Fingerprint, user: Mapping[str, Any]) -> None:
    present = [k for k in foreground_labels(fingerprint.labels) if k not in fingerprint.absent_labels]
    probabilities = {0: round(2 / 3, 4), **{k: round(1 / 3 / max(len(present), 1), 4) for k in present},
                     **dict.fromkeys(fingerprint.absent_labels, 0.0)}
    absent = f"; none for {list(fingerprint.absent_labels)}, absent from every training label" \
        if fingerprint.absent_labels else ""
    plan.put("train.label_probabilities", dict(sorted(probabilities.items())),
             "a third of the patches centred on foreground, spread over its classes (nnU-Net's oversampling)"
             + absent, user)
    plan.put("train.class_weights", None, "no class weights: the Dice term balances classes (nnU-Net)", user)


def _plan_queue(plan: TrainingPlan, fingerprint: Fingerprint, network: Network, batch: int,
                user: Mapping[str, Any]) -> None:
    """Patches drawn per loaded volume, and the queue that holds a few batches of them."""
    if network.spatial_dims == 2:
        samples = min(max(round(fingerprint.median_shape[2] / 2), 4), 32)
        reason = "half the slices of a median volume (4-32): loading a volume costs more than a slice"
    else:
        volume = fingerprint.median_voxels or float(np.prod(fingerprint.median_shape))
        samples = min(max(round(volume / float(np.prod(network.patch)) / 4), 1), 16)
        reason = "a quarter of the patches that tile a median volume (1-16): more would be near copies"
    samples = int(plan.put("train.samples_per_volume", samples, reason, user))
    plan.put("train.queue_length", max(4 * batch, 2 * samples), "four batches, at least two volumes' patches", user)


def _plan_network(plan: TrainingPlan, fingerprint: Fingerprint, device: DeviceSpec, user: Mapping[str, Any],
                  dims: int, probe: StepProbe | None) -> tuple[Network, int, float | None]:
    """Patch, width, depth and batch: on a GPU by memory, on a CPU the largest that leaves
    TARGET_ITERATIONS in the budget. Returns the network, the batch and its measured step time."""
    fixed_patch = user.get("train.patch_size")
    # a CPU budget stops shrinking at the context floor (a GPU's memory never gets near it)
    floor = context_floor(fingerprint, dims) if device.type == "cpu" and probe is not None else (0.0, 0.0, 0.0)
    patches = [tuple(int(p) for p in fixed_patch)] if fixed_patch else list(candidate_patches(fingerprint, dims, floor))
    widths = [int(user["model.base_channels"])] if "model.base_channels" in user else (
        [BASE_CHANNELS] if device.type == "cuda" else [BASE_CHANNELS, BASE_CHANNELS // 2])
    networks = [network_for(patch, fingerprint.target_spacing, dims, width) for patch in patches for width in widths]
    step_s: float | None = None
    if device.type == "cuda":
        network, reason = _fit_memory(networks, device)
        batch = _gpu_batch(fingerprint, network, device)
    elif probe is None:
        network, reason = networks[0], "no probe: the largest candidate"
        batch = min(batch_cap(fingerprint, network), MAX_CPU_BATCH[dims])
    else:
        network, batch, step_s, reason = _fit_budget(networks, fingerprint, plan, dims, probe)
    patch = plan.put("train.patch_size", list(network.patch), reason, user)
    width = plan.put("model.base_channels", network.base_channels, "32 doubling to 320 (nnU-Net)"
                     if device.type == "cuda" else "the widest that fits the budget (32 or 16)", user)
    chosen = network_for(patch, fingerprint.target_spacing, dims, int(width))
    plan.put("model.depth", chosen.depth, "pooling steps until an axis falls below 8 voxels (nnU-Net)", user)
    planned_batch = int(plan.put("train.batch_size", batch, "fills the GPU memory estimate, at most 5% of the "
                                 "dataset per step" if device.type == "cuda" else
                                 f"at most 5% of the dataset per step, {MAX_CPU_BATCH[dims]} at most on a CPU", user))
    if probe is not None and (chosen != network or planned_batch != batch or step_s is None):
        step_s = probe(chosen, planned_batch)  # the user changed what was measured: measure what will train
    return chosen, planned_batch, step_s


def _fit_memory(networks: Sequence[Network], device: DeviceSpec) -> tuple[Network, str]:
    """The first (largest) network whose activation estimate at batch 2 fits the reference budget."""
    limit = min(REFERENCE_MEMORY_GB, 0.85 * device.memory_gb)
    for network in networks:
        if memory_gb(network, 2) <= limit:
            return network, f"largest patch whose estimate at batch 2 fits {limit:.1f} GB (nnU-Net's reference)"
    smallest = networks[-1]
    raise PlanError(f"no patch fits the GPU: the smallest, {list(smallest.patch)} at batch 2, needs about "
                    f"{memory_gb(smallest, 2):.1f} GB of {device.memory_gb:.0f} GB; set plan.gpu_memory_gb "
                    "if the training GPU is larger, or train.patch_size and model.base_channels smaller.")


def _gpu_batch(fingerprint: Fingerprint, network: Network, device: DeviceSpec) -> int:
    fits = int(0.85 * device.memory_gb / max(memory_gb(network, 1), 1e-9))
    return max(2, min(fits, batch_cap(fingerprint, network)))
