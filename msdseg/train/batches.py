"""Endless training batches (image, label) from the loader ``train.loader`` names."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torchio as tio

from msdseg.data.preprocessed import plan_hash, preprocess_subjects
from msdseg.data.subjects import IMAGE, LABEL, SAMPLING_MAP, check_trainable
from msdseg.errors import ConfigError
from msdseg.logs import say
from msdseg.train.patches import PatchStream, make_patch_loader
from msdseg.train.queue import make_loader, make_queue

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


def worker_count(setting: int | str, threads: int, device_type: str) -> int:
    """``train.num_workers``; auto: on a GPU the job's cores less one for the training process; on a
    CPU one worker beside the training threads (it reads ahead while a step runs)."""
    if setting != "auto":
        return int(setting)
    if device_type == "cuda":
        return max(int(threads) - 1, 1)
    return 1


def preprocessed_rows(rows: Sequence[Mapping[str, Any]], plan: Mapping[str, Any], cfg_train: Mapping[str, Any],
                      folder: Path, seed: int) -> list[dict[str, Any]]:
    """Rows with a ``preprocessed`` folder each; rows without one (API calls) are preprocessed into ``folder``."""
    for row in rows:
        check_trainable(str(row.get("subject", "?")), str(row.get("image")), bool(row.get("label")),
                        bool(row.get(SAMPLING_MAP)), cfg_train["sampler"])
    missing = [row for row in rows if not row.get("preprocessed")]
    if not missing:
        return [dict(row) for row in rows]
    say(f"preprocessing {len(missing)} training subject(s) into {folder} (the workflow's rule "
        "preprocess_training does this once for all folds)")
    done = {row["subject"]: row for row in preprocess_subjects(missing, plan, folder, seed)}
    return [done.get(row["subject"], dict(row)) for row in rows]


def training_batches(run: Any, iteration: int) -> tuple[Any, Batches]:
    """The batch source (patch stream or torchio queue) and endless (image, label) batches from it.

    ``run`` is the fold's :class:`msdseg.train.loop.Fold` (not imported: the loop imports this module).

    Batch ``iteration`` comes next: the patch stream starts at its index; the queue (torchio's)
    goes on in the pass over the subjects where the run stopped.
    """
    loader = run.cfg_train["loader"]
    if loader == "patch":
        return _patch_batches(run, iteration)
    if loader == "queue":
        return _queue_batches(run, iteration)
    raise ConfigError(f"config key 'train.loader': unknown loader {loader!r}; use patch or queue.")


def _patch_batches(run: Any, iteration: int) -> tuple[PatchStream, Batches]:
    folders = [str(row["preprocessed"]) for row in run.train_rows]
    stream = PatchStream(folders, plan_hash(run.plan), run.cfg_train, int(run.cfg_model["spatial_dims"]), run.seed,
                         rank=run.ranks.rank, world=run.ranks.world)
    workers = worker_count(run.cfg_train["num_workers"], run.threads, run.device.type)
    loader = make_patch_loader(stream, int(run.cfg_train["batch_size"]), iteration, workers,
                               pin_memory=run.device.type == "cuda")

    return stream, iter(loader)


def _queue_batches(run: Any, iteration: int) -> tuple[tio.Queue, Batches]:
    batch_size = int(run.cfg_train["batch_size"])
    cfg = {**run.cfg_train, "num_workers": worker_count(run.cfg_train["num_workers"], run.threads, run.device.type)}
    sampler = run.ranks.subject_sampler(run.train_subjects, run.seed)
    spatial_dims = int(run.cfg_model["spatial_dims"])
    if sampler is None:
        queue = make_queue(run.train_subjects, run.plan, cfg, spatial_dims)
    else:  # resume in the pass over the subjects where the run stopped
        per_epoch = len(sampler) * int(cfg["samples_per_volume"])
        queue = make_queue(run.train_subjects, run.plan, cfg, spatial_dims, subject_sampler=sampler,
                           first_epoch=iteration * batch_size // per_epoch)
    loader = make_loader(queue, batch_size, pin_memory=run.device.type == "cuda")

    def batches() -> Batches:  # the queue's epoch ends after n_subjects * samples_per_volume patches
        while True:
            for batch in loader:
                yield batch[IMAGE][tio.DATA], batch[LABEL][tio.DATA][:, 0]

    return queue, batches()


def subjects_per_epoch(source: Any, patches: int) -> list[list[str]]:
    """The subject ids each pass over the subjects gave this rank (DDP diagnostics)."""
    if isinstance(source, PatchStream):
        return source.subjects_drawn(patches)
    return list(getattr(source, "subjects_per_epoch", []))
