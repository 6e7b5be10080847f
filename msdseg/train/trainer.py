"""Patch-queue training of one fold: resumable, reproducible, on the GPU when there is one.

Writes ``out_dir/model.pt`` (the kept weights + everything inference needs, see docs/design.md),
``out_dir/training_log.csv`` and, while running, ``out_dir/checkpoint.pt``.

Modules, one concern each: :mod:`~msdseg.train.loop` (one fold's loop), :mod:`~msdseg.train.state`
(run identity, RNG, checkpoints), :mod:`~msdseg.train.ranks` (a single process is a world of one),
:mod:`~msdseg.train.spawn` (DDP processes), :mod:`~msdseg.train.schedule`, :mod:`~msdseg.train.loss`,
:mod:`~msdseg.train.validation`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from msdseg.train.loop import run_fold
from msdseg.train.loss import segmentation_loss
from msdseg.train.ranks import DDP_DIAGNOSTICS, DDP_DIAGNOSTICS_ENV
from msdseg.train.schedule import Schedule, make_optimizer
from msdseg.train.spawn import spawn
from msdseg.train.state import CHECKPOINT, LOG, MODEL, config_hash, seed_everything

__all__ = ["CHECKPOINT", "DDP_DIAGNOSTICS", "DDP_DIAGNOSTICS_ENV", "LOG", "MODEL", "Schedule", "config_hash",
           "make_optimizer", "seed_everything", "segmentation_loss", "train"]


def train(train_subjects: Sequence[Mapping[str, Any]], val_subjects: Sequence[Mapping[str, Any]],
          plan: Mapping[str, Any], config: Mapping[str, Any], out_dir: Path, fold: int,
          threads: int = 1, device: str | None = None) -> Path:
    """Train one fold and return the path of model.pt.

    Subjects are mappings with subject, image and label (resampled files). ``device`` None = CUDA
    when available. Process-wide torch settings (threads, determinism, cuDNN) are restored after.
    ``train.devices`` > 1: DDP in that many worker processes (:func:`~msdseg.train.spawn.spawn`).
    """
    devices = int(config["train"]["devices"])
    if devices > 1:
        return spawn(train_subjects, val_subjects, plan, config, Path(out_dir), fold, threads, device, devices)
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    try:
        return run_fold(train_subjects, val_subjects, plan, config, Path(out_dir), fold, threads, device)
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[3], saved[4]
