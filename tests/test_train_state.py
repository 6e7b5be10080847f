"""Resume and failure paths of msdseg.train that a GPU user meets: other GPU counts, fp16 on/off, OOM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import plan, tiny_config, training_rows
from msdseg.errors import MsdsegError
from msdseg.train import loop as train_loop
from msdseg.train import state as train_state
from msdseg.train.state import CHECKPOINT
from msdseg.train.trainer import train


class FakeScaler:
    def __init__(self, enabled: bool) -> None:
        self.enabled, self.loaded = enabled, None

    def is_enabled(self) -> bool:
        return self.enabled

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.loaded = saved


@pytest.mark.parametrize(("saved", "enabled"), [({}, True), ({"scale": 65536.0}, False)])
def test_scaler_switched_on_or_off_starts_afresh(saved: dict[str, Any], enabled: bool,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    scaler = FakeScaler(enabled)
    train_state._load_scaler(scaler, saved)  # type: ignore[arg-type]
    assert scaler.loaded is None and "starts afresh" in capsys.readouterr().err
    same = FakeScaler(True)
    train_state._load_scaler(same, {"scale": 2.0})  # type: ignore[arg-type]
    assert same.loaded == {"scale": 2.0}


def test_checkpoint_from_two_gpus_resumes_on_one(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    state = train_state.rng_state()
    state["cuda"] = [torch.zeros(8, dtype=torch.uint8), torch.ones(8, dtype=torch.uint8)]  # saved with 2 GPUs
    restored: list[tuple[int, torch.Tensor]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda value, index: restored.append((index, value)))
    train_state.set_rng_state(state)
    assert [index for index, _ in restored] == [0]
    assert "checkpoint saw 2 GPU(s), this job sees 1" in capsys.readouterr().err


def test_out_of_memory_in_a_step_names_patch_batch_and_keeps_the_checkpoint(
        synthetic_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = training_rows(synthetic_dir)
    config = tiny_config(patch_size=[24, 24, 16], batch_size=2, iterations=8, samples_per_volume=2,
                         queue_length=4, validate_every=8, checkpoint_every=3, augmentation={"affine": False})
    step = train_loop._step
    calls = {"n": 0}

    def failing_step(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 5:  # cuBLAS reports its allocation failures as a plain RuntimeError
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
        return step(*args, **kwargs)

    monkeypatch.setattr(train_loop, "_step", failing_step)
    with pytest.raises(MsdsegError, match=r"out of memory at iteration 5 .*patch \[24, 24, 16\], batch 2"):
        train(rows[:3], rows[3:], plan(), config, tmp_path, fold=0)
    saved = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert saved["iteration"] == 3 and not (tmp_path / "model.pt").exists()
    monkeypatch.setattr(train_loop, "_step", step)  # a rerun resumes from it
    train(rows[:3], rows[3:], plan(), config, tmp_path, fold=0)
    assert torch.load(tmp_path / "model.pt", weights_only=True)["iterations"] == 8


def test_the_second_settlement_follows_the_pace_since_the_first() -> None:
    """A load during the first window (0.4 s/step) that ends (0.2 s/step after): the second
    settlement, at 60% of the first count, gives the budget back; a pace that slows takes it back."""
    from msdseg.train import settle

    budget_s, at = 600.0, 200
    loaded = [{"seconds_per_step": 0.4}] * at
    first, pace = settle.settled_iterations(loaded, at, at * 0.4, budget_s, 0.0)
    assert pace == pytest.approx(0.4) and first == at + int((0.94 * budget_s - at * 0.4) / 0.4)
    second_at = settle.second_point(at, first)
    assert second_at == int(0.6 * first) and second_at > at
    assert [settle.settlement_due(i, at, None, False) for i in (at - 1, at)] == [None, settle.FIRST]
    assert settle.settlement_due(second_at, at, first, False) == settle.SECOND
    assert settle.settlement_due(second_at, at, first, True) is None  # once
    quiet = loaded + [{"seconds_per_step": 0.2}] * (second_at - at)
    elapsed = at * 0.4 + (second_at - at) * 0.2
    second, pace = settle.settled_iterations(quiet, second_at, elapsed, budget_s, 0.0, since=at)
    assert pace == pytest.approx(0.2) and second > first
    assert elapsed + (second - second_at) * 0.2 == pytest.approx(0.94 * budget_s, abs=0.2)
    slower = loaded + [{"seconds_per_step": 0.6}] * (second_at - at)
    assert settle.settled_iterations(slower, second_at, at * 0.4 + (second_at - at) * 0.6, budget_s, 0.0,
                                     since=at)[0] < first
    assert settle.second_point(at, int(at / 0.6)) is None  # too close to the first: no second


def test_a_repeat_reuses_both_recorded_settlements(tmp_path: Path) -> None:
    from msdseg.train import settle

    first = settle.Settled("id", 20, 300, 30, 0.05)
    message = settle.record_settlement(tmp_path, None, settle.FIRST, first, 0, (10, 20), 30)
    assert "300 iterations" in message and "planned 30" in message
    record = settle.read_record(tmp_path, "id")
    assert record is not None and record.at_step(20, settle.FIRST) == (300, 0.05)
    assert record.at_step(180, settle.SECOND) is None and record.final == 300
    second = settle.Settled("id", 180, 340, 30, 0.04)
    settle.record_settlement(tmp_path, record, settle.SECOND, second, 0, (20, 180), 300)
    record = settle.read_record(tmp_path, "id")
    assert record is not None and record.at_step(20, settle.FIRST) == (300, 0.05)
    assert record.at_step(180, settle.SECOND) == (340, 0.04) and record.final == 340
    assert settle.read_record(tmp_path, "another identity") is None
