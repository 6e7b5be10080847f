"""Validation inside training: fixed, seeded patches and a pseudo-Dice summed over them."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from msdseg.data.subjects import subjects_from_paths
from msdseg.metrics import dice_from_counts
from msdseg.train.validation import draw_validation_patches, pseudo_dice

CONFIG_TRAIN = {"patch_size": [16, 16, 16], "sampler": "uniform", "label_probabilities": None}


class Oracle(nn.Module):
    """Logits that put every voxel in the class the patch set's labels say (or always background)."""

    def __init__(self, labels: torch.Tensor, n_classes: int, right: bool = True) -> None:
        super().__init__()
        self.labels, self.n_classes, self.right, self.seen = labels, n_classes, right, 0
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = self.labels[self.seen:self.seen + len(x)].to(torch.int64)
        self.seen += len(x)
        target = batch if self.right else torch.zeros_like(batch)
        return nn.functional.one_hot(target, self.n_classes).permute(0, 4, 1, 2, 3).float()


def _draw(rows: list[dict[str, str]], plan: dict[str, Any], n: int, seed: int = 3):
    return draw_validation_patches(subjects_from_paths(rows), plan, CONFIG_TRAIN, n, seed)


def test_patches_are_fixed_by_the_seed_and_leave_the_training_streams_alone(hippocampus_rows, hippocampus_plan):
    torch.manual_seed(11)
    expected_next = torch.rand(3)
    torch.manual_seed(11)
    first = _draw(hippocampus_rows[:3], hippocampus_plan, 7)
    assert torch.equal(torch.rand(3), expected_next), "drawing the patches moved the training's random stream"
    again = _draw(hippocampus_rows[:3], hippocampus_plan, 7)
    other = _draw(hippocampus_rows[:3], hippocampus_plan, 7, seed=4)
    assert first.images.shape == (7, 1, 16, 16, 16) and first.labels.shape == (7, 16, 16, 16)
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert not torch.equal(first.images, other.images)
    # a uniform training sampler still validates on patches centred on each class: none is missed
    assert {1, 2} <= set(torch.unique(first.labels).tolist())


def test_pseudo_dice_sums_counts_over_all_patches(hippocampus_rows, hippocampus_plan):
    patches = _draw(hippocampus_rows[:2], hippocampus_plan, 6)
    perfect = pseudo_dice(Oracle(patches.labels, 3), patches, [1, 2], 4, "fp32", torch.device("cpu"))
    assert perfect == {1: 1.0, 2: 1.0}
    background = pseudo_dice(Oracle(patches.labels, 3, right=False), patches, [1, 2], 4, "fp32", torch.device("cpu"))
    assert background == {1: 0.0, 2: 0.0}


@pytest.mark.parametrize("tp, fp, fn, expected", [(5, 0, 0, 1.0), (1, 1, 1, 0.5), (0, 3, 2, 0.0)])
def test_dice_from_counts(tp: int, fp: int, fn: int, expected: float) -> None:
    assert dice_from_counts(tp, fp, fn) == expected
    assert math.isnan(dice_from_counts(0, 0, 0))
