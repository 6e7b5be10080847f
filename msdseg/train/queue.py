"""torchio's whole-volume patch queue and its samplers (train.loader: queue; the default is msdseg.train.patches)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torchio as tio
from torch.utils.data import DataLoader, Sampler

from msdseg.data.subjects import IMAGE, LABEL, SAMPLING_MAP, check_trainable
from msdseg.decathlon import int_keys
from msdseg.errors import ConfigError
from msdseg.train.augmentation import training_transform


class SafeLabelSampler(tio.LabelSampler):
    """``tio.LabelSampler`` that samples uniformly where it has nothing to aim at.

    A subject with an empty label map (or with labels only near the border, where no patch can be
    centred) makes torchio's sampler raise; training should go on with that subject.
    """

    def process_probability_map(self, probability_map: torch.Tensor, subject: tio.Subject) -> np.ndarray:
        data = probability_map[0].numpy().astype(np.float64)
        self.clear_probability_borders(data, self.patch_size)
        if data.sum() == 0:
            probability_map = torch.ones_like(probability_map)
        return super().process_probability_map(probability_map, subject)


def make_sampler(train: Mapping[str, Any]) -> tio.data.PatchSampler:
    """The patch sampler named by ``train.sampler`` (``train`` is the config's train section)."""
    patch = tuple(int(p) for p in train["patch_size"])
    if train["sampler"] == "uniform":
        return tio.UniformSampler(patch)
    if train["sampler"] == "weighted":
        return tio.WeightedSampler(patch, probability_map=SAMPLING_MAP)
    probabilities = train.get("label_probabilities")
    if probabilities is not None:
        probabilities = {label: float(p) for label, p in int_keys(probabilities).items()}
        if sum(probabilities.values()) <= 0:
            raise ConfigError("config key 'train.label_probabilities': at least one probability must be > 0.")
    return SafeLabelSampler(patch, label_name=LABEL, label_probabilities=probabilities)


class EpochQueue(tio.Queue):
    """``tio.Queue`` that calls ``subject_sampler.set_epoch(e)`` as it starts pass ``e`` over the subjects.

    torchio builds a new subject loader for each pass (``_initialize_subjects_iterable``, first
    in ``__init__``, then whenever the previous pass is used up), so that is where a
    ``DistributedSampler`` must learn the epoch: every rank then reshuffles alike and keeps its
    own share. Passes are numbered from ``first_epoch`` (a resumed run goes on with new orders).
    ``subjects_per_epoch`` lists the subject ids each pass drew, in order (DDP diagnostics).
    """

    def __init__(self, *args: Any, first_epoch: int = 0, **kwargs: Any) -> None:
        self.epoch = int(first_epoch) - 1
        self.subjects_per_epoch: list[list[str]] = []
        super().__init__(*args, **kwargs)

    def _initialize_subjects_iterable(self) -> None:
        self.epoch += 1
        self.subjects_per_epoch.append([])
        if hasattr(self.subject_sampler, "set_epoch"):
            self.subject_sampler.set_epoch(self.epoch)
        super()._initialize_subjects_iterable()

    def _get_next_subject(self) -> tio.Subject:
        subject = super()._get_next_subject()
        self.subjects_per_epoch[-1].append(str(subject.get("subject", "?")))
        return subject


def make_queue(subjects: Sequence[tio.Subject], plan: Mapping[str, Any], train: Mapping[str, Any],
               spatial_dims: int, subject_sampler: Sampler | None = None, transform: tio.Transform | None = None,
               first_epoch: int = 0) -> tio.Queue:
    """The training patch queue (torchio): workers load and augment subjects, the main process samples.

    ``subject_sampler`` (e.g. ``DistributedSampler``) replaces subject shuffling for DDP; the queue
    is then an :class:`EpochQueue`, which calls its ``set_epoch`` at each pass over the subjects
    (from ``first_epoch``). ``transform`` defaults to :func:`training_transform`. ``train`` is the
    config's train section.
    """
    for subject in subjects:
        check_trainable(subject["subject"], str(subject[IMAGE].path), LABEL in subject, SAMPLING_MAP in subject,
                        train["sampler"])
    if transform is None:  # (an empty tio.Compose is falsy: test for None)
        transform = training_transform(plan, train, spatial_dims)
    dataset = tio.SubjectsDataset(list(subjects), transform=transform)
    samples = int(train["samples_per_volume"])
    extra: dict[str, Any] = {"first_epoch": first_epoch} if subject_sampler is not None else {}
    return (EpochQueue if subject_sampler is not None else tio.Queue)(
        dataset,
        max_length=max(int(train["queue_length"]), samples),
        samples_per_volume=samples,
        sampler=make_sampler(train),
        subject_sampler=subject_sampler,
        num_workers=int(train["num_workers"]),
        shuffle_subjects=subject_sampler is None,
        shuffle_patches=True,
        **extra,
    )


def make_loader(queue: tio.Queue, batch_size: int, pin_memory: bool = False) -> DataLoader:
    """Batches of patches from the queue. ``num_workers`` must be 0: the queue has its own workers."""
    return tio.SubjectsLoader(queue, batch_size=batch_size, num_workers=0, pin_memory=pin_memory)
