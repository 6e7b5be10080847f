"""A Spleen-sized CT task with only task, source and a 15-minute budget, end to end on this machine.

15 minutes of training make this the one test CI does not run: set MSDSEG_LONG_TESTS=1 to run it
(measured: 18 minutes on 2 cores at low resolution; the train job 905 s of the 900 s budget, 1301 iterations).
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from helpers import assert_dice_floors, write_task_folder
from msdseg.model.unet import load_model
from test_workflow_planned import _run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(3600),
    pytest.mark.skipif(os.environ.get("MSDSEG_LONG_TESTS", "0") in ("", "0"),
                       reason="15 minutes of training: set MSDSEG_LONG_TESTS=1 to run it"),
]

BUDGET_MINUTES = 15


def test_spleen_sized_ct_plans_trains_within_budget_and_scores(tmp_path: Path) -> None:
    """1 channel, 512 x 512 x 90 at 0.8 x 0.8 x 5 mm (Spleen's size): refused before patch validation;
    planned at low resolution since (3.2 x 3.2 x 6.3 mm), scored in the original geometry."""
    task = write_task_folder(tmp_path / "data", "Task87_SpleenLike", labels=("background", "spleen"),
                             shape=(512, 512, 90), spacing=(0.8, 0.8, 5.0), n_train=8, n_test=0, modality="CT")
    plan, training, summary_csv = _run(tmp_path, task, minutes=BUDGET_MINUTES)
    results = summary_csv.parent
    assert plan["normalization"] == "ct" and plan["resolution"]["full_spacing"] == pytest.approx([0.8, 0.8, 5.0])
    assert plan["target_spacing"] == pytest.approx([3.2, 3.2, 6.3], abs=0.01)  # low resolution: 15 CPU minutes
    settings = training["settings"]
    assert settings["train.validation_patches"]["value"] >= 1 and "pseudo-Dice" in settings[
        "train.validation_patches"]["reason"]
    _, meta = load_model(results / "fold0" / "model.pt")
    benchmark = pd.read_csv(results / "benchmarks" / "train" / "fold0.tsv", sep="\t")
    seconds = float(benchmark["s"].iloc[0])
    print(f"train job {seconds:.0f} s of {BUDGET_MINUTES * 60} s; {meta['iterations']} iterations "
          f"(planned {meta['iterations_planned']}, settled {meta['iterations_settled']})")
    assert BUDGET_MINUTES * 60 * 0.90 <= seconds <= BUDGET_MINUTES * 60 * 1.05 + 60  # 90-105%, and the start-up
    # a run the budget stopped still did most of its settled count, so its schedule nearly ended: measured
    # 1301 of 1405 (0.93) where the shared machine's pace drifted from 0.58 s/step when the run settled to
    # 0.65-0.79 s/step later; a drift beyond ~15% is the machine, not the plan
    assert not meta["budget_exhausted"] or meta["iterations"] >= 0.85 * (meta["iterations_settled"] or 0)
    assert_dice_floors(summary_csv, {"spleen": 0.9})  # measured 0.999 (full res.), 0.994 (low res.): an ellipsoid
