"""A run's identity and state: what a checkpoint holds, and when one may be resumed.

A checkpoint is resumed only when it was written for the same training identity
(:func:`config_hash`); it is written atomically, so a run killed at any moment leaves the
previous complete one.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from msdseg.config import identity_settings
from msdseg.files import atomic_path
from msdseg.logs import say

CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
LOG = "training_log.csv"


def config_hash(config: Mapping[str, Any], plan: Mapping[str, Any], fold: int,
                train_ids: Sequence[str], val_ids: Sequence[str], resolved: Mapping[str, str] | None = None) -> str:
    """Identity of a training run: a checkpoint from another identity is not resumed.

    ``resolved``: what the settings became on this machine (device type, precision dtype), so a
    run moved from a bf16 GPU to an fp16 one does not continue another run's optimiser state.
    """
    train_cfg = identity_settings(config["train"])
    identity = {"model": config["model"], "train": train_cfg, "seed": config["seed"], "plan": plan,
                "fold": fold, "train_subjects": list(train_ids), "val_subjects": list(val_ids),
                **({"resolved": dict(resolved)} if resolved else {})}
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and random. Queue workers are seeded by torch's DataLoader from torch's RNG."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and primitives (checkpoints load with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore :func:`rng_state`; CUDA states only for the devices both runs see (2 GPUs -> 1 resumes)."""
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda")
    if cuda_states is not None and torch.cuda.is_available():
        visible = torch.cuda.device_count()
        if len(cuda_states) != visible:
            say(f"checkpoint saw {len(cuda_states)} GPU(s), this job sees {visible}: "
                f"restoring the random state of {min(len(cuda_states), visible)} of them.")
        for index, cuda_state in enumerate(cuda_states[:visible]):
            torch.cuda.set_rng_state(cuda_state, index)
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


@dataclass
class Kept:
    """The weights the run hands over as model.pt: the best validation's, or the last's (train.keep)."""

    score: float = -math.inf
    dice: dict[str, float] = field(default_factory=dict)
    iteration: int = 0
    state_dict: dict[str, torch.Tensor] | None = None

    def offer(self, score: float, dice: Mapping[str, float], iteration: int, model: nn.Module,
              keep_last: bool) -> None:
        """Keep these weights if they are the last wanted or score at least the best (ties: the later)."""
        if keep_last or self.state_dict is None or score >= self.score:
            self.score, self.dice, self.iteration = score, dict(dice), iteration
            self.state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


@dataclass
class RunState:
    """Where a run is: iterations done, time spent by earlier processes, the log so far, the kept weights."""

    iteration: int = 0
    elapsed_before_s: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)
    kept: Kept = field(default_factory=Kept)
    settled: int | None = None  # train.iterations as the run settled it (msdseg.train.settle), once it did
    resettled: bool = False  # the second settlement is made (settled holds its count)


@dataclass
class Trainables:
    """What a checkpoint saves besides the run state: weights, optimiser, schedule, loss scaler."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Any
    scaler: torch.amp.GradScaler


def save_checkpoint(path: Path, identity: str, state: RunState, elapsed_s: float, parts: Trainables) -> None:
    """Write checkpoint.pt atomically (tensors and primitives only)."""
    content = {"config_hash": identity, "iteration": state.iteration, "elapsed_s": elapsed_s,
               "model": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict(),
               "scheduler": parts.schedule.state_dict(), "scaler": parts.scaler.state_dict(),
               "rng": rng_state(), "log": state.rows, "best": dict(vars(state.kept)), "settled": state.settled,
               "resettled": state.resettled}
    with atomic_path(path) as tmp:
        torch.save(content, tmp)


def load_checkpoint(path: Path, expected_hash: str) -> dict[str, Any] | None:
    """The checkpoint if it belongs to this run, else None (and say why)."""
    if not path.is_file():
        return None
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable checkpoint means: start over
        say(f"{path}: unreadable checkpoint ({type(error).__name__}); starting over.")
        return None
    if not isinstance(content, dict) or content.get("config_hash") != expected_hash:
        found = content.get("config_hash") if isinstance(content, dict) else None
        say(f"{path}: checkpoint was written for another training config (hash {found}, now "
            f"{expected_hash}); starting over from iteration 0.")
        return None
    return content


def resume(content: Mapping[str, Any], parts: Trainables) -> RunState:
    """Load a checkpoint's weights, optimiser, schedule, scaler and RNG; return its run state."""
    parts.model.load_state_dict(content["model"])
    parts.optimizer.load_state_dict(content["optimizer"])
    parts.schedule.load_state_dict(content["scheduler"])
    _load_scaler(parts.scaler, content["scaler"])
    set_rng_state(content["rng"])
    return RunState(iteration=int(content["iteration"]), elapsed_before_s=float(content["elapsed_s"]),
                    rows=list(content["log"]), kept=Kept(**dict(content["best"])), settled=content.get("settled"),
                    resettled=bool(content.get("resettled", False)))


def _load_scaler(scaler: torch.amp.GradScaler, saved: Mapping[str, Any]) -> None:
    """A disabled scaler saves ``{}``: switching fp16 on or off starts the scale afresh (and says so)."""
    if bool(saved) == scaler.is_enabled():
        if saved:
            scaler.load_state_dict(saved)
        return
    say(f"checkpoint's loss scaler was {'on' if saved else 'off'} (fp16), now "
        f"{'on' if scaler.is_enabled() else 'off'}: the loss scale starts afresh.")
