"""Tasks of the user's own, set by task, source and a small budget only: the plan rules configure the rest.

Each run goes from a Decathlon-format folder to dice_summary.csv through the real workflow, and
its plan is checked for the choices a user of this field would defend.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from helpers import assert_dice_floors, merged_hippocampus, write_task_folder
from workflow_runner import output_of, snakemake

pytestmark = pytest.mark.slow


def _run(tmp_path: Path, task: Path, minutes: float = 0.4, source: dict | None = None
         ) -> tuple[dict, dict, Path]:
    name = task.name.removesuffix(".tar")
    config = {"task": name, "source": source or {"folder": str(task)}, "train": {"max_minutes": minutes}}
    run = snakemake(tmp_path / "run", config=config)
    assert run.returncode == 0, output_of(run)[-4000:]
    results = tmp_path / "run" / "results" / name
    plan = json.loads((results / "plan.json").read_text())
    training = json.loads((results / "training_plan.json").read_text())
    for key, setting in training["settings"].items():
        assert setting["reason"], key
        # only the budget was set: every method choice is the planner's
        assert setting["source"] == "planned", (key, setting)
    return plan, training, results / "dice_summary.csv"


def test_two_label_task_from_real_hippocampus(tmp_path: Path, hippocampus_dir: Path) -> None:
    task = merged_hippocampus(hippocampus_dir, tmp_path / "data")
    plan, training, summary_csv = _run(tmp_path, task)
    settings = training["settings"]
    assert plan["normalization"] == "zscore" and plan["target_spacing"] == [1.0, 1.0, 1.0]
    assert set(settings["train.label_probabilities"]["value"]) == {"0", "1"}
    assert settings["train.class_weights"]["value"] is None
    summary = pd.read_csv(summary_csv)
    assert set(summary["class_name"]) == {"hippocampus"}
    # a 0.4-minute budget: the steps it buys depend on the machine (measured 0.431 on 2 cores)
    assert_dice_floors(summary_csv, {"hippocampus": 0.2})


def test_anisotropic_two_channel_task(tmp_path: Path) -> None:
    """Prostate-like: 0.6 x 0.6 x 3.6 mm, T2 + ADC, 3 labels: pools in-plane first, 3D."""
    task = write_task_folder(tmp_path / "data", "Task85_ProstateLike", labels=("background", "PZ", "TZ"),
                             channels=2, shape=(64, 64, 12), spacing=(0.6, 0.6, 3.6))
    plan, training, summary_csv = _run(tmp_path, task)
    settings = training["settings"]
    assert plan["n_channels"] == 2 and plan["target_spacing"] == pytest.approx([0.6, 0.6, 3.6])
    assert settings["model.strides"]["value"][0] == [2, 2, 1]
    assert settings["model.spatial_dims"]["value"] == 3
    assert set(pd.read_csv(summary_csv)["class_name"]) >= {"PZ", "TZ"}
    assert_dice_floors(summary_csv, {"PZ": 0.6, "TZ": 0.6})  # measured 0.957, 0.956


def test_four_channel_zero_background_task(tmp_path: Path) -> None:
    """BrainTumour-like: 4 channels, background exactly 0, 4 labels: z-score over the non-zero voxels."""
    task = write_task_folder(tmp_path / "data", "Task86_BrainLike",
                             labels=("background", "edema", "non-enhancing", "enhancing"),
                             channels=4, shape=(40, 40, 40), zero_background=True)
    plan, training, summary_csv = _run(tmp_path, task)
    assert plan["n_channels"] == 4 and plan["normalization"] == "zscore_nonzero"
    assert set(training["settings"]["train.label_probabilities"]["value"]) == {"0", "1", "2", "3"}
    assert "all" in set(pd.read_csv(summary_csv)["fold"].astype(str))
    assert_dice_floors(summary_csv, {"edema": 0.6, "non-enhancing": 0.6, "enhancing": 0.6})  # measured 0.93-0.95


def test_real_ct_with_a_single_labelled_case(tmp_path: Path, liver_ct_tar: Path) -> None:
    """Task90: one real 3 mm CT slab with a liver mask (no cancer voxels) and a larger unlabelled CT.

    One labelled subject cannot be cross-validated: one fold trains and is scored on it, and the
    summary says the Dice is not held out. Half a CPU minute cannot afford half of its 122x101x30
    image at 3 mm: the plan is low resolution (msdseg.plan.resolution), and the test CT still comes
    back in its own geometry.
    """
    archive = liver_ct_tar
    plan, training, summary_csv = _run(tmp_path, archive, minutes=0.5, source={"archive": str(archive)})
    settings = training["settings"]
    assert plan["normalization"] == "ct" and plan["resolution"]["full_spacing"] == [3.0, 3.0, 3.0]
    assert plan["target_spacing"] == plan["resolution"]["spacing"] == pytest.approx([4.76, 4.76, 4.76], abs=0.01)
    assert settings["train.label_probabilities"]["value"]["2"] == 0.0  # no cancer voxel to centre a patch on
    median = training["fingerprint"]["median_shape"]  # 77 x 64 x 19 at 4.76 mm: the patch keeps half of it
    assert all(p >= 0.5 * m for p, m in zip(settings["train.patch_size"]["value"], median))
    summary = pd.read_csv(summary_csv)
    assert not summary["held_out"].any() and set(summary["fold"].astype(str)) == {"0", "all"}
    # measured 0.918, 0.920, 0.903 (scored on its training case); the full-resolution plan at 3 mm
    # with the same half minute: 0.695, 0.691 (README, "Low resolution, measured")
    assert_dice_floors(summary_csv, {"liver": 0.8})
    results = tmp_path / "run" / "results" / "Task90_LiverCT"
    test_image = nib.load(results / "raw" / "imagesTs" / "liverct_002.nii.gz")
    prediction = nib.load(results / "predictions" / "test" / "liverct_002.nii.gz")
    assert prediction.shape == test_image.shape
    assert np.allclose(prediction.affine, test_image.affine, atol=1e-4)
