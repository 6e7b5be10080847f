"""msdseg.train and msdseg.data on 8 real hippocampus subjects (raw 1 mm volumes), tiny settings."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import torchio as tio

from helpers import HIPPOCAMPUS_LABELS, plan, tiny_config, training_rows
from msdseg.data.normalize import preprocessing
from msdseg.data.subjects import subjects_from_paths
from msdseg.devices import cpu_has_native_bf16
from msdseg.errors import SubjectError
from msdseg.model.sliding_window import predict_probabilities
from msdseg.model.unet import load_model
from msdseg.train.augmentation import training_transform
from msdseg.train.queue import SafeLabelSampler
from msdseg.train.settle import RECORD
from msdseg.train.state import CHECKPOINT
from msdseg.train.trainer import train

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
PLAN = plan("Task04_Hippocampus", HIPPOCAMPUS_LABELS, modality="MRI", target_spacing=[1.0, 1.0, 1.0])
LOG_COLUMNS = ["iteration", "loss", "lr", "val_dice_Anterior", "val_dice_Posterior",
               "patches_per_s", "seconds_per_step", "data_wait_s"]


TINY_TRAIN = {"patch_size": [24, 24, 24], "batch_size": 2, "iterations": 12, "samples_per_volume": 2,
              "queue_length": 8, "learning_rate": 0.01, "validate_every": 6, "checkpoint_every": 6,
              "augmentation": {"affine": False}}


def _config(**train: Any) -> dict[str, Any]:
    """The tiny hippocampus config these tests train with; keywords update the train section."""
    model = train.pop("model", {})
    return tiny_config("Task04_Hippocampus", model=model, infer={"batch_size": 2}, **{**TINY_TRAIN, **train})


@pytest.fixture(scope="module")
def rows(hippocampus_dir: Path) -> list[dict[str, str]]:
    return training_rows(hippocampus_dir, 8)


def test_train_3d_label_sampler_loss_goes_down_and_files_written(rows: list[dict[str, str]], tmp_path: Path) -> None:
    config = _config(iterations=24, validate_every=12, label_probabilities={0: 0.2, 1: 0.3, 2: 0.5},
                     class_weights=[1.0, 1.0, 2.0])
    model_path = train(rows[:6], rows[6:], PLAN, config, tmp_path / "fold0", fold=0)
    assert model_path == tmp_path / "fold0" / "model.pt"
    log = pd.read_csv(tmp_path / "fold0" / "training_log.csv")
    assert list(log.columns) == LOG_COLUMNS
    assert log["iteration"].tolist() == list(range(1, 25))
    assert log["loss"].iloc[-4:].mean() < log["loss"].iloc[:4].mean()
    validated = log.dropna(subset=["val_dice_Anterior"])["iteration"].tolist()
    assert validated == [12, 24]
    assert (log["data_wait_s"] >= 0).all() and (log["patches_per_s"] > 0).all()
    assert not (tmp_path / "fold0" / CHECKPOINT).exists()
    model, meta = load_model(model_path)
    assert meta["iterations"] == 24 and meta["fold"] == 0 and meta["patch_size"] == [24, 24, 24]
    assert meta["labels"] == PLAN["labels"] and meta["plan"] == PLAN
    assert set(meta["best_val_dice"]) == {"Anterior", "Posterior"}
    assert meta["best_iteration"] in (12, 24)
    assert meta["config"]["train"]["iterations"] == 24 and meta["mirror_axes"] == [0, 1, 2]


def test_train_2d_uniform_sampler(rows: list[dict[str, str]], tmp_path: Path) -> None:
    config = _config(model={"spatial_dims": 2, "deep_supervision": True}, patch_size=[32, 32, 1], batch_size=4,
                     sampler="uniform", iterations=10, validate_every=10)
    model_path = train(rows[:6], rows[6:7], PLAN, config, tmp_path, fold=1)
    model, meta = load_model(model_path)
    assert model.spatial_dims == 2 and meta["mirror_axes"] == [0, 1]
    log = pd.read_csv(tmp_path / "training_log.csv")
    assert len(log) == 10 and log["val_dice_Anterior"].notna().sum() == 1
    subject = preprocessing(meta["plan"])(subjects_from_paths(rows[7:])[0])
    probabilities = predict_probabilities(model, subject["image"].data, meta["patch_size"], None, batch_size=8)
    assert probabilities.shape == (3, *subject["image"].shape[1:])


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.skipif(
    not cpu_has_native_bf16(), reason="this CPU computes bf16 only by emulation: msdseg trains fp32 here"))])
def test_sgd_trains(rows: list[dict[str, str]], tmp_path: Path, precision: str) -> None:
    """nnU-Net's optimiser, in fp32 and (on CPUs with native bf16) in bf16 autocast."""
    config = _config(optimizer="sgd", precision=precision, iterations=16, validate_every=5, keep="last")
    model_path = train(rows[:6], rows[6:7], PLAN, config, tmp_path, fold=0)
    log = pd.read_csv(tmp_path / "training_log.csv")
    assert log["loss"].notna().all() and log["loss"].iloc[-4:].mean() < log["loss"].iloc[:4].mean()
    _, meta = load_model(model_path)
    assert meta["config"]["train"]["optimizer"] == "sgd" and meta["precision"] == precision
    assert meta["best_iteration"] == 16  # keep: last writes the final weights whatever they score


def _write_like(reference: str, array: np.ndarray, path: Path) -> str:
    image = nib.load(reference)
    nib.save(nib.Nifti1Image(array, image.affine), path)
    return str(path)


def test_small_volume_and_empty_label_map_train(rows: list[dict[str, str]], tmp_path: Path) -> None:
    """A volume smaller than the patch is padded; an empty label map falls back to uniform sampling."""
    image = np.asarray(nib.load(rows[0]["image"]).dataobj)
    label = np.asarray(nib.load(rows[0]["label"]).dataobj)
    small = {"subject": "small",
             "image": _write_like(rows[0]["image"], image[5:20, 10:30, 8:22].copy(), tmp_path / "small.nii.gz"),
             "label": _write_like(rows[0]["label"], label[5:20, 10:30, 8:22].copy(), tmp_path / "small_l.nii.gz")}
    empty = {"subject": "empty", "image": rows[1]["image"],
             "label": _write_like(rows[1]["label"], np.zeros_like(np.asarray(nib.load(rows[1]["label"]).dataobj)),
                                  tmp_path / "empty_l.nii.gz")}
    config = _config(label_probabilities={0: 0.0, 1: 1.0, 2: 1.0}, samples_per_volume=4, iterations=6)

    sampler = SafeLabelSampler((24, 24, 24), label_name="label", label_probabilities={0: 0.0, 1: 1.0, 2: 1.0})
    for row in (small, empty):
        transform = training_transform(PLAN, config["train"], config["model"]["spatial_dims"])
        subject = transform(subjects_from_paths([row])[0])
        patches = list(sampler(subject, num_patches=3))
        assert [p["image"].shape for p in patches] == [(1, 24, 24, 24)] * 3

    train([small, empty, *rows[2:4]], [small], PLAN, config, tmp_path / "out", fold=0)
    assert (tmp_path / "out" / "model.pt").is_file()


def test_weighted_sampler_needs_a_sampling_map(rows: list[dict[str, str]], tmp_path: Path) -> None:
    config = _config(sampler="weighted", iterations=3, validate_every=100)
    with pytest.raises(SubjectError, match=f"{rows[0]['subject']}.*sampling_map"):
        train(rows[:2], [], PLAN, config, tmp_path / "missing", fold=0)
    weighted = []
    for row in rows[:3]:
        label = np.asarray(nib.load(row["label"]).dataobj)
        weight = _write_like(row["label"], (1.0 + 4.0 * (label > 0)).astype(np.float32),
                             tmp_path / f"{row['subject']}_w.nii.gz")
        weighted.append({**row, "sampling_map": weight})
    train(weighted, [], PLAN, config, tmp_path / "out", fold=0)
    assert len(pd.read_csv(tmp_path / "out" / "training_log.csv")) == 3


def test_same_seed_same_log(rows: list[dict[str, str]], tmp_path: Path) -> None:
    """Queue workers included (num_workers=1): the seeded run repeats exactly on the CPU."""
    config = _config(num_workers=1, iterations=8, validate_every=4, augmentation={"affine": True, "elastic": True})
    logs = []
    for run in ("a", "b"):
        train(rows[:5], rows[5:6], PLAN, config, tmp_path / run, fold=0)
        logs.append(pd.read_csv(tmp_path / run / "training_log.csv"))
    deterministic = ["iteration", "loss", "lr", "val_dice_Anterior", "val_dice_Posterior"]
    pd.testing.assert_frame_equal(logs[0][deterministic], logs[1][deterministic])
    other = _config(num_workers=1, iterations=8, validate_every=4, augmentation={"affine": True, "elastic": True})
    other["seed"] = 1
    train(rows[:5], rows[5:6], PLAN, other, tmp_path / "c", fold=0)
    assert not pd.read_csv(tmp_path / "c" / "training_log.csv")["loss"].equals(logs[0]["loss"])


def _training_script(rows: list[dict[str, str]], out: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A script that trains fold 0 into ``out`` with ``_config(**json argv[1])``, and its environment."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys, torch
        from pathlib import Path
        torch.set_num_threads(1)
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_train import PLAN, _config
        from msdseg.train.trainer import train
        rows = json.loads({json.dumps(json.dumps(rows))})
        config = _config(**json.loads(sys.argv[1]))
        train(rows[:6], rows[6:], PLAN, config, Path({str(out)!r}), fold=0)
    """))
    return script, {**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}


def _kill_when(process: subprocess.Popen, ready: Any, what: str) -> None:
    deadline = time.monotonic() + 90
    while not ready():
        assert process.poll() is None, process.stderr.read().decode()[-2000:] if process.stderr else ""
        assert time.monotonic() < deadline, f"no {what} within 90 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_resume_after_sigkill_continues_the_iteration_count(rows: list[dict[str, str]], tmp_path: Path) -> None:
    out = tmp_path / "fold0"
    settings = {"iterations": 40, "checkpoint_every": 3, "validate_every": 100}
    script, env = _training_script(rows, out, tmp_path)

    first = subprocess.Popen([sys.executable, str(script), json.dumps(settings)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _kill_when(first, (out / CHECKPOINT).exists, "checkpoint")
    assert not (out / "model.pt").exists(), "the run finished before it could be killed"
    saved = torch.load(out / CHECKPOINT, weights_only=True)
    assert saved["iteration"] >= 3 and saved["iteration"] % 3 == 0
    assert set(saved) >= {"model", "optimizer", "scheduler", "scaler", "rng", "log", "config_hash"}

    second = subprocess.run([sys.executable, str(script), json.dumps(settings)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr[-2000:]
    resumed_at = saved["iteration"]
    assert f"at iteration {resumed_at}" in second.stderr
    log = pd.read_csv(out / "training_log.csv")
    assert log["iteration"].tolist() == list(range(1, 41))  # continued, not restarted
    assert load_model(out / "model.pt")[1]["iterations"] == 40

    # another training config does not resume: it starts over and says so
    (out / "model.pt").unlink()
    torch.save(saved, out / CHECKPOINT)
    changed = subprocess.run([sys.executable, str(script), json.dumps({**settings, "learning_rate": 0.02})],
                             env=env, capture_output=True, text=True, timeout=120)
    assert changed.returncode == 0, changed.stderr[-2000:]
    assert "another training config" in changed.stderr and "starting over" in changed.stderr
    assert pd.read_csv(out / "training_log.csv")["lr"].iloc[0] == pytest.approx(0.02)


def test_the_run_settles_its_iterations_once_and_a_repeat_reuses_the_record(rows: list[dict[str, str]],
                                                                          tmp_path: Path) -> None:
    """At train.settle_at the run's own pace fixes the count to fill the budget; the number is recorded,
    so a repeat of the same identity trains exactly as many steps, the same ones, whatever its clock says."""
    config = _config(iterations=30, settle_at=20, validate_every=20, checkpoint_every=20, max_minutes=0.3)
    started = time.perf_counter()
    train(rows[:6], rows[6:], PLAN, config, tmp_path / "a", fold=0)
    used = (time.perf_counter() - started) / (0.3 * 60)
    record = json.loads((tmp_path / "a" / RECORD).read_text())
    _, meta = load_model(tmp_path / "a" / "model.pt")
    assert record["at"] == 20 and record["planned"] == 30 and record["iterations"] >= 20
    # settled again, once, at 60% of the first count, from the pace since the first
    assert record["second_at"] == math.floor(0.6 * record["iterations"]) and record["second_iterations"] >= 20
    final = record["second_iterations"]
    assert meta["iterations_settled"] == final and meta["resettled"] and meta["iterations_planned"] == 30
    assert meta["iterations"] == final or meta["budget_exhausted"]
    assert used <= 1.1, f"training took {used:.2f} of its budget"

    # the repeat: the record and a larger budget (max_minutes is not part of the run's identity)
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / RECORD, tmp_path / "b" / RECORD)
    train(rows[:6], rows[6:], PLAN, {**config, "train": {**config["train"], "max_minutes": 10}}, tmp_path / "b",
          fold=0)
    assert load_model(tmp_path / "b" / "model.pt")[1]["iterations"] == final
    log_a, log_b = (pd.read_csv(tmp_path / run / "training_log.csv")[["iteration", "loss", "lr"]] for run in "ab")
    pd.testing.assert_frame_equal(log_a, log_b.iloc[:len(log_a)])


def test_a_run_killed_after_settling_resumes_to_the_settled_count(rows: list[dict[str, str]], tmp_path: Path) -> None:
    out = tmp_path / "fold0"
    settings = {"iterations": 40, "settle_at": 20, "checkpoint_every": 5, "validate_every": 100, "max_minutes": 0.5}
    script, env = _training_script(rows, out, tmp_path)

    def settled_and_saved() -> bool:
        if not (out / RECORD).exists() or not (out / CHECKPOINT).exists():
            return False
        try:
            return torch.load(out / CHECKPOINT, weights_only=True)["iteration"] > 20
        except Exception:  # noqa: BLE001 - caught while it is being renamed into place
            return False

    first = subprocess.Popen([sys.executable, str(script), json.dumps(settings)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _kill_when(first, settled_and_saved, "settled checkpoint")
    record = json.loads((out / RECORD).read_text())
    saved = torch.load(out / CHECKPOINT, weights_only=True)
    assert saved["settled"] == (record["second_iterations"] if saved["resettled"] else record["iterations"])
    second = subprocess.run([sys.executable, str(script), json.dumps(settings)], env=env,
                            capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stderr[-2000:]
    meta, record = load_model(out / "model.pt")[1], json.loads((out / RECORD).read_text())
    final = record["second_iterations"] if record.get("second_at") else record["iterations"]
    assert meta["iterations_settled"] == final and meta["resettled"] == bool(record.get("second_at"))
    assert meta["iterations"] == final or meta["budget_exhausted"]


def test_preprocessing_ct_zscore_none() -> None:
    tensor = torch.tensor([[-2000.0, -100.0, 40.0, 500.0, 3000.0]]).reshape(1, 5, 1, 1)
    subject = tio.Subject(image=tio.ScalarImage(tensor=tensor))
    ct = {"normalization": "ct", "ct_window": [-100.0, 500.0], "ct_mean": 100.0, "ct_std": 50.0}
    out = preprocessing(ct)(subject)["image"].data.flatten()
    torch.testing.assert_close(out, torch.tensor([-4.0, -4.0, -1.2, 8.0, 8.0]))
    z = preprocessing({"normalization": "zscore"})(subject)["image"].data
    assert abs(float(z.mean())) < 1e-5 and abs(float(z.std()) - 1) < 1e-5
    assert torch.equal(preprocessing({"normalization": "none"})(subject)["image"].data, tensor)
    two = tio.Subject(image=tio.ScalarImage(tensor=torch.stack([tensor[0], 100 * tensor[0] + 7])))
    both = preprocessing({"normalization": "zscore", "n_channels": 2})(two)["image"].data
    torch.testing.assert_close(both[0], both[1])  # each channel on its own scale
