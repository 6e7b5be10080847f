"""The patch loader: patches read and augmented one at a time from the preprocessed subjects.

Patch ``n`` of a rank's stream is a pure function of (seed, rank, n): its subject, its centre and
its augmentation come from a generator seeded with those three numbers. A ``DataLoader`` over
the indices ``n = iteration * batch + j`` therefore yields the same batches with any number of
workers, and a resumed run goes on at the index where it stopped.

The seeds' vocabulary keeps its meaning: each pass over the subjects (an epoch, reshuffled per
pass; under DDP each rank takes its share, as ``DistributedSampler`` would) draws
``samples_per_volume`` patches per subject, and the order of patches is shuffled within windows
of ``queue_length`` patches (what torchio's queue mixes). The centre follows ``train.sampler``:
``label`` (a class drawn with ``label_probabilities`` among the classes the subject has, then one
of its precomputed locations; no probabilities: foreground voxels alike), ``uniform`` or
``weighted`` (locations drawn from the sampling map when preprocessing).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

from msdseg.data.preprocessed import WEIGHTED, Preprocessed, open_subject
from msdseg.decathlon import int_keys
from msdseg.errors import ConfigError, SubjectError
from msdseg.train.patch_augmentation import PatchAugmentation

OPEN_SUBJECTS = 256  # memory maps a worker keeps open (pages stay in the shared page cache)


class PatchStream(Dataset):
    """Patch ``n`` -> (image (C, *patch) float32, label (*patch)) for one rank."""

    def __init__(self, folders: Sequence[str], plan_hash: str, train: Mapping[str, Any], spatial_dims: int,
                 seed: int, rank: int = 0, world: int = 1) -> None:
        self.folders = [str(f) for f in folders]
        if not self.folders:
            raise ConfigError("the patch loader got no preprocessed subjects; check the manifest's training rows.")
        self.plan_hash, self.seed, self.rank, self.world = plan_hash, int(seed), int(rank), int(world)
        self.patch = tuple(int(p) for p in train["patch_size"])
        self.sampler = str(train["sampler"])
        probabilities = train.get("label_probabilities")
        self.probabilities = ({str(k): float(v) for k, v in int_keys(probabilities).items()}
                              if probabilities is not None else None)
        if self.probabilities is not None and sum(self.probabilities.values()) <= 0:
            raise ConfigError("config key 'train.label_probabilities': at least one probability must be > 0.")
        self.samples_per_volume = int(train["samples_per_volume"])
        self.window = max(int(train["queue_length"]), 1)
        self.augmentation = PatchAugmentation(train["augmentation"], spatial_dims)
        self._open: dict[int, Preprocessed] = {}

    # ----------------------------------------------------------------- which subject
    def share(self, epoch: int) -> np.ndarray:
        """This rank's subjects (indices into ``folders``) in pass ``epoch``: the same shuffle on every rank."""
        order = np.random.default_rng([self.seed, 1, epoch]).permutation(len(self.folders))
        return order[self.rank::self.world] if len(order) >= self.world else order

    def per_epoch(self) -> int:
        return len(self.share(0)) * self.samples_per_volume

    @lru_cache(maxsize=4)  # noqa: B019 (a few passes; the stream lives as long as the run)
    def epoch_order(self, epoch: int) -> np.ndarray:
        """Subject of each patch of pass ``epoch``: each subject samples_per_volume times, shuffled by window."""
        order = np.repeat(self.share(epoch), self.samples_per_volume)
        rng = np.random.default_rng([self.seed, 2, self.rank, epoch])
        for start in range(0, len(order), self.window):
            order[start:start + self.window] = rng.permutation(order[start:start + self.window])
        return order

    def subject_of(self, index: int) -> int:
        epoch, position = divmod(int(index), self.per_epoch())
        return int(self.epoch_order(epoch)[position])

    def subjects_drawn(self, patches: int) -> list[list[str]]:
        """Subject ids of the passes the first ``patches`` patches reach (DDP diagnostics)."""
        epochs = -(-int(patches) // self.per_epoch()) if patches else 0
        return [[os.path.basename(self.folders[i]) for i in self.share(e)] for e in range(epochs)]

    def _subject(self, index: int) -> Preprocessed:
        if index not in self._open:
            if len(self._open) >= OPEN_SUBJECTS:
                self._open.pop(next(iter(self._open)))
            self._open[index] = open_subject(self.folders[index], self.plan_hash)
        return self._open[index]

    # ----------------------------------------------------------------- one patch
    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, 3, self.rank, int(index)])
        subject = self._subject(self.subject_of(index))
        centre = self.patch_centre(subject, rng)
        matrix, flips = self.augmentation.draw_matrix(rng), self.augmentation.draw_flips(rng)
        half = self.augmentation.region(self.patch, matrix)
        low = np.floor(centre - half).astype(int)  # without an affine: the patch itself
        size = np.ceil(centre + half).astype(int) + 1 - low
        if matrix is not None:  # mirroring patch axis a reads the region at -u_a: a sign in the matrix
            matrix = matrix * np.where(np.isin(np.arange(3), flips), -1.0, 1.0)[None, :]
            flips = ()
        image, label = read_region(subject.image, low, size, flips), read_region(subject.label, low, size, flips)
        return self.augmentation.apply(image, label, centre - low, self.patch, matrix, rng)

    def patch_centre(self, subject: Preprocessed, rng: np.random.Generator) -> np.ndarray:
        """The patch's centre (continuous voxel coordinates) as the sampler picks it, kept inside the volume."""
        shape, patch = np.asarray(subject.shape), np.asarray(self.patch)
        voxel = self._target_voxel(subject, rng)
        if voxel is None:  # uniform: a patch anywhere inside (centred where the volume is smaller)
            start = np.array([rng.integers(0, s - p + 1) if s >= p else (s - p) // 2 for s, p in zip(shape, patch)])
        else:  # the voxel inside the patch; the patch inside the volume where it fits
            start = voxel - patch // 2
            start = np.where(shape >= patch, np.clip(start, 0, shape - patch), (shape - patch) // 2)
        return start + (patch - 1) / 2

    def _target_voxel(self, subject: Preprocessed, rng: np.random.Generator) -> np.ndarray | None:
        if self.sampler == "uniform":
            return None
        if self.sampler == "weighted":
            if WEIGHTED not in subject.locations:
                raise SubjectError(subject.subject, str(subject.folder), "train.sampler 'weighted' needs a "
                                   "sampling_map when preprocessing; add the column or use train.sampler: label.")
            return _pick(subject.locations[WEIGHTED], rng)
        present = {k: v for k, v in subject.counts.items() if v > 0 and k in subject.locations}
        if self.probabilities is None:  # torchio's default: any foreground voxel, alike
            weights = {k: float(v) for k, v in present.items() if k != "0"}
        else:
            weights = {k: p for k, p in self.probabilities.items() if k in present and p > 0}
        if not weights:  # nothing to aim at (empty label, or only absent classes asked for)
            return None
        classes = sorted(weights)
        p = np.asarray([weights[c] for c in classes])
        chosen = classes[int(rng.choice(len(classes), p=p / p.sum()))]
        return _pick(subject.locations[chosen], rng)


def _pick(locations: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(locations[int(rng.integers(len(locations)))], dtype=np.int64)


def read_region(array: np.ndarray, low: np.ndarray, size: np.ndarray, flips: tuple[int, ...] = ()) -> np.ndarray:
    """``array[..., low:low+size]`` over the last three axes, zero outside, mirrored along ``flips``: one copy."""
    lead = array.ndim - 3
    out = np.zeros((*array.shape[:lead], *(int(s) for s in size)), dtype=array.dtype)
    source, target = [], []
    for axis, (lo, n, dim) in enumerate(zip(low, size, array.shape[lead:])):
        a, b = max(int(lo), 0), min(int(lo) + int(n), dim)
        if b <= a:
            return out
        t0, t1 = a - int(lo), b - int(lo)
        if axis in flips:  # the mirrored region: target counted from the other end, source read backwards
            t0, t1 = int(n) - t1, int(n) - t0
            source.append(slice(b - 1, a - 1 if a > 0 else None, -1))
        else:
            source.append(slice(a, b))
        target.append(slice(t0, t1))
    out[(*(slice(None),) * lead, *target)] = array[(*(slice(None),) * lead, *source)]
    return out


class CountFrom(Sampler[int]):
    """Indices ``start, start + 1, ...`` without end (the loop decides when training stops)."""

    def __init__(self, start: int) -> None:
        self.start = int(start)

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


def make_patch_loader(stream: PatchStream, batch_size: int, start_batch: int, num_workers: int,
                      pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches ``start_batch, start_batch + 1, ...`` of the stream; workers keep it ahead of the step.

    Workers stack their batches into shared buffers they reuse (:class:`SharedBatches`); each
    batch is copied out as it arrives (into pinned memory with ``pin_memory``, else here), so the
    batches this yields are the caller's to keep.
    """
    workers, prefetch = int(num_workers), 2
    loader = DataLoader(stream, batch_size=int(batch_size), sampler=CountFrom(int(start_batch) * int(batch_size)),
                        num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0,
                        prefetch_factor=prefetch if workers > 0 else None,
                        collate_fn=SharedBatches(slots=prefetch + 1))
    pinned = pin_memory and torch.cuda.is_available()  # the loader pins only where there is a GPU
    for image, label in loader:
        yield (image, label) if pinned or workers == 0 else (image.clone(), label.clone())


class SharedBatches:
    """collate_fn: a worker stacks its batches into a ring of shared-memory buffers it reuses.

    torch's default collate puts every batch into a fresh shared-memory segment, whose pages
    fault in as the batch is written: 50 ms of a worker's time per 2 x 4 x 128^3 batch, a quarter
    of the time it takes to make the two patches. ``prefetch_factor + 1`` slots per worker are
    enough: the loader gives a worker the task for its batch ``j + prefetch_factor + 1`` (which
    reuses batch ``j``'s slot) only when it hands out that worker's batch ``j + 1``, and
    :func:`make_patch_loader` has copied batch ``j`` before it asks for the next one (with
    ``pin_memory``, the pinning thread copied it even earlier: the copy a GPU run makes anyway).
    Outside a worker: torch's default collate.
    """

    def __init__(self, slots: int) -> None:
        self.slots = int(slots)
        self._ring: dict[tuple[int, int], torch.Tensor] = {}
        self._made = 0

    def __call__(self, samples: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        if get_worker_info() is None:
            return default_collate(samples)
        slot = self._made % self.slots
        self._made += 1
        images, labels = zip(*samples)
        return self._stack(images, (slot, 0)), self._stack(labels, (slot, 1))

    def _stack(self, tensors: Sequence[torch.Tensor], key: tuple[int, int]) -> torch.Tensor:
        shape = (len(tensors), *tensors[0].shape)
        buffer = self._ring.get(key)
        if buffer is None or tuple(buffer.shape) != shape or buffer.dtype != tensors[0].dtype:
            buffer = self._ring[key] = torch.empty(shape, dtype=tensors[0].dtype).share_memory_()
        return torch.stack(list(tensors), out=buffer)

