"""Optimiser and learning-rate schedule: what turns progress into a learning rate."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


class Schedule:
    """Learning rate over training progress: poly (nnU-Net, exponent 0.9), cosine or constant.

    Progress is iterations done / ``train.iterations`` and nothing else: the planner turns the time
    budget into an iteration count before the loop starts, so the clock never reaches the weights
    (the same plan and seed give the same weights on a busy machine too).
    Hand-written so that a checkpoint restores it with the rest of the run state.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str) -> None:
        self.optimizer = optimizer
        self.kind = kind
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self.progress = 0.0

    def factor(self, progress: float) -> float:
        progress = min(max(progress, 0.0), 1.0)
        if self.kind == "poly":
            return (1.0 - progress) ** 0.9
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    def step(self, progress: float) -> float:
        """Set the learning rate for the next step and return it (progress never goes back)."""
        self.progress = max(self.progress, float(progress))
        factor = self.factor(self.progress)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        return self.base_lrs[0] * factor

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "base_lrs": list(self.base_lrs), "progress": self.progress}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.kind, self.base_lrs, self.progress = state["kind"], list(state["base_lrs"]), float(state["progress"])


def make_optimizer(model: nn.Module, cfg_train: Mapping[str, Any]) -> torch.optim.Optimizer:
    """AdamW, Adam, or nnU-Net's SGD (Nesterov, momentum 0.99) from the train section."""
    kind, lr, decay = cfg_train["optimizer"], cfg_train["learning_rate"], cfg_train["weight_decay"]
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.99, nesterov=True, weight_decay=decay)
    optimizer_class = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    return optimizer_class(model.parameters(), lr=lr, weight_decay=decay)


def progress(iteration: int, total: int) -> float:
    """Training progress for the schedule: iterations done over the planned iterations."""
    return iteration / max(total, 1)
