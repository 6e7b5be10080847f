"""The processes that train one model: a single process is a world of one.

Every collective is a no-op in a world of one, so the training loop reads the same with and
without DistributedDataParallel; only this module knows the difference.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from msdseg.files import atomic_path
from msdseg.train.state import seed_everything

# Diagnostics of DDP runs (tests): when set (not "0"), each rank writes DDP_DIAGNOSTICS.format(rank=r)
# into out_dir: the subject ids its queue drew per epoch and a hash of its weights after steps 1 and last.
DDP_DIAGNOSTICS_ENV = "MSDSEG_DDP_DIAGNOSTICS"
DDP_DIAGNOSTICS = "ddp_diagnostics_rank{rank}.json"


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes; ``device`` holds collectives' tensors."""

    rank: int
    world: int
    device: torch.device

    @classmethod
    def single(cls, device: torch.device) -> Ranks:
        return cls(0, 1, device)

    @property
    def lead(self) -> bool:
        """Rank 0 validates and writes the files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def from_lead(self, values: Sequence[float]) -> list[float]:
        """Rank 0's values on every rank (its clock: all ranks stop and anneal alike)."""
        if not self.distributed:
            return [float(v) for v in values]
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.broadcast(tensor, 0)
        return [float(v) for v in tensor.tolist()]

    def mean(self, value: float) -> float:
        """The mean over ranks (the logged loss; every rank judges divergence alike)."""
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return float(tensor) / self.world

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def wrap(self, model: nn.Module) -> nn.Module:
        """What trains: the model itself, or DDP around it (the unwrapped one validates and is saved)."""
        if not self.distributed:
            return model
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def reseed(self, seed: int, iteration: int) -> None:
        """Per-rank augmentation and patch draws (a resumed run's checkpoint holds rank 0's RNG only)."""
        if self.distributed:
            seed_everything(seed + self.rank + 1_000_003 * iteration)

    def subject_sampler(self, subjects: Sequence[Any], seed: int) -> DistributedSampler | None:
        """This rank's share of the subjects, reshuffled alike on all ranks every pass; None in a world of one."""
        if not self.distributed:
            return None
        return DistributedSampler(subjects, num_replicas=self.world, rank=self.rank, shuffle=True, seed=seed)


def weights_hash(model: nn.Module) -> str:
    """sha256 of the parameters (what DDP keeps equal across ranks)."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        digest.update(name.encode())
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Diagnostics:
    """What a DDP test checks: the subjects each rank drew and its weights' hash after step 1 and the last."""

    ranks: Ranks
    enabled: bool = False
    hashes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def for_ranks(cls, ranks: Ranks) -> Diagnostics:
        return cls(ranks, ranks.distributed and os.environ.get(DDP_DIAGNOSTICS_ENV, "0") not in ("", "0"))

    def after_step(self, iteration: int, model: nn.Module) -> None:
        if self.enabled and iteration == 1:
            self.hashes["1"] = weights_hash(model)

    def write(self, out_dir: Path, iteration: int, subjects_per_epoch: list[list[str]], model: nn.Module) -> None:
        if not self.enabled:
            return
        record = {"rank": self.ranks.rank, "world_size": self.ranks.world, "iterations": iteration,
                  "subjects_per_epoch": subjects_per_epoch,
                  "weights_sha256": {**self.hashes, str(iteration): weights_hash(model)}}
        with atomic_path(out_dir / DDP_DIAGNOSTICS.format(rank=self.ranks.rank)) as tmp:
            Path(tmp).write_text(json.dumps(record, indent=1))
