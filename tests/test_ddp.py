"""train.devices > 1: DistributedDataParallel on the CPU (gloo, 2 processes) with the synthetic task.

What a real multi-GPU run relies on, checked without mocks through the DDP diagnostics files
(``MSDSEG_DDP_DIAGNOSTICS``): each epoch the ranks draw disjoint subjects that together cover the
training set, the weights are identical on both ranks after a step (gradients synchronised), and
rank 0's model.pt loads and predicts in a single process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import torchio as tio
from torch.utils.data.distributed import DistributedSampler

from helpers import plan, tiny_config, training_rows
from msdseg.data.normalize import preprocessing
from msdseg.data.subjects import subjects_from_paths
from msdseg.errors import MsdsegError
from msdseg.model.sliding_window import predict_probabilities
from msdseg.model.unet import load_model
from msdseg.train.queue import EpochQueue, make_queue
from msdseg.train.ranks import DDP_DIAGNOSTICS, DDP_DIAGNOSTICS_ENV
from msdseg.train.state import CHECKPOINT, LOG
from msdseg.train.trainer import train

torch.set_num_threads(1)
PLAN = plan()  # the synthetic task's labels, z-score, no resampling


def _config(**train: Any) -> dict[str, Any]:
    # per rank and epoch: 2 of the 4 subjects x 2 patches = 2 steps of batch 2
    settings = {"devices": 2, "patch_size": [24, 24, 16], "batch_size": 2, "iterations": 8,
                "samples_per_volume": 2, "queue_length": 4, "learning_rate": 0.01,
                "validate_every": 4, "checkpoint_every": 4, "augmentation": {"affine": False}, **train}
    return tiny_config(infer={"batch_size": 2}, **settings)


@pytest.fixture
def ddp_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DDP_DIAGNOSTICS_ENV, "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned ranks inherit the environment


def test_ddp_two_ranks_gloo(synthetic_dir: Path, tmp_path: Path, ddp_env: None) -> None:
    rows = training_rows(synthetic_dir)
    assert len(rows) == 4
    ids = {row["subject"] for row in rows}
    out = tmp_path / "fold0"
    # all 4 subjects train (an even split); validation reuses one, only to see rank 0 validate
    model_path = train(rows, rows[:1], PLAN, _config(), out, fold=0, threads=2)
    assert model_path == out / "model.pt" and model_path.is_file()
    assert not (out / CHECKPOINT).exists()

    log = pd.read_csv(out / LOG)
    assert log["iteration"].tolist() == list(range(1, 9))
    assert log.dropna(subset=["val_dice_liver"])["iteration"].tolist() == [4, 8]

    ranks = [json.loads((out / DDP_DIAGNOSTICS.format(rank=r)).read_text()) for r in (0, 1)]
    assert [(d["rank"], d["world_size"], d["iterations"]) for d in ranks] == [(0, 2, 8), (1, 2, 8)]
    epochs = [d["subjects_per_epoch"] for d in ranks]
    assert len(epochs[0]) == len(epochs[1]) >= 4  # 8 steps x 2 patches / (2 subjects x 2 patches)
    for first, second in zip(*epochs):
        assert len(first) == len(second) == 2
        assert not set(first) & set(second), (first, second)
        assert set(first) | set(second) == ids
    assert len({tuple(e) for e in epochs[0]}) > 1, "set_epoch never reshuffled the subjects"

    # synchronised gradients: both ranks hold the same weights after step 1 and after the last
    hashes = [d["weights_sha256"] for d in ranks]
    assert set(hashes[0]) == {"1", "8"} and hashes[0] == hashes[1]
    assert hashes[0]["1"] != hashes[0]["8"]

    model, meta = load_model(model_path)
    assert meta["iterations"] == 8 and meta["config"]["train"]["devices"] == 2
    assert not any(key.startswith("module.") for key in model.state_dict())
    subject = preprocessing(PLAN)(subjects_from_paths(rows[3:])[0])
    probabilities = predict_probabilities(model, subject["image"].data, meta["patch_size"], batch_size=2,
                                          device="cpu")
    assert probabilities.shape == (3, *subject["image"].shape[1:])
    torch.testing.assert_close(probabilities.sum(0), torch.ones(subject["image"].shape[1:]))


def test_ddp_rank_error_is_reported(synthetic_dir: Path, tmp_path: Path, ddp_env: None) -> None:
    """A rank that fails ends the run (no hang) with the rank's own message."""
    config = _config()
    config["train"]["class_weights"] = [1.0, 2.0]  # 2 weights for 3 labels, past load_config's check: ranks find it
    with pytest.raises(MsdsegError, match=r"rank \d of 2.*class_weights"):
        train(training_rows(synthetic_dir), [], PLAN, config, tmp_path, fold=0, threads=2)
    assert not (tmp_path / "model.pt").exists()


def test_epoch_queue_sets_the_sampler_epoch_each_pass() -> None:
    """In one process: each pass over the subjects gets the next epoch's DistributedSampler share."""
    subjects = [tio.Subject(subject=f"s{i}", image=tio.ScalarImage(tensor=torch.full((1, 8, 8, 8), float(i))),
                            label=tio.LabelMap(tensor=torch.ones(1, 8, 8, 8, dtype=torch.uint8)))
                for i in range(6)]
    config = _config(patch_size=[4, 4, 4], samples_per_volume=1, queue_length=1, sampler="uniform")
    samplers = [DistributedSampler(subjects, num_replicas=2, rank=r, shuffle=True, seed=3) for r in (0, 1)]
    queues = [make_queue(subjects, PLAN, config["train"], 3, subject_sampler=s, transform=tio.Compose([]),
                         first_epoch=5)
              for s in samplers]
    for queue in queues:
        assert isinstance(queue, EpochQueue) and not queue.shuffle_subjects
        for _ in range(3 * 3):  # 3 passes of 3 subjects, one patch each
            queue[0]
    assert [s.epoch for s in samplers] == [7, 7]
    for epoch, (first, second) in enumerate(zip(queues[0].subjects_per_epoch, queues[1].subjects_per_epoch)):
        for sampler in samplers:
            sampler.set_epoch(5 + epoch)
        assert [first, second] == [[f"s{i}" for i in sampler] for sampler in samplers]
        assert sorted(first + second) == [f"s{i}" for i in range(6)]
    assert type(make_queue(subjects, PLAN, config["train"], 3)) is tio.Queue  # one process: torchio's own queue
