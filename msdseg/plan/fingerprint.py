"""What the planner knows of a dataset (the fingerprint) and of the device the training job gets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from msdseg.config import PLANNED_KEYS  # noqa: F401  (re-exported: the planner's keys)
from msdseg.decathlon import TaskInfo, foreground_labels, label_map
from msdseg.errors import PlanError
from msdseg.plan.preprocessing import median_target_spacing

if TYPE_CHECKING:  # annotations only: planning a known task's table needs no pandas or torch
    import pandas as pd


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

    def at_spacing(self, spacing: tuple[float, float, float]) -> Fingerprint:
        """The same images on another grid (a low-resolution plan's)."""
        scale = [old / new for old, new in zip(self.target_spacing, spacing)]
        return replace(self, median_shape=tuple(s * k for s, k in zip(self.median_shape, scale)),  # type: ignore[arg-type]
                       target_spacing=tuple(float(v) for v in spacing),  # type: ignore[arg-type]
                       median_voxels=self.median_voxels * float(np.prod(scale)))

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
