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

import csv
import io
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from msdseg.config import PLANNED_KEYS  # noqa: F401  (re-exported: the planner's keys)
from msdseg.decathlon import TaskInfo, foreground_labels, label_map
from msdseg.devices import default_device
from msdseg.errors import ConfigError
from msdseg.plan import median_target_spacing

if TYPE_CHECKING:  # annotations only: planning a known task's table needs no pandas or torch
    import pandas as pd
    import torch

MIN_FEATURE_SIZE = 4  # nnU-Net: stop pooling an axis when its feature map would fall below this
MAX_DEPTH = 5
BASE_CHANNELS = 32
MAX_CHANNELS = 320
# activation memory per (voxel x channel) of the U-Net at one sample, bytes, under mixed precision:
# feature maps and their gradients of every conv, norm and activation of encoder and decoder.
# Calibrated so that nnU-Net's Task03 plan (128^3, 32 -> 320 channels, batch 2) is about 10 GB.
BYTES_PER_ACTIVATION = 56.0
REFERENCE_MEMORY_GB = 10.0  # the patch is sized against this, more memory buys batch size
TARGET_ITERATIONS = 1500  # the fewest steps a budget should buy on a slow device
USABLE_SHARE = 0.9  # of the budget: start-up, queue filling and checkpoints take the rest
# a probe times the network on random tensors; in training the patch queue's workers share the
# machine (Task04 on 2 CPU cores, one queue worker: median step 0.38 s against a 0.28 s probe, 19% of
# it waiting for data)
PIPELINE_OVERHEAD = {"cpu": 1.4, "cuda": 1.1}
VALIDATIONS = 5  # validations (learning-curve points) a budget should allow
# a short budget buys fewer steps, not smaller patches below this context: half the median image per
# axis, at most 48 voxels (Task04 in 3 CPU minutes: a 12x16x14 patch with 1500 steps scored 0.45/0.62)
CONTEXT_SHARE, CONTEXT_CAP = 0.5, 48
MAX_CPU_BATCH = {3: 4, 2: 32}  # volumes per step on a CPU; 2D steps take a batch of slices


class PlanError(ConfigError):
    """The plan cannot fit the device or the budget; the message names the numbers and the key."""


@dataclass(frozen=True)
class Fingerprint:
    """What the planner knows of a dataset: shapes after resampling, spacing, channels, labels."""

    median_shape: tuple[float, float, float]  # voxels on the target grid
    target_spacing: tuple[float, float, float]
    n_channels: int
    labels: dict[int, str]
    n_training: int
    median_voxels: float = 0.0  # per image on the target grid (0: the median shape's product)
    absent_labels: tuple[int, ...] = ()  # foreground classes no training subject has a voxel of

    @property
    def dataset_voxels(self) -> float:
        return self.n_training * (self.median_voxels or float(np.prod(self.median_shape)))

    @classmethod
    def from_manifest(cls, manifest: pd.DataFrame, plan: Mapping[str, Any]) -> Fingerprint:
        """From manifest.csv's training rows and plan.json's target spacing."""
        training = manifest[manifest["role"] == "train"]
        shapes = np.array([list(s) for s in training["shape"]], dtype=np.float64)
        spacings = np.array([list(s) for s in training["spacing"]], dtype=np.float64)
        target = plan.get("target_spacing")
        target_spacing = np.median(spacings, axis=0) if target is None else np.array(target, dtype=np.float64)
        resampled = shapes * spacings / target_spacing
        labels = label_map(plan["labels"])
        absent = tuple(k for k in foreground_labels(labels)
                       if f"voxels_{k}" in training and not (training[f"voxels_{k}"] > 0).any())
        return cls(tuple(float(v) for v in np.median(resampled, axis=0)),  # type: ignore[arg-type]
                   tuple(float(v) for v in target_spacing), int(plan.get("n_channels", 1)),  # type: ignore[arg-type]
                   labels, len(training), float(np.median(np.prod(resampled, axis=1))), absent)


def published_fingerprint(info: TaskInfo) -> Fingerprint:
    """A known task's fingerprint from the task table (no data needed), with nnU-Net's spacing rule."""
    spacing = np.array(info.median_spacing, dtype=np.float64)
    shape = np.array(info.median_shape, dtype=np.float64)
    coarse = int(np.argmax(spacing))
    spacings = np.tile(spacing, (2, 1))
    if info.coarse_p10_spacing is not None:  # the 10th percentile, as a two-row stand-in for the distribution
        spacings[:, coarse] = [info.coarse_p10_spacing, info.coarse_p10_spacing]
    target = np.array(median_target_spacing(spacings, np.tile(shape, (2, 1))), dtype=np.float64)
    target[coarse] = spacing[coarse] if info.coarse_p10_spacing is None else target[coarse]
    resampled = shape * spacing / target
    labels = dict(enumerate(info.labels))
    return Fingerprint(tuple(float(v) for v in resampled), tuple(float(v) for v in target),  # type: ignore[arg-type]
                       info.channels, labels, info.n_training)


@dataclass(frozen=True)
class DeviceSpec:
    """The device the training job will get: ``cuda`` with its memory, or ``cpu`` with its threads."""

    type: str
    threads: int = 1
    memory_gb: float = 0.0
    name: str = ""

    def describe(self) -> str:
        if self.type == "cuda":
            return f"GPU {self.name or 'cuda'} ({self.memory_gb:.0f} GB)"
        return f"CPU, {self.threads} thread(s)"


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


@dataclass
class Setting:
    """One planned value, where it came from and why."""

    value: Any
    source: str  # "planned" or "user"
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"value": self.value, "source": self.source, "reason": self.reason}


@dataclass
class TrainingPlan:
    """Every planned key with its reason, plus what the planner measured."""

    settings: dict[str, Setting] = field(default_factory=dict)
    device: DeviceSpec = field(default_factory=lambda: DeviceSpec("cpu"))
    budget_minutes: float = 0.0
    seconds_per_step: float | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict)

    def put(self, key: str, value: Any, reason: str, user: Mapping[str, Any]) -> Any:
        """Record ``value`` for ``key`` unless the user set it; returns the value that holds."""
        if key in user:
            self.settings[key] = Setting(user[key], "user", "set in the config")
        else:
            self.settings[key] = Setting(value, "planned", reason)
        return self.settings[key].value

    def value(self, key: str) -> Any:
        return self.settings[key].value

    def as_dict(self) -> dict[str, Any]:
        return {"device": vars(self.device), "budget_minutes": self.budget_minutes,
                "seconds_per_step": self.seconds_per_step, "fingerprint": self.fingerprint,
                "settings": {k: s.as_dict() for k, s in self.settings.items()}}

    @classmethod
    def from_dict(cls, training_plan: Mapping[str, Any]) -> TrainingPlan:
        """Back from training_plan.json (what the table and the CSV show)."""
        return cls(settings={k: Setting(**s) for k, s in training_plan["settings"].items()},
                   device=DeviceSpec(**training_plan.get("device", {"type": "cpu"})),
                   budget_minutes=float(training_plan.get("budget_minutes", 0.0)),
                   seconds_per_step=training_plan.get("seconds_per_step"),
                   fingerprint=dict(training_plan.get("fingerprint", {})))

    def csv(self) -> str:
        """key,value,source,reason rows (the HTML report's table)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["key", "value", "source", "reason"])
        writer.writerows([k, json.dumps(s.value), s.source, s.reason] for k, s in self.settings.items())
        return buffer.getvalue()

    def table(self) -> str:
        """A fixed-width table for the job log."""
        rows = [(k, str(s.value), s.source, s.reason) for k, s in self.settings.items()]
        widths = [max(len(r[i]) for r in rows + [("key", "value", "source", "reason")]) for i in range(3)]
        lines = [f"{'key':<{widths[0]}}  {'value':<{widths[1]}}  {'source':<{widths[2]}}  reason"]
        lines += [f"{k:<{widths[0]}}  {v:<{widths[1]}}  {s:<{widths[2]}}  {r}" for k, v, s, r in rows]
        return "\n".join(lines)


StepProbe = Any  # Callable[[Network, int], float]: seconds per training step, measured


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
    dims = plan.put("model.spatial_dims", 2 if fingerprint.median_shape[2] < 2 * MIN_FEATURE_SIZE else 3,
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


MAX_PROBES = 4  # real measurements while searching: bounds the plan job's time


def _fit_budget(networks: Sequence[Network], fingerprint: Fingerprint, plan: TrainingPlan, dims: int,
                probe: StepProbe) -> tuple[Network, int, float, str]:
    """The largest network whose measured step leaves TARGET_ITERATIONS in the budget.

    A cost model (fixed + per multiply-add, from two measured reference networks) skips the
    candidates that cannot fit; the first that may fit is measured for real, up to MAX_PROBES.
    """
    budget_s = plan.budget_minutes * 60.0 * USABLE_SHARE
    overhead = PIPELINE_OVERHEAD.get(plan.device.type, 1.2)
    floor = context_floor(fingerprint, dims)  # where candidate_patches stopped shrinking
    fixed, per_flop = _calibrate(probe, fingerprint, dims)
    probes, last = 0, None
    for network in networks:
        batch = min(batch_cap(fingerprint, network), MAX_CPU_BATCH[dims])
        estimate = fixed + per_flop * 3 * batch * network.flops(fingerprint.n_channels)
        if budget_s / (estimate * overhead) < TARGET_ITERATIONS and network is not networks[-1]:
            continue
        measured = probe(network, batch)
        probes += 1
        last = (network, batch, measured)
        if budget_s / (measured * overhead) >= TARGET_ITERATIONS or probes >= MAX_PROBES:
            break
    assert last is not None
    network, batch, measured = last
    if budget_s / (measured * overhead) >= TARGET_ITERATIONS:
        return network, batch, measured, (f"largest patch/width with >= {TARGET_ITERATIONS} steps in the budget "
                                          f"(measured {measured:.3f} s/step)")
    return network, batch, measured, (f"the smallest patch with the context a segmentation needs (>= "
                                      f"{[round(f) for f in floor]}: half the median image, <= {CONTEXT_CAP}); "
                                      f"the budget buys fewer than {TARGET_ITERATIONS} steps of it "
                                      f"(measured {measured:.3f} s/step)")


def context_floor(fingerprint: Fingerprint, dims: int) -> tuple[float, float, float]:
    """The least patch per axis a budget may shrink to (2D: one slice deep)."""
    floor = [min(CONTEXT_SHARE * size, CONTEXT_CAP) for size in fingerprint.median_shape]
    if dims == 2:
        floor[2] = 1.0
    return floor[0], floor[1], floor[2]


def _calibrate(probe: StepProbe, fingerprint: Fingerprint, dims: int) -> tuple[float, float]:
    """(fixed seconds per step, seconds per multiply-add) from two measured reference networks."""
    sizes = ([24, 24, 24], [40, 40, 40]) if dims == 3 else ([48, 48, 1], [128, 128, 1])
    points = []
    for size in sizes:
        reference = network_for(size, fingerprint.target_spacing, dims, 16)
        points.append((3 * 4 * reference.flops(fingerprint.n_channels), probe(reference, 4)))
    (work_a, time_a), (work_b, time_b) = points
    per_flop = max((time_b - time_a) / max(work_b - work_a, 1.0), 1e-15)
    return max(time_a - per_flop * work_a, 0.0), per_flop


def _gpu_batch(fingerprint: Fingerprint, network: Network, device: DeviceSpec) -> int:
    fits = int(0.85 * device.memory_gb / max(memory_gb(network, 1), 1e-9))
    return max(2, min(fits, batch_cap(fingerprint, network)))


def case_validation_seconds(fingerprint: Fingerprint, network: Network, batch: int, step_s: float) -> float:
    """One median case's validation: grid patches (half overlap) x a forward pass (~1/3 of a step per sample)."""
    patches = 1
    for size, patch in zip(fingerprint.median_shape, network.patch):
        step = max(patch - (patch // 2 - (patch // 2) % 2), 1)
        patches *= max(1, math.ceil(max(size - patch, 0) / step) + 1)
    return patches * step_s / (3 * batch)


def _plan_budget(plan: TrainingPlan, fingerprint: Fingerprint, network: Network, batch: int,
                 step_s: float | None, n_folds: int, user: Mapping[str, Any], pace: Any = None) -> None:
    """Iterations and cadence from the measured step time and the budget (recorded, never re-read from the clock).

    ``pace`` (:class:`msdseg.train.probe.Pace`): the whole pipeline measured; without it the step
    probe is scaled by the data queue's usual share (PIPELINE_OVERHEAD)."""
    if step_s is None:
        plan.put("train.iterations", None, "settled by the train job's probe on its device", user)
        plan.put("train.validate_every", None, "a fifth of the iterations", user)
        plan.put("train.checkpoint_every", None, "a twentieth of the iterations", user)
        return
    budget_s = plan.budget_minutes * 60.0 * USABLE_SHARE
    per_case = case_validation_seconds(fingerprint, network, batch, step_s)
    if pace is None:
        step_s = step_s * PIPELINE_OVERHEAD.get(plan.device.type, 1.2)  # a training step beside its data queue
        measured = "probe, with the data queue's usual share"
    else:
        step_s, budget_s = pace.step_s, budget_s - pace.startup_s
        measured = f"{pace.steps} steps with the patch queue measured; {pace.startup_s:.0f} s to start"
    if per_case > 0.5 * budget_s:
        raise PlanError(f"train.max_minutes {plan.budget_minutes} is too short: validating one case "
                        f"(~{per_case:.0f} s at {step_s:.2f} s/step) would take over half of it; raise "
                        "train.max_minutes.")
    fold_cases = max(1, fingerprint.n_training // max(n_folds, 1))
    # all of the fold's cases where VALIDATIONS of them take at most 20% of the budget, else fewer
    affordable = max(1, int(0.2 * budget_s / VALIDATIONS / per_case))
    cases = int(plan.put("train.validation_cases", min(fold_cases, affordable),
                         f"validations take <= 20% of the budget (~{per_case:.1f} s per case); the infer "
                         "rules still predict every case", user) or fold_cases)
    one_validation = per_case * min(cases, fold_cases)
    validations = max(1, min(VALIDATIONS, int(0.3 * budget_s / max(one_validation, 1e-9))))
    iterations = max(1, int((budget_s - validations * one_validation) / step_s))
    iterations = int(plan.put("train.iterations", iterations,
                              f"{plan.budget_minutes} min x {USABLE_SHARE:.0%} at {step_s:.3f} s/step ({measured}), "
                              f"less {validations} validation(s) of ~{one_validation:.0f} s", user))
    plan.put("train.validate_every", max(1, math.ceil(iterations / validations)),
             f"{validations} learning-curve point(s) within the budget", user)
    plan.put("train.checkpoint_every", max(1, math.ceil(iterations / 20)),
             "20 resumable checkpoints per run", user)


def probe_step_seconds(network: Network, batch: int, n_channels: int, n_classes: int, device: torch.device,
                       precision: str = "fp32", steps: int = 4, warmup: int = 2) -> float:
    """Median seconds of a real training step (forward, loss, backward, AdamW) on random data."""
    import torch  # the planner's table needs no torch; a probe does

    from msdseg.inference import autocast_dtype
    from msdseg.model import UNet
    from msdseg.train.loss import segmentation_loss

    model = UNet(network.spatial_dims, n_channels, n_classes, network.base_channels, network.depth,
                 strides=[list(s) for s in network.strides]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dtype = autocast_dtype(precision, device)
    x = torch.randn(batch, n_channels, *network.patch, device=device)
    y = torch.randint(0, n_classes, (batch, *network.patch), device=device)
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x)
        loss = segmentation_loss(logits, y, "ce+dice")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        float(loss.item())
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return float(statistics.median(times))


def apply_plan(config: Mapping[str, Any], plan: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with every setting of a training plan (training_plan.json) in its model/train sections."""
    result = {section: dict(config[section]) if isinstance(config.get(section), Mapping) else config[section]
              for section in config}
    for key, setting in plan["settings"].items():
        section, name = key.split(".", 1)
        if setting["value"] is not None or name in ("class_weights", "label_probabilities"):
            result[section][name] = setting["value"]
    return result


def detect_device(requested: str, threads: int, gpu_memory_gb: float | None) -> tuple[DeviceSpec, bool]:
    """The device the train job will get, and whether it is this machine's (so a probe here is real).

    ``auto``: this machine's (CUDA when present). ``cuda`` on a machine without one (a cluster's
    login node plans for a GPU node): ``plan.gpu_memory_gb`` sizes the patch, and the train job
    settles the iteration count with a probe on its GPU.
    """
    import torch  # device queries only

    here = "cuda" if torch.cuda.is_available() else "cpu"
    kind = here if requested == "auto" else requested
    if kind == "cpu":
        return DeviceSpec("cpu", threads=max(int(threads), 1)), True
    if here == "cuda":
        props = torch.cuda.get_device_properties(0)
        memory = gpu_memory_gb or props.total_memory / 1e9
        return DeviceSpec("cuda", threads=max(int(threads), 1), memory_gb=float(memory), name=props.name), True
    if not gpu_memory_gb:
        raise PlanError("config key 'plan.device' is cuda but this machine has no GPU to measure; set "
                        "plan.gpu_memory_gb to the training GPU's memory (e.g. 24), or plan.device: auto.")
    return DeviceSpec("cuda", threads=max(int(threads), 1), memory_gb=float(gpu_memory_gb)), False


def torch_probe(fingerprint: Fingerprint, device: torch.device, precision: str) -> StepProbe:
    """A probe for :func:`plan_training`: real training steps of a network on ``device``."""
    def probe(network: Network, batch: int) -> float:
        return probe_step_seconds(network, batch, fingerprint.n_channels, len(fingerprint.labels), device, precision)
    return probe


def _planned_network(training_plan: Mapping[str, Any]) -> Network:
    """The network a training_plan.json describes."""
    settings = training_plan["settings"]
    return network_for(settings["train.patch_size"]["value"], training_plan["fingerprint"]["target_spacing"],
                       int(settings["model.spatial_dims"]["value"]), int(settings["model.base_channels"]["value"]))


def settle_budget(training_plan: Mapping[str, Any], probe_seconds: float | None, n_folds: int,
                  pace: Any = None) -> dict[str, Any]:
    """Fill (or refill) a plan's iteration count and cadence from a measured step (``None``: the plan's
    own probe) and, where measured, the whole pipeline's ``pace``."""
    settings = training_plan["settings"]
    fp = training_plan["fingerprint"]
    fingerprint = Fingerprint(tuple(fp["median_shape"]), tuple(fp["target_spacing"]), int(fp["n_channels"]),
                              label_map(fp["labels"]), int(fp["n_training"]))
    plan = TrainingPlan(budget_minutes=float(training_plan["budget_minutes"]),
                        device=DeviceSpec(**training_plan["device"]))
    user = {k: s["value"] for k, s in settings.items() if s["source"] == "user"}
    seconds = training_plan["seconds_per_step"] if probe_seconds is None else probe_seconds
    _plan_budget(plan, fingerprint, _planned_network(training_plan), int(settings["train.batch_size"]["value"]),
                 seconds, n_folds, user, pace)
    settled = {k: s.as_dict() for k, s in plan.settings.items()}
    paced = {} if pace is None else {"pipeline_seconds_per_step": pace.step_s, "startup_seconds": pace.startup_s}
    return {**training_plan, "seconds_per_step": seconds, **paced, "settings": {**settings, **settled}}


def settle_here(training_plan: Mapping[str, Any], n_folds: int, pace: Callable[[dict[str, Any]], Any] | None = None
                ) -> dict[str, Any]:
    """The train job's half of a plan made for another machine: probe the chosen network here, fill the
    budget; ``pace(plan)``, when given, then measures the whole pipeline under that plan."""
    settings, fp = training_plan["settings"], training_plan["fingerprint"]
    seconds = probe_step_seconds(_planned_network(training_plan), int(settings["train.batch_size"]["value"]),
                                 int(fp["n_channels"]), len(fp["labels"]), default_device(),
                                 str(settings["train.precision"]["value"]))
    settled = settle_budget(training_plan, seconds, n_folds)
    return settled if pace is None else settle_budget(settled, None, n_folds, pace(settled))


def plan_table(training_plan: Mapping[str, Any]) -> str:
    """training_plan.json as the fixed-width table the logs show."""
    return TrainingPlan.from_dict(training_plan).table()
