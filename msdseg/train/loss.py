"""The training loss: cross-entropy and/or soft Dice, with optional deep supervision."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def segmentation_loss(logits: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor, kind: str,
                      class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy and/or soft Dice over the foreground classes (batch Dice, as nnU-Net 3D).

    ``logits`` (B, K, x, y, z), ``target`` (B, x, y, z) integer labels. Computed in float32.
    A list of logits (deep supervision, each half the size of the one before) weighs level k by
    2**-k against a nearest-neighbour downsampled target, as nnU-Net does.
    """
    if not isinstance(logits, torch.Tensor):
        return _deep_supervision_loss(logits, target, kind, class_weights)
    logits = logits.float()
    loss = logits.new_zeros(())
    if kind in ("ce", "ce+dice"):
        loss = loss + F.cross_entropy(logits, target, weight=class_weights)
    if kind in ("dice", "ce+dice"):
        probabilities = torch.softmax(logits, dim=1)
        one_hot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probabilities.dtype)
        dims = (0, *range(2, logits.ndim))
        intersection = (probabilities * one_hot).sum(dims)
        denominator = probabilities.sum(dims) + one_hot.sum(dims)
        dice = (2 * intersection + 1e-5) / (denominator + 1e-5)
        loss = loss + (1.0 - dice[1:].mean())
    return loss


def _deep_supervision_loss(levels: Sequence[torch.Tensor], target: torch.Tensor, kind: str,
                           class_weights: torch.Tensor | None) -> torch.Tensor:
    weights = [0.5**k for k in range(len(levels))]
    total = levels[0].new_zeros((), dtype=torch.float32)
    for weight, level in zip(weights, levels):
        level_target = target
        if level.shape[2:] != target.shape[1:]:
            level_target = F.interpolate(target[:, None].float(), size=level.shape[2:], mode="nearest")[:, 0].long()
        total = total + weight * segmentation_loss(level, level_target, kind, class_weights)
    return total / sum(weights)
