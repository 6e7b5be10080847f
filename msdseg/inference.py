"""Sliding-window probabilities with torchio's GridSampler/GridAggregator.

One function serves validation during training and the infer rule (msdseg.predict builds the
original geometry, fold ensembling and the out-of-memory fallback on top of it).
Patches travel to the device in batches and their softmax comes straight back to the CPU, where
the aggregator lives: the whole probability volume never has to fit on the GPU.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch
import torchio as tio
from torch import nn
from torch.utils.data import DataLoader

from msdseg.data import IMAGE, PadToAtLeast


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Mixed-precision dtype for ``precision`` (auto/fp32/bf16/fp16); None = full fp32.

    Mixed precision only on CUDA (on CPU autocast is slower for 3D convolutions); ``auto`` picks
    bf16 where the GPU supports it (no loss scaling needed), else fp16.
    """
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def default_overlap(patch_size: Sequence[int]) -> tuple[int, int, int]:
    """Half the patch on each axis, rounded down to an even number (torchio needs even overlaps)."""
    return tuple(int(p) // 2 - (int(p) // 2) % 2 for p in patch_size)  # type: ignore[return-value]


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

    def get_output_tensor(self) -> torch.Tensor:
        if self.overlap_mode not in ("average", "hann") or self.volume_padded:
            return super().get_output_tensor()
        assert self._output_tensor is not None and self._avgmask_tensor is not None
        output = self._output_tensor.float()  # no copy when already float32
        output.div_(self._avgmask_tensor)
        self._avgmask_tensor = None
        return output


class GridPatches(torch.utils.data.Dataset):
    """The patches at a torchio GridSampler's locations, sliced straight from the volume tensor.

    Iterating the GridSampler itself builds a cropped ``tio.Subject`` per patch; slicing the
    tensor at the same locations gives the same patches without that per-patch overhead.
    """

    def __init__(self, volume: torch.Tensor, locations: Sequence[Sequence[int]]) -> None:
        self.volume = volume
        self.locations = torch.as_tensor(np.asarray(locations), dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.locations)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        i0, j0, k0, i1, j1, k1 = (int(v) for v in self.locations[index])
        return self.volume[:, i0:i1, j0:j1, k0:k1], self.locations[index]


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

    ``image`` is ``(C, x, y, z)`` after :func:`msdseg.data.preprocessing`. Volumes smaller than the
    patch are padded like in training and cropped back. ``overlap`` None = half the patch.
    ``device`` None = where the model is; ``amp``: auto/fp32/bf16/fp16 (used on CUDA only).
    ``tta``: True averages over all mirrorings of x, y (and z in 3D), a sequence of axes (e.g. the
    model's ``meta["mirror_axes"]``, those seen in training) over the mirrorings of those only;
    each is undone before averaging. 2D models take ``[H, W, 1]`` patches; the aggregator stacks
    the slices into the volume.
    """
    if image.ndim != 4:
        raise ValueError(f"predict_probabilities expects a (C, x, y, z) image, got shape {tuple(image.shape)}")
    patch = tuple(int(p) for p in patch_size)
    lap = default_overlap(patch) if overlap is None else tuple(int(v) for v in overlap)
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    model.to(device)
    dtype = autocast_dtype(amp, device)
    spatial_dims = getattr(model, "spatial_dims", getattr(getattr(model, "module", None), "spatial_dims", 3))
    flips = _flip_sets(tta, spatial_dims)

    spatial_shape = tuple(image.shape[1:])
    padding = PadToAtLeast.padding_for(spatial_shape, patch)
    subject = tio.Subject(**{IMAGE: tio.ScalarImage(tensor=image.detach().float().cpu())})
    if any(padding):  # padding copies the volume: only when it is smaller than the patch
        subject = PadToAtLeast(patch)(subject)
    sampler = tio.GridSampler(subject, patch, lap)
    aggregator = LeanGridAggregator(sampler, overlap_mode=overlap_mode)
    patches = GridPatches(subject[IMAGE].data, sampler.locations)
    loader = DataLoader(patches, batch_size=batch_size, num_workers=0, pin_memory=device.type == "cuda")

    was_training = model.training
    model.eval()
    try:
        # no_grad, not inference_mode: the aggregated volume is normalised in place afterwards
        with torch.no_grad():
            for x, locations in loader:
                x = x.to(device, non_blocking=True)
                probabilities = None
                for axes in flips:
                    x_in = x.flip(axes) if axes else x
                    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                        logits = model(x_in)
                    p = torch.softmax(logits.float(), dim=1)
                    p = p.flip(axes) if axes else p
                    probabilities = p if probabilities is None else probabilities.add_(p)
                if len(flips) > 1:
                    probabilities.div_(len(flips))
                aggregator.add_batch(probabilities.cpu(), locations)
    finally:
        model.train(was_training)

    output = aggregator.get_output_tensor()
    if not any(padding):
        return output
    lo = padding[0::2]
    crop = tuple(slice(start, start + size) for start, size in zip(lo, spatial_shape))
    return output[(slice(None), *crop)].contiguous()
