"""Chunks of subjects per job through Snakemake: same bytes as one subject per job, minimal reruns, predict_folder.

A synthetic task (6 labelled, 2 test subjects) is given as ``source.folder``, so its images are
the workflow's own input files and touching one is what a changed subject looks like.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from helpers import assert_dice_floors
from workflow_runner import output_of, planned_jobs, snakemake

pytestmark = pytest.mark.slow

TASK = "Task00_SyntheticLiver"
BASE = {
    "manifest": {"n_folds": 3},
    "train": {"folds": [0, 1], "iterations": 120, "validate_every": 60, "checkpoint_every": 60,
              "samples_per_volume": 2, "queue_length": 8},
}
CHUNKED = {"resample": {"subjects_per_job": 4}, "infer": {"subjects_per_job": 3}}
ONE_PER_JOB = {"resample": {"subjects_per_job": 1}, "infer": {"subjects_per_job": 1}}


def _config(source: Path, jobs: dict) -> dict:
    return {**BASE, **jobs, "source": {"folder": str(source)}}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    from msdseg.data.archive import safe_extract
    from msdseg.data.synthetic import make_synthetic_task

    folder = tmp_path_factory.mktemp("source")
    make_synthetic_task(folder / "task.tar", n_train=6, n_test=2, seed=0)
    return safe_extract(folder / "task.tar", folder / TASK)


@pytest.fixture(scope="module")
def chunked_run(tmp_path_factory, source) -> Path:
    workdir = tmp_path_factory.mktemp("chunked")
    run = snakemake(workdir, config=_config(source, CHUNKED))
    assert run.returncode == 0, output_of(run)[-6000:]
    return workdir


def _files(root: Path, pattern: str) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.glob(pattern))}


def test_chunks_give_the_bytes_of_one_subject_per_job(chunked_run, source, tmp_path):
    import torch

    results = chunked_run / "results" / TASK
    jobs = {p.parent.name for p in (results / "benchmarks" / "infer_fold").rglob("*.tsv")}
    assert len(list((results / "benchmarks" / "resample_training").glob("*.tsv"))) == 2  # 6 subjects, 4 per job
    assert len(list((results / "benchmarks" / "infer_fold" / "fold0").glob("*.tsv"))) == 1
    assert jobs == {"fold0", "fold1"}
    # measured (2 cores, fp32, 120 steps): liver 0.923, cancer 0.636 over folds 0 and 1
    assert_dice_floors(results / "dice_summary.csv", {"liver": 0.75, "cancer": 0.4})

    single = tmp_path / "single"
    run = snakemake(single, config=_config(source, ONE_PER_JOB))
    assert run.returncode == 0, output_of(run)[-6000:]
    other = single / "results" / TASK
    assert len(list((other / "benchmarks" / "resample_training").glob("*.tsv"))) == 6

    for pattern in ("resampled/*/*.nii.gz", "fold*/predictions/*.nii.gz", "predictions/test/*.nii.gz"):
        chunked, one = _files(results, pattern), _files(other, pattern)
        assert chunked and chunked.keys() == one.keys(), pattern
        for name in chunked:
            assert chunked[name] == one[name], name
    for fold in (0, 1):  # same resampled bytes, same deterministic training
        weights = [torch.load(root / f"fold{fold}" / "model.pt", weights_only=True)["state_dict"]
                   for root in (results, other)]
        assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    # placed outputs are hard links to the staged chunk files, nothing is stored twice
    placed = results / "predictions" / "test" / "liver_007.nii.gz"
    assert placed.stat().st_nlink == 2


def _overwrite(path: Path, data: bytes) -> None:
    """New content in the same file (its folder, the manifest's input, unchanged)."""
    with open(path, "r+b") as handle:
        handle.write(data)
        handle.truncate()


def _rewrite(path: Path) -> None:
    """The same image in other bytes: Snakemake compares content, a touch alone is no change."""
    _overwrite(path, gzip.compress(gzip.decompress(path.read_bytes()), compresslevel=1, mtime=0))


def test_nothing_to_do_then_a_changed_subject_reruns_its_chunk_only(chunked_run, source):
    config = _config(source, CHUNKED)
    again = snakemake(chunked_run, "-n", config=config)
    assert "Nothing to be done" in output_of(again), output_of(again)[-3000:]

    test_image = source / "imagesTs" / "liver_008.nii.gz"
    train_image = source / "imagesTr" / "liver_002.nii.gz"
    originals = {path: path.read_bytes() for path in (test_image, train_image)}
    try:
        _rewrite(test_image)
        jobs = planned_jobs(snakemake(chunked_run, "-n", config=config))
        # the test list: its resampling chunk, the test chunk's predictions; no training, no fold inference
        assert jobs == {"resample_test": 1, "place_resampled_test": 2, "infer_test": 1, "place_test_prediction": 2,
                        "all": 1}, jobs

        _overwrite(test_image, originals[test_image])
        _rewrite(train_image)
        jobs = planned_jobs(snakemake(chunked_run, "-n", config=config))
        # liver_002 is in training chunk 0 (liver_001..004): that chunk only, its 4 subjects placed again
        assert jobs["resample_training"] == 1 and jobs["place_resampled_training"] == 4, jobs
        assert "resample_test" not in jobs and jobs["train"] == 2, jobs
    finally:
        for path, data in originals.items():
            _overwrite(path, data)
    again = snakemake(chunked_run, "-n", config=config)
    assert "Nothing to be done" in output_of(again), output_of(again)[-3000:]


def _two_channel(image: Path, out: Path) -> Path:
    loaded = nib.load(str(image))
    data = np.asarray(loaded.dataobj)
    nib.save(nib.Nifti1Image(np.stack([data, data], axis=-1), loaded.affine), str(out))
    return out


def test_predict_folder_names_the_mismatched_image_then_predicts_the_others(chunked_run, source, tmp_path):
    new = tmp_path / "new"
    new.mkdir()
    shutil.copy(source / "imagesTs" / "liver_007.nii.gz", new / "case_a.nii.gz")
    shutil.copy(source / "imagesTr" / "liver_002.nii.gz", new / "case_b.nii.gz")
    _two_channel(source / "imagesTs" / "liver_008.nii.gz", new / "two_channels.nii.gz")
    out = tmp_path / "out"
    config = {**_config(source, CHUNKED), "predict": {"input": str(new), "output": str(out)}}

    failed = snakemake(chunked_run, "predict_folder", config=config)
    assert failed.returncode != 0
    text = output_of(failed)
    assert "two_channels" in text and "2" in text and "input channel" in text, text[-4000:]
    assert not list(out.glob("*.nii.gz")), "a failed chunk placed outputs"

    (new / "two_channels.nii.gz").unlink()
    done = snakemake(chunked_run, "predict_folder", config=config)
    assert done.returncode == 0, output_of(done)[-6000:]
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["case_a.nii.gz", "case_b.nii.gz"]
    for name in ("case_a", "case_b"):
        predicted, image = nib.load(out / f"{name}.nii.gz"), nib.load(new / f"{name}.nii.gz")
        assert predicted.shape == image.shape and predicted.get_data_dtype() == np.uint8
        np.testing.assert_allclose(predicted.affine, image.affine, atol=1e-5)
    # the same image, the same ensemble, the same preprocessing from model.pt: the workflow's own prediction
    workflow_prediction = chunked_run / "results" / TASK / "predictions" / "test" / "liver_007.nii.gz"
    assert (out / "case_a.nii.gz").read_bytes() == workflow_prediction.read_bytes()
    # only the training run's own jobs: nothing was retrained or resampled for it
    assert "rule train" not in output_of(done) and "resample_training" not in output_of(done)
    again = snakemake(chunked_run, "predict_folder", "-n", config=config)
    assert "Nothing to be done" in output_of(again), output_of(again)[-6000:]


def test_an_infer_job_refuses_a_chunk_the_workflow_did_not_plan(chunked_run, tmp_path):
    """The job reads its subjects from manifest.csv: one other than the DAG planned stops it, naming the fix."""
    import json
    import os
    import subprocess
    import sys

    repository = Path(__file__).resolve().parents[1]
    results = chunked_run / "results" / TASK
    log = tmp_path / "infer.log"
    command = [sys.executable, str(repository / "workflow" / "scripts" / "infer.py"),
               "--manifest", str(results / "manifest.csv"), "--fold", "0", "--size", "3", "--chunk", "0000",
               "--first", "liver_999", "--count", "3", "--resampled", str(results / "resampled"),
               "--models", str(results / "fold0" / "model.pt"), "--out", str(tmp_path / "staged"),
               "--threads", "1", "--infer", json.dumps({"batch_size": 2}), "--log", str(log)]
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
    assert done.returncode != 0
    assert "but the workflow planned 3 from liver_999" in done.stderr and "run it again" in done.stderr, done.stderr
    assert "manifest.csv changed" in log.read_text()
    assert not (tmp_path / "staged").exists()
