"""One U-Net for 2D and 3D, and the model.pt file format (see docs/design.md).

The network always takes ``(B, C, x, y, z)`` so that training, validation and inference code
do not branch on the dimensionality: a 2D model folds ``z`` into the batch and segments each
slice on its own (with ``z == 1`` this is a plain squeeze).

Sizes: the network pads its input internally (zeros, at the high end of each axis) to a multiple
of ``2**depth`` and crops the output back, so any patch size works. Patch sizes that already are
multiples waste nothing, so presets should prefer them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from msdseg.errors import ModelError
from msdseg.files import atomic_path
from msdseg.provenance import git_commit, library_versions

FORMAT = "msdseg-model/1"


MAX_CHANNELS = 320  # nnU-Net's cap: deeper levels stop doubling here to bound memory


def _norm(kind: str, channels: int, spatial_dims: int) -> nn.Module:
    if kind == "instance":
        return (nn.InstanceNorm3d if spatial_dims == 3 else nn.InstanceNorm2d)(channels, affine=True)
    if kind == "batch":
        return (nn.BatchNorm3d if spatial_dims == 3 else nn.BatchNorm2d)(channels)
    if kind == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    if kind == "none":
        return nn.Identity()
    raise ModelError(f"model.norm: unknown normalisation {kind!r}; use instance, batch, group or none.")


class ConvBlock(nn.Sequential):
    """(conv, norm, LeakyReLU) twice; the first conv may stride to downsample (as nnU-Net)."""

    def __init__(self, spatial_dims: int, in_ch: int, out_ch: int, norm: str, stride: int | tuple[int, ...] = 1,
                 dropout: float = 0.0) -> None:
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        layers: list[nn.Module] = [
            conv(in_ch, out_ch, 3, stride=stride, padding=1, bias=norm == "none"),
            _norm(norm, out_ch, spatial_dims),
            nn.LeakyReLU(0.01, inplace=True),
        ]
        if dropout > 0:
            layers.append((nn.Dropout3d if spatial_dims == 3 else nn.Dropout2d)(dropout))
        layers += [
            conv(out_ch, out_ch, 3, padding=1, bias=norm == "none"),
            _norm(norm, out_ch, spatial_dims),
            nn.LeakyReLU(0.01, inplace=True),
        ]
        super().__init__(*layers)


class UNet(nn.Module):
    """U-Net: strided-conv down, transposed-conv up, skip concatenation, 1x1 head (logits).

    ``deep_supervision`` (nnU-Net) adds 1x1 heads on the coarser decoder levels; in training mode
    the forward pass then returns a list of logits, full resolution first, each next one half
    the size (rounded up). In eval mode it always returns the full-resolution logits only.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, base_channels: int = 16,
                 depth: int = 4, norm: str = "instance", dropout: float = 0.0,
                 deep_supervision: bool = False, strides: Sequence[Sequence[int]] | None = None) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ModelError(f"model.spatial_dims must be 2 or 3, got {spatial_dims}.")
        self.hparams: dict[str, Any] = {
            "spatial_dims": int(spatial_dims), "in_channels": int(in_channels),
            "out_channels": int(out_channels), "base_channels": int(base_channels),
            "depth": int(depth), "norm": str(norm), "dropout": float(dropout),
            "deep_supervision": bool(deep_supervision),
        }
        if strides is not None:  # per level and axis (x, y, z): anisotropic data pools in-plane first
            if len(strides) != depth:
                raise ModelError(f"model.strides: {len(strides)} levels for depth {depth}; "
                                 "give one [x, y, z] per level.")
            self.hparams["strides"] = [[int(k) for k in level] for level in strides]
        self.spatial_dims = spatial_dims
        self.depth = depth
        self.strides = [tuple(level[:spatial_dims]) for level in strides] if strides is not None \
            else [(2,) * spatial_dims] * depth
        widths = [min(base_channels * 2**level, MAX_CHANNELS) for level in range(depth + 1)]
        self.encoder = nn.ModuleList([ConvBlock(spatial_dims, in_channels, widths[0], norm)])
        for level in range(1, depth + 1):
            bottleneck_dropout = dropout if level == depth else 0.0
            self.encoder.append(ConvBlock(spatial_dims, widths[level - 1], widths[level], norm,
                                          stride=_stride(self.strides[level - 1]), dropout=bottleneck_dropout))
        up = nn.ConvTranspose3d if spatial_dims == 3 else nn.ConvTranspose2d
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level in range(depth, 0, -1):
            stride = _stride(self.strides[level - 1])
            self.upsample.append(up(widths[level], widths[level - 1], stride, stride=stride))
            self.decoder.append(ConvBlock(spatial_dims, 2 * widths[level - 1], widths[level - 1], norm))
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.head = conv(widths[0], out_channels, 1)
        # heads for decoder levels 1 .. depth-1 (not the bottleneck), finest first
        self.deep_heads = nn.ModuleList(
            [conv(widths[level], out_channels, 1) for level in range(1, depth)] if deep_supervision else [])
        self._initialise()

    def _initialise(self) -> None:
        """He initialisation for LeakyReLU (nnU-Net's choice); it trains faster than the default."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(module.weight, a=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """(B, C, x, y, z) -> logits (B, out_channels, x, y, z) (a list with deep supervision in training)."""
        if x.ndim != 5:
            raise ValueError(f"UNet expects (B, C, x, y, z) input, got shape {tuple(x.shape)}")
        batch, _, sx, sy, sz = x.shape
        if self.spatial_dims == 2:
            # slices are independent samples: (B, C, x, y, z) -> (B*z, C, x, y)
            x = x.permute(0, 4, 1, 2, 3).reshape(batch * sz, x.shape[1], sx, sy)
        spatial = x.shape[2:]
        multiples = [math.prod(level[axis] for level in self.strides) for axis in range(self.spatial_dims)]
        pad = [(-size) % multiple for size, multiple in zip(spatial, multiples)]
        if any(pad):
            # F.pad lists the last axis first: (z_lo, z_hi, y_lo, y_hi, x_lo, x_hi)
            x = F.pad(x, [v for p in reversed(pad) for v in (0, p)])
        skips = []
        for block in self.encoder[:-1]:
            x = block(x)
            skips.append(x)
        x = self.encoder[-1](x)
        decoded = []
        for up, block, skip in zip(self.upsample, self.decoder, reversed(skips)):
            x = block(torch.cat([up(x), skip], dim=1))
            decoded.append(x)
        outputs = [self.head(x)]
        if self.deep_heads and self.training:
            # decoded[-1] is full resolution; decoded[-1 - k] is 2**k coarser
            outputs += [head(decoded[-1 - k]) for k, head in enumerate(self.deep_heads, start=1)]
        results = []
        for k, out in enumerate(outputs):
            factors = [math.prod(level[axis] for level in self.strides[:k]) for axis in range(self.spatial_dims)]
            size = [-(-s // f) for s, f in zip(spatial, factors)]  # ceil: the coarse grid of the unpadded input
            out = out[(slice(None), slice(None), *(slice(0, s) for s in size))]
            if self.spatial_dims == 2:
                out = out.reshape(batch, sz, out.shape[1], *size).permute(0, 2, 3, 4, 1)
            results.append(out)
        return results if len(results) > 1 else results[0]


def _stride(level: Sequence[int]) -> int | tuple[int, ...]:
    """A conv stride: the plain int 2 where every axis pools (the layers of models saved before strides)."""
    return 2 if all(k == 2 for k in level) else tuple(int(k) for k in level)


def save_model(path: str | Path, model: UNet, meta: Mapping[str, Any]) -> None:
    """Write model.pt atomically: weights, constructor arguments and ``meta`` (primitives only)."""
    state = {key: value.detach().cpu() for key, value in _unwrap(model).state_dict().items()}
    content = {**dict(meta), "format": FORMAT, "model": dict(_unwrap(model).hparams), "state_dict": state}
    content.setdefault("versions", library_versions())
    content.setdefault("git_commit", git_commit())
    with atomic_path(path) as tmp:
        torch.save(content, tmp)
        try:  # the contract: readable with weights_only=True, so check before it becomes model.pt
            torch.load(tmp, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ModelError(f"{path}: model meta holds a non-primitive object ({error}); "
                             "store only tensors, numbers, strings, lists and dicts.") from error


def _unwrap(model: nn.Module) -> UNet:
    """The UNet inside DistributedDataParallel / torch.compile wrappers."""
    while not isinstance(model, UNet):
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            raise ModelError(f"expected an msdseg UNet, got {type(model).__name__}")
        model = inner
    return model


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[UNet, dict[str, Any]]:
    """Read model.pt (tensors and primitives only) and return the model in eval mode and its meta."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file; train the fold first (rule train).")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and weights_only errors all mean "not ours"
        raise ModelError(f"{path}: not an msdseg model file ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''}); "
                         "use a model.pt written by msdseg.train or retrain.") from error
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        found = content.get("format") if isinstance(content, dict) else type(content).__name__
        raise ModelError(f"{path}: not an msdseg model (format {found!r}, expected {FORMAT!r}); "
                         "use a model.pt written by msdseg.train or retrain.")
    try:
        model = UNet(**content["model"])
        model.load_state_dict(content["state_dict"])
    except (KeyError, TypeError, RuntimeError) as error:
        raise ModelError(f"{path}: model weights do not match the stored architecture ({error}); "
                         "the file is damaged, retrain the fold.") from error
    model.to(device).eval()
    meta = {key: value for key, value in content.items() if key != "state_dict"}
    return model, meta
