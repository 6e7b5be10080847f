"""Subjects, preprocessing, augmentation and the patch queue (torchio).

Training transform per subject: ``preprocessing(plan)`` -> ``augmentation(train.augmentation)`` ->
:class:`PadToAtLeast` (patch size). Validation and inference apply ``preprocessing(plan)`` only
and pad in :func:`msdseg.inference.predict_probabilities` with the same :class:`PadToAtLeast`,
so the model sees the same padding (zeros after normalisation = the mean intensity) both ways.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torchio as tio
from torch.utils.data import DataLoader, Sampler

from msdseg.decathlon import int_keys
from msdseg.errors import ConfigError, SubjectError

IMAGE = "image"
LABEL = "label"
SAMPLING_MAP = "sampling_map"


class ZScore(tio.IntensityTransform):
    """Z-score each channel over all its voxels (mean 0, unbiased standard deviation 1).

    Multi-channel tasks z-score every channel on its own (modalities differ in scale), where
    ``tio.ZNormalization`` pools them; for one channel both are the same. Unlike torchio's, no
    mask selects the voxels: torchio indexes with a boolean mask even when it is every voxel, and
    on a 512x512x400 CT that indexing builds about 3 GB of int64 indices for a 0.4 GB image.

    ``nonzero=True`` (nnU-Net's scheme where the background is exactly 0, as in skull-stripped
    BrainTumour MRI): statistics over the non-zero voxels of each channel, and the background
    stays 0, so the background's share of a volume does not set the brain's intensities.
    """

    def __init__(self, nonzero: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.nonzero = nonzero
        self.args_names = ["nonzero"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        for image in self.get_images_dict(subject).values():
            data = image.data.to(torch.float32, copy=True)
            for index, channel in enumerate(data):
                if self.nonzero:
                    self._zscore_nonzero(channel)
                    continue
                mean, std = channel.mean(), channel.std()
                if not bool(std > 0):
                    raise SubjectError(str(subject.get("subject", "?")), str(image.path),
                                       f"channel {index} is constant (standard deviation 0); "
                                       "exclude the subject (manifest.on_invalid: skip).")
                channel.sub_(mean).div_(std)
            image.set_data(data)
        return subject

    @staticmethod
    def _zscore_nonzero(channel: torch.Tensor) -> None:
        mask = channel != 0
        values = channel[mask]
        if values.numel() < 2 or not bool(values.std() > 0):
            return  # an empty or constant channel stays as it is (all background)
        channel[mask] = (values - values.mean()) / values.std()


def preprocessing(plan: Mapping[str, Any], copy: bool = True) -> tio.Transform:
    """The one intensity preprocessing of training and inference, chosen by the plan (image key only).

    ct: clip to ``ct_window`` and z-score with the training set's foreground ``ct_mean``/``ct_std``
    (nnU-Net's CT scheme, identical for every image); zscore: per image and channel; none:
    unchanged. ``copy=False`` changes the subject in place instead of a deep copy of it (inference,
    where the raw image is not needed afterwards: one CT-sized copy less).
    """
    method = plan.get("normalization", "zscore")
    if method == "ct":
        window, mean, std = plan.get("ct_window"), plan.get("ct_mean"), plan.get("ct_std")
        if window is None or mean is None or std is None or float(std) <= 0:
            raise ConfigError(
                "plan.json: normalization 'ct' needs ct_window, ct_mean and ct_std > 0 "
                f"(got {window}, {mean}, {std}); rebuild the plan (rule plan) or set "
                "preprocess.normalization: zscore."
            )
        # RescaleIntensity maps in_min_max linearly onto out_min_max: (x - mean) / std
        return tio.Compose([  # the steps change what Compose hands them; Compose copies (or not) once
            tio.Clamp(out_min=float(window[0]), out_max=float(window[1]), include=[IMAGE], copy=False),
            tio.RescaleIntensity(out_min_max=(0.0, 1.0), in_min_max=(float(mean), float(mean) + float(std)),
                                 include=[IMAGE], copy=False),
        ], copy=copy)
    if method == "zscore":
        return ZScore(include=[IMAGE], copy=copy)
    if method == "zscore_nonzero":
        return ZScore(nonzero=True, include=[IMAGE], copy=copy)
    if method == "none":
        return tio.Compose([], copy=copy)
    raise ConfigError(f"plan.json: unknown normalization {method!r}; use ct, zscore, zscore_nonzero or none.")


def mirror_axes(options: Mapping[str, Any], spatial_dims: int) -> tuple[int, ...]:
    """Spatial axes mirrored in training (and so in test-time augmentation); 2D never mirrors z.

    ``options`` is the ``train.augmentation`` section.
    """
    if not options["flip"]:
        return ()
    axes = options.get("flip_axes", (0, 1, 2))
    return tuple(sorted(int(a) for a in axes if not (spatial_dims == 2 and int(a) == 2)))


def augmentation(options: Mapping[str, Any], spatial_dims: int) -> tio.Transform:
    """Random spatial and intensity augmentation after normalisation (nnU-Net-like strengths).

    Intensity changes touch the image only (not a weighted sampler's sampling_map).

    2D models (``model.spatial_dims: 2``) rotate, scale and flip in-plane only.
    """
    planar = spatial_dims == 2
    transforms: list[tio.Transform] = []
    axes = mirror_axes(options, spatial_dims)
    if axes:
        transforms.append(tio.RandomFlip(axes=axes, flip_probability=0.5))
    if options["affine"]:
        scales = (0.85, 1.15, 0.85, 1.15, 1.0, 1.0) if planar else (0.85, 1.15)
        degrees = (0, 0, 0, 0, -15, 15) if planar else 15
        transforms.append(tio.RandomAffine(scales=scales, degrees=degrees, p=0.3))
    if options["elastic"]:
        displacement = (5.0, 5.0, 0.0) if planar else 5.0
        transforms.append(tio.RandomElasticDeformation(max_displacement=displacement, p=0.2))
    if options["bias_field"]:
        transforms.append(tio.RandomBiasField(coefficients=0.3, p=0.2, include=[IMAGE]))
    if options["gamma"]:
        transforms.append(tio.RandomGamma(log_gamma=(-0.3, 0.3), p=0.3, include=[IMAGE]))
    if options["noise"]:
        transforms.append(tio.RandomNoise(std=(0, 0.1), p=0.15, include=[IMAGE]))
    return tio.Compose(transforms)


class PadToAtLeast(tio.SpatialTransform):
    """Pad every image to at least ``shape`` (centred, constant 0; labels get background).

    torchio's samplers refuse volumes smaller than the patch and ``CropOrPad`` would crop the
    larger axes, so this pads only where needed.
    """

    def __init__(self, shape: Sequence[int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.shape = tuple(int(s) for s in shape)
        self.args_names = ["shape"]

    @staticmethod
    def padding_for(spatial_shape: Sequence[int], shape: Sequence[int]) -> tuple[int, ...]:
        """(x_lo, x_hi, y_lo, y_hi, z_lo, z_hi) as ``tio.Pad`` takes it."""
        padding: list[int] = []
        for size, target in zip(spatial_shape, shape):
            missing = max(int(target) - int(size), 0)
            padding += [missing // 2, missing - missing // 2]
        return tuple(padding)

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        padding = self.padding_for(subject.spatial_shape, self.shape)
        if not any(padding):
            return subject
        return tio.Pad(padding, padding_mode=0)(subject)


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


def subjects_from_paths(rows: Sequence[Mapping[str, Any]]) -> list[tio.Subject]:
    """torchio subjects from rows with keys subject, image and (optional) label / sampling_map.

    4D images (x, y, z, c) become channels. Nothing is read yet (torchio loads lazily).
    """
    subjects = []
    for row in rows:
        name = str(row.get("subject", ""))
        if not row.get("image"):
            raise SubjectError(name or "?", "<no image>", "row has no image path; rebuild the manifest.")
        fields: dict[str, Any] = {"subject": name, IMAGE: tio.ScalarImage(str(row["image"]))}
        label = row.get("label")
        if label is not None and not _is_missing(label) and str(label):
            fields[LABEL] = tio.LabelMap(str(label))
        if row.get(SAMPLING_MAP):
            fields[SAMPLING_MAP] = tio.ScalarImage(str(row[SAMPLING_MAP]))
        subjects.append(tio.Subject(**fields))
    return subjects


def _is_missing(value: Any) -> bool:
    """pandas leaves NaN in empty label cells of test rows."""
    try:
        return bool(np.isnan(value))
    except TypeError:
        return False


def training_transform(plan: Mapping[str, Any], cfg_train: Mapping[str, Any], spatial_dims: int) -> tio.Transform:
    """preprocessing -> augmentation -> pad to the patch (the order matters, see module doc)."""
    return tio.Compose([preprocessing(plan), augmentation(cfg_train["augmentation"], spatial_dims),
                        PadToAtLeast(cfg_train["patch_size"])])


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
        if LABEL not in subject:
            raise SubjectError(subject["subject"], str(subject[IMAGE].path),
                               "a training subject needs a label; only role 'train' rows can be trained on.")
        if train["sampler"] == "weighted" and SAMPLING_MAP not in subject:
            raise SubjectError(subject["subject"], str(subject[IMAGE].path),
                               "train.sampler 'weighted' needs a 'sampling_map' path per subject; "
                               "add the column or use train.sampler: label.")
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
