"""Sliding-window probabilities with torchio's GridSampler/GridAggregator.

One function serves validation during training and the infer rule (msdseg.infer.predict builds the
original geometry, fold ensembling and the out-of-memory fallback on top of it).
Patches travel to the device in batches and their softmax comes straight back to the CPU, where
the aggregator lives: the whole probability volume never has to fit on the GPU.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchio as tio
from torch import nn

from msdseg.config import check_overlap
from msdseg.data.subjects import IMAGE, PadToAtLeast
from msdseg.grid import default_overlap


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Mixed-precision dtype for ``precision`` (auto/fp32/bf16/fp16); None = full fp32.

    :func:`msdseg.devices.resolve_precision`, the one place that decides (kept under this name
    for its callers): CUDA ``auto`` = bf16 where the GPU has bf16 units, else fp16; ``bf16`` on a
    GPU without them is a ConfigError; CPUs run fp32 except an explicit ``bf16`` on native bf16.
    """
    from msdseg.devices import resolve_precision

    return resolve_precision(precision, device)


def grid_overlap(infer: Mapping[str, Any], patch_size: Sequence[int]) -> tuple[list[int], list[int]]:
    """(patch, overlap) of the sliding window for the ``infer`` config section and a model's training patch.

    The patch is ``infer.patch_size``, else ``patch_size``; the overlap is ``infer.overlap``, else
    :func:`default_overlap`. An axis of patch size 1 (z of a 2D model) gets no overlap, so an
    overlap set for 3D patches also serves a 2D model. The overlap is then checked against the
    patch actually used (:func:`msdseg.config.check_overlap`, ConfigError naming infer.overlap).
    """
    patch = [int(v) for v in (infer.get("patch_size") or patch_size)]
    overlap = infer.get("overlap")
    if overlap is None:
        overlap = default_overlap(patch)
    overlap = [0 if size == 1 else int(lap) for size, lap in zip(patch, overlap)]
    check_overlap(overlap, patch)
    return patch, overlap


def _flip_sets(tta: bool | Sequence[int], spatial_dims: int) -> list[tuple[int, ...]]:
    """Dims of (B, C, x, y, z) tensors to mirror: every subset of the TTA axes (identity first)."""
    if tta is True:
        spatial = (0, 1, 2) if spatial_dims == 3 else (0, 1)
    elif tta is False:
        spatial = ()
    else:
        spatial = tuple(int(a) for a in tta)
    dims = tuple(2 + a for a in sorted(set(spatial)))
    return [combo for n in range(len(dims) + 1) for combo in itertools.combinations(dims, n)]


class LeanGridAggregator(tio.GridAggregator):
    """torchio's GridAggregator with one shared weight channel and in-place normalisation.

    torchio keeps a weight map per class and divides into a new tensor, so a 3-class
    512x512x400 volume needs five probability-sized buffers; here it needs about two (the
    accumulator and a one-channel weight map), which keeps large CTs within a CPU's memory.
    """

    def _initialize_avgmask_tensor(self, batch: torch.Tensor) -> None:
        if self._avgmask_tensor is None:
            self._avgmask_tensor = torch.zeros((1, *self.spatial_shape), dtype=torch.float32)

    @staticmethod
    @functools.lru_cache(maxsize=8)
    def _get_hann_window(patch_size: tuple[int, ...]) -> torch.Tensor:  # type: ignore[override]
        """torchio's window, built once per patch size instead of once per subject."""
        return tio.GridAggregator._get_hann_window(patch_size)

    def _initialize_hann_window(self) -> None:
        if self._hann_window is None:
            self._hann_window = self._get_hann_window(tuple(int(v) for v in self.patch_size))

    def add_batch(self, batch_tensor: torch.Tensor, locations: torch.Tensor) -> None:
        """torchio's accumulation for average/hann, with its per-patch overhead taken out.

        The Hann window multiplies the whole batch in one operation and the locations become
        Python ints once per batch; torchio does both per patch, which costs as much as the
        arithmetic on small volumes such as the hippocampus. Other modes go to torchio.
        """
        shape_ok = tuple(batch_tensor.shape[-3:]) == tuple(int(v) for v in self.patch_size)
        if self.overlap_mode not in ("average", "hann") or self._downsampling_factor != 1 or not shape_ok:
            super().add_batch(batch_tensor, locations)  # torchio's checks and messages
            return
        batch = batch_tensor.detach().to("cpu", torch.float32)
        self._initialize_output_tensor(batch)
        self._initialize_avgmask_tensor(batch)
        assert self._output_tensor is not None and self._avgmask_tensor is not None
        weight: torch.Tensor | float = 1.0
        if self.overlap_mode == "hann":
            self._initialize_hann_window()
            assert self._hann_window is not None
            weight = self._hann_window
            batch = batch * weight
        for patch, (i0, j0, k0, i1, j1, k1) in zip(batch, locations.tolist()):
            self._output_tensor[:, i0:i1, j0:j1, k0:k1] += patch
            self._avgmask_tensor[:, i0:i1, j0:j1, k0:k1] += weight

    def get_output_tensor(self) -> torch.Tensor:
        if self.overlap_mode not in ("average", "hann") or self.volume_padded:
            return super().get_output_tensor()
        assert self._output_tensor is not None and self._avgmask_tensor is not None
        output = self._output_tensor.float()  # no copy when already float32
        output.div_(self._avgmask_tensor)
        self._avgmask_tensor = None
        return output


def grid_batches(
    volume: torch.Tensor, locations: np.ndarray, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(patches (B, C, *patch), locations (B, 6)) at a torchio GridSampler's locations, in order.

    Iterating the GridSampler itself builds a cropped ``tio.Subject`` per patch and a DataLoader
    collates them; slicing the tensor at the same locations gives the same patches without that
    per-patch overhead, which is a measurable share of the time on small volumes.
    """
    all_locations = torch.as_tensor(np.asarray(locations), dtype=torch.int64)
    for start in range(0, len(all_locations), batch_size):
        batch_locations = all_locations[start:start + batch_size]
        patches = [volume[:, i0:i1, j0:j1, k0:k1] for i0, j0, k0, i1, j1, k1 in batch_locations.tolist()]
        yield torch.stack(patches), batch_locations


def predict_probabilities(
    model: nn.Module,
    image: torch.Tensor,
    patch_size: Sequence[int],
    overlap: Sequence[int] | None = None,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    overlap_mode: str = "hann",
    tta: bool | Sequence[int] = False,
    amp: str = "auto",
) -> torch.Tensor:
    """Softmax probabilities ``(n_classes, x, y, z)`` float32 on the CPU for a preprocessed image.

    ``image`` is ``(C, x, y, z)`` after :func:`msdseg.data.normalize.preprocessing`. Volumes smaller than the
    patch are padded like in training and cropped back. ``overlap`` None = half the patch.
    ``device`` None = where the model is; ``amp``: auto/fp32/bf16/fp16 (see :func:`autocast_dtype`).
    ``tta``: True averages over all mirrorings of x, y (and z in 3D), a sequence of axes (e.g. the
    model's ``meta["mirror_axes"]``, those seen in training) over the mirrorings of those only;
    each is undone before averaging. 2D models take ``[H, W, 1]`` patches; the aggregator stacks
    the slices into the volume.
    """
    if image.ndim != 4:
        raise ValueError(f"predict_probabilities expects a (C, x, y, z) image, got shape {tuple(image.shape)}")
    patch = tuple(int(p) for p in patch_size)
    lap = default_overlap(patch) if overlap is None else tuple(int(v) for v in overlap)
    device = _model_on(model, device)
    dtype = autocast_dtype(amp, device)
    spatial_dims = getattr(model, "spatial_dims", getattr(getattr(model, "module", None), "spatial_dims", 3))
    flips = _flip_sets(tta, spatial_dims)

    spatial_shape = tuple(image.shape[1:])
    volume, padding = _padded_to_patch(image, patch)
    sampler = tio.GridSampler(tio.Subject(**{IMAGE: tio.ScalarImage(tensor=volume)}), patch, lap)
    aggregator = LeanGridAggregator(sampler, overlap_mode=overlap_mode)
    pin = device.type == "cuda"
    # entering a disabled torch.autocast still costs per batch: a null context when fp32
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    was_training = model.training
    if was_training:  # eval()/train() walk every module too; inference callers pass eval models
        model.eval()
    try:
        # the network in inference mode (no autograd bookkeeping at all); the aggregator's
        # volume stays a normal tensor, so callers may still change the result in place
        with torch.no_grad():
            for x, locations in grid_batches(volume, sampler.locations, batch_size):
                with torch.inference_mode():
                    x = (x.pin_memory() if pin else x).to(device, non_blocking=True)
                    probabilities = _mirror_averaged_softmax(model, x, flips, autocast)
                aggregator.add_batch(probabilities.cpu(), locations)
    finally:
        if was_training:
            model.train()

    return _cropped_back(aggregator.get_output_tensor(), padding, spatial_shape)


def _model_on(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """The device to predict on (None = where the model is), with the model moved there."""
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    if next(model.parameters()).device != device:  # .to() walks every module: ~1 ms per call
        model.to(device)
    return device


def _cropped_back(output: torch.Tensor, padding: Sequence[int], spatial_shape: Sequence[int]) -> torch.Tensor:
    """The prediction of a padded volume cropped back to the volume's own shape."""
    if not any(padding):
        return output
    lo = padding[0::2]
    crop = tuple(slice(start, start + size) for start, size in zip(lo, spatial_shape))
    # a view: only volumes smaller than the patch are padded, so the hidden margin is small
    return output[(slice(None), *crop)]


def _padded_to_patch(image: torch.Tensor, patch: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The image as float32 on the CPU, padded as PadToAtLeast pads in training (centred, zeros)."""
    padding = PadToAtLeast.padding_for(tuple(image.shape[1:]), patch)
    volume = image.detach().to("cpu", torch.float32)
    if any(padding):  # F.pad lists the last axis first
        volume = F.pad(volume, [*padding[4:6], *padding[2:4], *padding[0:2]])
    return volume, padding


def _mirror_averaged_softmax(
    model: nn.Module, x: torch.Tensor, flips: list[tuple[int, ...]], autocast: contextlib.AbstractContextManager
) -> torch.Tensor:
    """Softmax of the batch averaged over the mirrorings in ``flips``, each undone before adding."""
    probabilities = None
    for axes in flips:
        x_in = x.flip(axes) if axes else x
        with autocast:
            logits = model(x_in)
        p = torch.softmax(logits.float(), dim=1)
        p = p.flip(axes) if axes else p
        probabilities = p if probabilities is None else probabilities.add_(p)
    if len(flips) > 1:
        probabilities.div_(len(flips))
    return probabilities
