"""The whole workflow on the embedded demo, through Snakemake: archive to dice_summary.csv.

One short run (few iterations) is shared by the tests of this module; then dry runs show what a
config change would redo, and the HTML report renders.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from helpers import assert_dice_floors
from workflow_runner import output_of, planned_jobs, snakemake

pytestmark = pytest.mark.slow

TASK = "Task00_SyntheticLiver"
QUICK = {
    "synthetic": {"n_train": 6, "n_test": 1},
    # 120 steps: enough to learn the small lesions (12 steps left cancer at Dice 0.006, chance)
    "train": {"iterations": 120, "validate_every": 60, "checkpoint_every": 60, "samples_per_volume": 2,
              "queue_length": 8},
}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("demo")
    run = snakemake(workdir, config=QUICK)
    assert run.returncode == 0, output_of(run)[-6000:]
    return workdir


def test_demo_ends_with_dice_summary_and_outputs_in_original_geometry(demo_run):
    results = demo_run / "results" / TASK
    summary = pd.read_csv(results / "dice_summary.csv")
    assert {"liver", "cancer"} <= set(summary["class_name"])
    assert (summary["n"] >= 1).any()
    # measured (2 cores, fp32): liver 0.902, cancer 0.698 over the 6 held-out subjects (one lesion missed)
    assert_dice_floors(results / "dice_summary.csv", {"liver": 0.75, "cancer": 0.45})
    metrics = pd.read_csv(results / "fold0" / "metrics.csv")
    assert metrics["dice"].dropna().between(0, 1).all()
    for name in ("model.pt", "training_log.csv", "learning_curve.png"):
        assert (results / "fold0" / name).stat().st_size > 0
    manifest = pd.read_csv(results / "manifest.csv").set_index("subject")
    predictions = sorted((results / "fold0" / "predictions").glob("*.nii.gz")) + sorted(
        (results / "predictions" / "test").glob("*.nii.gz")
    )
    assert len(predictions) == (manifest["fold"] == 0).sum() + (manifest["role"] == "test").sum()
    for path in predictions:
        subject = path.name.removesuffix(".nii.gz")
        original = nib.load(demo_run / manifest.loc[subject, "image"])
        predicted = nib.load(path)
        assert predicted.shape == original.shape[:3]
        np.testing.assert_allclose(predicted.affine, original.affine, atol=1e-4)
        assert predicted.get_data_dtype() == np.uint8
    for name in ("dice_boxplot.png", "overlays.png"):
        assert (results / "plots" / name).stat().st_size > 0


def test_rerun_has_nothing_to_do(demo_run):
    run = snakemake(demo_run, "-n", config=QUICK)
    assert run.returncode == 0, output_of(run)
    assert "Nothing to be done" in output_of(run)


def test_inference_setting_reruns_inference_and_evaluation_not_training(demo_run):
    changed = {**QUICK, "infer": {"overlap": [8, 8, 4]}}
    jobs = planned_jobs(snakemake(demo_run, "-n", config=changed))
    assert jobs.get("infer_fold", 0) >= 1 and jobs.get("infer_test", 0) >= 1
    assert "evaluate_fold" in jobs and "summarize" in jobs
    assert not {"train", "resample_training", "plan", "manifest", "download"} & set(jobs)


def test_more_folds_or_threads_retrain_no_fold(demo_run):
    changed = {**QUICK, "train": {**QUICK["train"], "folds": [0, 1], "threads": 1}}
    jobs = planned_jobs(snakemake(demo_run, "-n", config=changed))
    assert not {"train", "plan_training", "infer_fold"} & set(jobs), jobs


def test_preprocessing_setting_reruns_resampling_and_everything_after(demo_run):
    changed = {**QUICK, "preprocess": {"spacing": [2.0, 2.0, 2.5]}}
    jobs = planned_jobs(snakemake(demo_run, "-n", config=changed))
    assert {"plan", "resample_training", "resample_test", "train", "infer_fold", "summarize"} <= set(jobs)
    assert not {"download", "extract", "manifest"} & set(jobs)


def test_report_renders(demo_run):
    run = snakemake(demo_run, "--report", "report.html", config=QUICK)
    assert run.returncode == 0, output_of(run)
    html = (demo_run / "report.html").read_text(errors="replace")
    assert "dice_summary" in html


def test_same_config_and_seed_give_the_same_results(demo_run, tmp_path):
    """A second run elsewhere: same manifest bytes, training log, weights and Dice (CPU)."""
    import torch

    again = tmp_path / "again"
    run = snakemake(again, config=QUICK)
    assert run.returncode == 0, output_of(run)[-4000:]
    first, second = demo_run / "results" / TASK, again / "results" / TASK
    for name in ("manifest.csv", "plan.json", "fold0/metrics.csv", "dice_summary.csv"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    logs = [pd.read_csv(root / "fold0" / "training_log.csv") for root in (first, second)]
    learned = [c for c in logs[0].columns if c in ("iteration", "loss", "lr") or c.startswith("val_dice")]
    pd.testing.assert_frame_equal(logs[0][learned], logs[1][learned])
    weights = [torch.load(root / "fold0" / "model.pt", weights_only=True)["state_dict"] for root in (first, second)]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    model = torch.load(first / "fold0" / "model.pt", weights_only=True)
    assert model["seed"] == 0 and model["config"]["train"]["iterations"] == QUICK["train"]["iterations"]
    assert "torch" in model["versions"]
