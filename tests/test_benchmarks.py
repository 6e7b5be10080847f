"""The hippocampus training benchmark still runs end to end (seconds of training, not its figures)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import train_hippocampus  # noqa: E402


def test_bootstrap_interval_brackets_the_mean_and_shrinks_with_more_cases() -> None:
    rng = np.random.default_rng(1)
    few, many = rng.normal(0.88, 0.04, 10), rng.normal(0.88, 0.04, 400)
    low, high = train_hippocampus.mean_interval(few)
    assert low < few.mean() < high
    low_many, high_many = train_hippocampus.mean_interval(many)
    assert high_many - low_many < (high - low) / 3


@pytest.mark.slow
def test_benchmark_trains_an_ensemble_and_scores_it_in_original_geometry(shared_data: Path, tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "train_hippocampus.py"), "--threads", "1",
               "--minutes", "0.1", "--models", "2", "--held-out", "2", "--validation", "1",
               "--queue-seconds", "1", "--no-plan", "--workdir", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["models"] == 2 and len(summary["iterations"]) == 2
    assert all(iterations >= 1 for iterations in summary["iterations"])
    assert set(summary["mean_dice"]) == {"Anterior", "Posterior"}
    for name, (low, high) in summary["mean_dice_95ci"].items():
        assert low <= summary["mean_dice"][name] <= high
    # both members trained, and their average was written for each held-out subject
    assert (tmp_path / "fold0" / "model.pt").is_file() and (tmp_path / "fold0-seed1" / "model.pt").is_file()
    assert len(list((tmp_path / "predictions").glob("*.nii.gz"))) == 2


def test_storage_benchmark_times_region_reads_of_the_preprocessed_arrays(tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "storage.py"), "--only", "task04", "--reads", "3",
               "--data", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["format"]: row for row in json.loads(done.stdout.strip().splitlines()[-1])}
    npy = rows["npy"]
    # 32 subjects of 36x50x35 float32 (cropped to their non-zero box) and uint8 labels: 7.5-14 MB
    assert 7.0 < npy["disk_mb"] < 15.0
    assert all(0 < npy[key] < 1000 for key in npy if key.endswith(" ms"))
