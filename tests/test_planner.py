"""The planner: choices for the ten MSD tasks beside nnU-Net's, budgets, devices, user keys, config layering."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from helpers import plan, tiny_config, training_rows
from msdseg.config import ConfigError, layered_config
from msdseg.decathlon import NNUNET_PLANS, TASKS
from msdseg.errors import PlanError
from msdseg.model.unet import load_model
from msdseg.plan.budget import (
    MAX_VALIDATION_PATCHES,
    MIN_ITERATIONS,
    PIPELINE_OVERHEAD,
    SETTLE_MIN_STEPS,
    SETTLE_SHARE,
    TARGET_ITERATIONS,
    USABLE_SHARE,
    VALIDATION_SHARE,
    VALIDATIONS,
    settle_budget,
)
from msdseg.plan.fingerprint import DeviceSpec, published_fingerprint
from msdseg.plan.network import Network, context_floor, network_for
from msdseg.plan.preprocessing import median_target_spacing
from msdseg.plan.record import apply_plan
from msdseg.plan.resolution import MAX_COARSENING, plan_resolution, resolution_for_cohort
from msdseg.plan.training import plan_training
from msdseg.train import loop as train_loop
from msdseg.train.probe import Pace, pipeline_pace
from msdseg.train.trainer import train

GPU_24GB = DeviceSpec("cuda", threads=8, memory_gb=24.0, name="24 GB")


def flop_probe(seconds_per_gflop: float = 0.02) -> Any:
    """A deterministic stand-in for a measured step: time proportional to the network's work."""
    def probe(network: Network, batch: int) -> float:
        return 3 * batch * network.flops(1) / 1e9 * seconds_per_gflop
    return probe


# nnU-Net's published 3d_fullres plans for the ten MSD tasks, patch [x, y, z] in voxels and target
# spacing [x, y, z] in mm, as copied by MONAI's dynunet_pipeline
# (github.com/Project-MONAI/tutorials, modules/dynunet_pipeline/task_params.py: patch_size, spacing).
# Typed here on purpose: the reference must not come from the project's own tables.
NNUNET_PUBLISHED = {
    "Task01_BrainTumour": ([128, 128, 128], [1.0, 1.0, 1.0]),
    "Task02_Heart": ([160, 192, 80], [1.25, 1.25, 1.37]),
    "Task03_Liver": ([128, 128, 128], [0.77, 0.77, 1.0]),
    "Task04_Hippocampus": ([40, 56, 40], [1.0, 1.0, 1.0]),
    "Task05_Prostate": ([320, 256, 20], [0.62, 0.62, 3.6]),
    "Task06_Lung": ([192, 160, 80], [0.79, 0.79, 1.24]),
    "Task07_Pancreas": ([224, 224, 40], [0.8, 0.8, 2.5]),
    "Task08_HepaticVessel": ([192, 192, 64], [0.8, 0.8, 1.5]),
    "Task09_Spleen": ([192, 160, 64], [0.79, 0.79, 1.6]),
    "Task10_Colon": ([192, 160, 56], [0.78, 0.78, 3.0]),
}


def test_the_benchmarks_nnunet_table_is_the_published_one() -> None:
    """benchmarks/plan_table.py prints the planner beside msdseg.decathlon.NNUNET_PLANS: no typo there."""
    assert {task: ([*patch], [*spacing]) for task, (patch, spacing) in NNUNET_PLANS.items()} == NNUNET_PUBLISHED


@pytest.mark.parametrize("task", sorted(NNUNET_PUBLISHED))
def test_plans_agree_with_nnunet_on_spacing_and_gpu_patch(task: str) -> None:
    """On a 24 GB GPU the planner lands near nnU-Net: same spacing (3%), each patch axis within 0.6-1.5x.

    Measured: every axis between 0.67x (Spleen x) and 1.25x (Spleen z); the whole patch 0.51-1.0x.
    """
    fingerprint = published_fingerprint(TASKS[task])
    patch, spacing = NNUNET_PUBLISHED[task]
    assert np.allclose(fingerprint.target_spacing, spacing, rtol=0.03), (fingerprint.target_spacing, spacing)
    gpu = plan_training(fingerprint, GPU_24GB, 60, {})
    planned = gpu.value("train.patch_size")
    per_axis = [p / q for p, q in zip(planned, patch)]
    assert all(0.6 <= r <= 1.5 for r in per_axis), f"{task}: planned {planned} vs nnU-Net {patch} ({per_axis})"
    ratio = float(np.prod(planned)) / float(np.prod(patch))
    assert 0.5 <= ratio <= 1.5, f"{task}: planned {planned} vs nnU-Net {patch} ({ratio:.2f}x the volume)"
    assert gpu.value("train.batch_size") >= 2 and gpu.value("model.spatial_dims") == 3
    assert gpu.value("train.class_weights") is None
    assert sum(gpu.value("train.label_probabilities").values()) == pytest.approx(1.0, abs=1e-3)
    assert gpu.value("train.iterations") is None  # no probe here: the train job settles it on its GPU
    strides = gpu.value("model.strides")
    assert len(strides) == gpu.value("model.depth")
    for axis in range(3):  # the patch divides by the pooling
        assert planned[axis] % int(np.prod([s[axis] for s in strides])) == 0


def test_target_spacing_of_an_anisotropic_cohort_is_its_median() -> None:
    """Prostate-like 0.6 x 0.6 x 3.6 mm: each axis keeps its own median; nothing becomes isotropic."""
    spacings = np.array([[0.6, 0.6, 3.6], [0.62, 0.62, 3.6], [0.65, 0.65, 3.6], [0.6, 0.6, 3.6]])
    shapes = np.array([[320, 320, 20], [320, 320, 18], [256, 256, 24], [320, 320, 20]])
    assert median_target_spacing(spacings, shapes) == pytest.approx([0.61, 0.61, 3.6])


def test_target_spacing_of_thick_and_thin_slices_takes_the_thin_tenth() -> None:
    """A mixed cohort: 5 mm slices in most scans, 1.5 mm in a few. z is over 3x coarser and has under a
    third of the in-plane voxels, so z takes the 10th percentile (nnU-Net's rule), not the 5 mm median."""
    z = [5.0] * 8 + [1.5, 1.5]
    spacings = np.array([[0.8, 0.8, s] for s in z])
    shapes = np.array([[512, 512, 60 if s == 5.0 else 200] for s in z])
    target = median_target_spacing(spacings, shapes)
    assert target[:2] == pytest.approx([0.8, 0.8])
    assert target[2] == pytest.approx(float(np.percentile(z, 10))) and target[2] == pytest.approx(1.5)
    # the same cohort without the thin scans is a plain median again
    assert median_target_spacing(spacings[:8], shapes[:8]) == pytest.approx([0.8, 0.8, 5.0])


def test_target_spacing_never_goes_finer_than_the_in_plane_axes() -> None:
    """Two 0.5 mm scans among 5 mm ones: the 10th percentile is 0.5 mm, but z stops at the in-plane 1 mm."""
    spacings = np.array([[1.0, 1.0, 5.0]] * 8 + [[1.0, 1.0, 0.5]] * 2)
    shapes = np.array([[256, 256, 30]] * 10)
    assert median_target_spacing(spacings, shapes) == pytest.approx([1.0, 1.0, 1.0])


def test_anisotropic_tasks_pool_in_plane_first() -> None:
    prostate = plan_training(published_fingerprint(TASKS["Task05_Prostate"]), GPU_24GB, 60, {})
    assert prostate.value("model.strides")[0] == [2, 2, 1]


def test_cpu_budget_sets_iterations_and_cadence_from_the_probe() -> None:
    fingerprint = published_fingerprint(TASKS["Task04_Hippocampus"])
    cpu = plan_training(fingerprint, DeviceSpec("cpu", threads=2), 15, {}, probe=flop_probe())
    step = cpu.seconds_per_step
    iterations = cpu.value("train.iterations")
    assert step and iterations * step <= 15 * 60 * 0.9
    assert iterations >= 1000
    assert 1 <= iterations / cpu.value("train.validate_every") <= 5.01
    assert cpu.settings["train.iterations"].source == "planned" and "s/step" in cpu.settings["train.iterations"].reason


def test_a_short_budget_buys_fewer_steps_not_patches_without_context() -> None:
    fingerprint = published_fingerprint(TASKS["Task04_Hippocampus"])
    short = plan_training(fingerprint, DeviceSpec("cpu", threads=2), 3, {}, probe=flop_probe(0.1))
    patch = short.value("train.patch_size")
    floor = context_floor(fingerprint, 3)
    assert all(p >= f for p, f in zip(patch, floor)), patch
    assert np.prod(patch) <= 2.5 * np.prod(floor), patch  # and no larger than it needs to be
    assert short.value("train.iterations") < TARGET_ITERATIONS
    assert "context" in short.settings["train.patch_size"].reason
    roomy = plan_training(fingerprint, DeviceSpec("cpu", threads=2), 15, {}, probe=flop_probe())
    assert roomy.value("train.iterations") >= TARGET_ITERATIONS


def test_a_budget_below_the_stated_minimum_is_refused_with_the_minimum() -> None:
    """The only refusal for size: fewer than MIN_ITERATIONS steps of the smallest plan with context."""
    fingerprint = published_fingerprint(TASKS["Task09_Spleen"])
    fifteen = plan_training(fingerprint, DeviceSpec("cpu", threads=2), 15, {}, probe=flop_probe())
    step = fifteen.seconds_per_step * PIPELINE_OVERHEAD["cpu"]
    minimum = MIN_ITERATIONS * step / USABLE_SHARE / 60
    with pytest.raises(PlanError, match=rf"at least {minimum:.1f} minutes here \({MIN_ITERATIONS} steps\)"):
        plan_training(fingerprint, DeviceSpec("cpu", threads=2), 0.9 * minimum, {}, probe=flop_probe())
    accepted = plan_training(fingerprint, DeviceSpec("cpu", threads=2), 1.1 * minimum, {}, probe=flop_probe())
    assert 0.9 * MIN_ITERATIONS <= accepted.value("train.iterations") < TARGET_ITERATIONS  # less validation's share


def test_classes_absent_from_every_label_get_no_patches() -> None:
    liver = dataclasses.replace(published_fingerprint(TASKS["Task03_Liver"]), absent_labels=(2,))
    probabilities = plan_training(liver, GPU_24GB, 60, {}).value("train.label_probabilities")
    assert probabilities[2] == 0.0 and probabilities[1] == pytest.approx(1 / 3, abs=1e-3)


def test_user_keys_win_and_are_marked() -> None:
    fingerprint = published_fingerprint(TASKS["Task04_Hippocampus"])
    user = {"train.patch_size": [32, 48, 32], "train.iterations": 123, "model.base_channels": 8}
    cpu = plan_training(fingerprint, DeviceSpec("cpu", threads=2), 15, user, probe=flop_probe())
    for key, value in user.items():
        assert cpu.value(key) == value and cpu.settings[key].source == "user"
    assert cpu.settings["train.batch_size"].source == "planned"


def test_plan_that_cannot_fit_stops_with_numbers_and_the_key() -> None:
    fingerprint = published_fingerprint(TASKS["Task03_Liver"])
    with pytest.raises(PlanError, match="plan.gpu_memory_gb"):
        plan_training(fingerprint, DeviceSpec("cuda", memory_gb=1e-5), 60, {})


@pytest.mark.parametrize("task", ["Task03_Liver", "Task06_Lung", "Task09_Spleen"])
def test_large_ct_fits_a_cpu_budget_validating_on_patches(task: str) -> None:
    """Whole-case validation of these would eat the budget (448-871 s each); patches cost a planned <= 10%."""
    fingerprint = published_fingerprint(TASKS[task])
    cpu = plan_training(fingerprint, DeviceSpec("cpu", threads=2), 15, {}, probe=flop_probe())
    step, batch = cpu.seconds_per_step, cpu.value("train.batch_size")
    patches, iterations = cpu.value("train.validation_patches"), cpu.value("train.iterations")
    validation_s = VALIDATIONS * patches * step / (3 * batch)
    assert 1 <= patches <= MAX_VALIDATION_PATCHES and validation_s <= VALIDATION_SHARE * 15 * 60
    assert iterations >= 100 and iterations * step <= 15 * 60
    assert 1 <= cpu.value("train.validation_cases") <= patches
    assert "pseudo-Dice" in cpu.settings["train.validation_patches"].reason


def test_deferred_iterations_are_settled_by_the_train_job() -> None:
    fingerprint = published_fingerprint(TASKS["Task09_Spleen"])
    planned = plan_training(fingerprint, GPU_24GB, 30, {}).as_dict()
    settled = settle_budget(planned, 0.5, n_folds=5)
    iterations = settled["settings"]["train.iterations"]["value"]
    assert iterations and iterations * 0.5 <= 30 * 60
    config = apply_plan(tiny_config(), settled)
    assert config["train"]["iterations"] == iterations
    assert config["model"]["strides"] == planned["settings"]["model.strides"]["value"]


def test_network_rounds_the_patch_to_its_pooling() -> None:
    network = network_for([35, 50, 36], [1.0, 1.0, 1.0], 3, 32)
    assert all(p % 8 == 0 for p in network.patch) and network.depth == 3


# --------------------------------------------------------------------------- config layering


def test_command_line_strings_become_numbers() -> None:
    config, chosen = layered_config({"task": "Task04_Hippocampus", "train": {"iterations": "301", "folds": "[0, 1]",
                                                                           "max_minutes": "2.5"}})
    assert config["train"]["iterations"] == 301 and config["train"]["folds"] == [0, 1]
    assert config["train"]["max_minutes"] == 2.5 and chosen["train.iterations"] == 301
    # what snakemake --config 'train={folds: [0], label_probabilities: {0: 0.5, 1: 0.5}}' hands over
    config, _ = layered_config({"task": "Task04_Hippocampus", "train": {
        "folds": ["0", "2"], "patch_size": ["32", "48", "32"],
        "label_probabilities": {"0": "0.5", "1": "0.25", "2": "0.25"}}})
    assert config["train"]["folds"] == [0, 2] and config["train"]["patch_size"] == [32, 48, 32]
    assert {int(k): v for k, v in config["train"]["label_probabilities"].items()} == {0: 0.5, 1: 0.25, 2: 0.25}


def test_a_preset_reaches_its_own_task_only() -> None:
    presets = {"Task00_SyntheticLiver": {"train": {"iterations": 300, "class_weights": [1, 1, 3]}}}
    demo, chosen = layered_config({"task": "Task00_SyntheticLiver", "presets": presets})
    assert demo["train"]["iterations"] == 300 and "train.class_weights" in chosen
    other, chosen = layered_config({"task": "Task09_Spleen", "presets": presets})
    assert other["train"]["class_weights"] is None and "train.iterations" not in chosen
    mine, _ = layered_config({"task": "Task00_SyntheticLiver", "presets": presets, "train": {"iterations": 5}})
    assert mine["train"]["iterations"] == 5  # the user's key wins over the preset


@pytest.mark.parametrize(("task", "train", "message"), [
    ("Task09_Spleen", {"class_weights": [1, 1, 3]}, "3 weights for the 2 labels"),
    ("Task01_BrainTumour", {"label_probabilities": {0: 1, 4: 1}}, "labels 4 are not in"),
])
def test_label_keys_are_checked_against_the_task_table(task: str, train: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        layered_config({"task": task, "train": train})


# --------------------------------------------------------------------------- the clock never reaches the weights


def _synthetic_config(iterations: int, every: int, minutes: float) -> dict[str, Any]:
    return tiny_config(patch_size=[24, 24, 16], batch_size=2, iterations=iterations, samples_per_volume=2,
                       queue_length=4, validate_every=every, checkpoint_every=every, max_minutes=minutes,
                       augmentation={"affine": False})


def test_slow_first_step_gives_the_same_weights(synthetic_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A busy machine (first step 3 s) used to switch the schedule to elapsed time; now it cannot."""
    rows = training_rows(synthetic_dir)
    config = _synthetic_config(12, 6, 0.5)
    train(rows[:3], rows[3:], plan(), config, tmp_path / "calm", fold=0)
    step = train_loop._step
    calls = {"n": 0}

    def slow_step(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            time.sleep(3.0)  # 3 s x 12 iterations projects past the 30 s budget
        return step(*args, **kwargs)

    monkeypatch.setattr(train_loop, "_step", slow_step)
    train(rows[:3], rows[3:], plan(), config, tmp_path / "busy", fold=0)
    calm, _ = load_model(tmp_path / "calm" / "model.pt")
    busy, meta = load_model(tmp_path / "busy" / "model.pt")
    assert meta["iterations"] == 12 and not meta["budget_exhausted"]
    for (name, a), (_, b) in zip(calm.state_dict().items(), busy.state_dict().items()):
        assert torch.equal(a, b), name


def test_budget_that_runs_out_stops_cleanly_and_says_so(synthetic_dir: Path, tmp_path: Path) -> None:
    rows = training_rows(synthetic_dir)
    config = _synthetic_config(500, 500, 0.05)
    train(rows[:3], rows[3:], plan(), config, tmp_path, fold=0)
    _, meta = load_model(tmp_path / "model.pt")
    assert meta["budget_exhausted"] and 0 < meta["iterations"] < 500


def test_the_budget_follows_the_measured_pipeline_not_the_bare_step(synthetic_dir: Path) -> None:
    """A step probed on random tensors misses the queue's loading; the pipeline's pace settles the iterations."""
    rows = training_rows(synthetic_dir)
    config = _synthetic_config(12, 6, 1.0)
    pace = pipeline_pace(rows[:3], plan(), config, threads=1)
    assert pace.step_s > 0 and pace.steps >= 3 and pace.startup_s >= 0

    fingerprint = published_fingerprint(TASKS["Task04_Hippocampus"])
    bare = plan_training(fingerprint, DeviceSpec("cpu", threads=2), 15, {}, probe=flop_probe()).as_dict()
    slower = Pace(step_s=3 * bare["seconds_per_step"], startup_s=20.0, steps=8)
    settled = settle_budget(bare, None, n_folds=5, pace=slower)
    iterations = settled["settings"]["train.iterations"]["value"]
    assert iterations < bare["settings"]["train.iterations"]["value"] / 2
    assert iterations * slower.step_s + slower.startup_s <= 15 * 60 * USABLE_SHARE
    assert "training loader measured" in settled["settings"]["train.iterations"]["reason"]
    assert settled["pipeline_seconds_per_step"] == slower.step_s


def test_the_run_settles_its_iterations_only_where_the_planner_planned_them() -> None:
    fingerprint = published_fingerprint(TASKS["Task04_Hippocampus"])
    planned = plan_training(fingerprint, DeviceSpec("cpu", threads=2), 15, {}, probe=flop_probe())
    iterations, settle_at = planned.value("train.iterations"), planned.value("train.settle_at")
    assert settle_at == max(SETTLE_MIN_STEPS, math.ceil(SETTLE_SHARE * iterations)) and 2 * settle_at <= iterations
    mine = plan_training(fingerprint, DeviceSpec("cpu", threads=2), 15, {"train.iterations": 5000}, probe=flop_probe())
    assert mine.value("train.settle_at") is None and "yours" in mine.settings["train.settle_at"].reason
    short = plan_training(fingerprint, DeviceSpec("cpu", threads=2), 0.7, {}, probe=flop_probe())
    assert short.value("train.settle_at") is None  # too few steps to measure a pace first


# --- the resolution a CPU budget affords (msdseg.plan.resolution) ---------------------------------

LARGE_TASKS = ("Task01_BrainTumour", "Task03_Liver", "Task06_Lung", "Task09_Spleen")


@pytest.mark.parametrize("task", LARGE_TASKS)
def test_a_cpu_budget_too_short_for_full_resolution_context_plans_coarser(task: str) -> None:
    """nnU-Net's low-resolution idea: the 15-minute CPU plan of a large task keeps half the median
    image in its patch at a coarser spacing, where at full resolution the patch covers less."""
    fingerprint = published_fingerprint(TASKS[task])
    resolution = plan_resolution(fingerprint.target_spacing, fingerprint.median_shape, fingerprint.n_channels,
                                 "cpu", 2, 15)
    assert resolution.factor > 1.2 and "low resolution" in resolution.reason
    assert all(c >= f for c, f in zip(resolution.spacing, fingerprint.target_spacing))
    assert resolution.as_dict()["spacing"] == list(resolution.spacing)
    coarse = fingerprint.at_spacing(resolution.spacing)
    full_plan = plan_training(fingerprint, DeviceSpec("cpu", threads=2), 15, {}, probe=flop_probe())
    coarse_plan = plan_training(coarse, DeviceSpec("cpu", threads=2), 15, {}, probe=flop_probe())
    full_cover = [p / s for p, s in zip(full_plan.value("train.patch_size"), fingerprint.median_shape)]
    coarse_cover = [p / s for p, s in zip(coarse_plan.value("train.patch_size"), coarse.median_shape)]
    assert min(full_cover) < 0.5  # the context the full-resolution plan loses
    assert min(coarse_cover) > min(full_cover)


def test_small_images_and_gpus_keep_full_resolution() -> None:
    hippocampus = published_fingerprint(TASKS["Task04_Hippocampus"])
    for minutes in (0.5, 3, 15):  # 36x50x35: the CPU plan keeps half of it at any budget
        kept = plan_resolution(hippocampus.target_spacing, hippocampus.median_shape, 1, "cpu", 2, minutes)
        assert kept.spacing == hippocampus.target_spacing and kept.as_dict() is None
    spleen = published_fingerprint(TASKS["Task09_Spleen"])
    gpu = plan_resolution(spleen.target_spacing, spleen.median_shape, 1, "cuda", 8, 15)
    assert gpu.spacing == spleen.target_spacing and gpu.as_dict() is None


@pytest.mark.parametrize("task", sorted(TASKS))
def test_a_longer_budget_never_plans_coarser_and_coarsening_is_bounded(task: str) -> None:
    fingerprint = published_fingerprint(TASKS[task])
    factors = [plan_resolution(fingerprint.target_spacing, fingerprint.median_shape, fingerprint.n_channels,
                               "cpu", 2, minutes).factor for minutes in (3, 15, 60, 240, 100_000)]
    assert factors == sorted(factors, reverse=True)
    assert factors[-1] == 1.0 and factors[0] <= MAX_COARSENING + 1e-9


def test_anisotropic_spacing_coarsens_the_fine_axes_first() -> None:
    prostate = published_fingerprint(TASKS["Task05_Prostate"])  # 0.62 x 0.62 x 3.6 mm
    resolution = plan_resolution(prostate.target_spacing, prostate.median_shape, 2, "cpu", 2, 15)
    assert resolution.spacing[2] == pytest.approx(3.6) and resolution.spacing[0] > 0.62


def test_the_plan_rules_decision_names_no_budget_and_keeps_a_users_spacing() -> None:
    """A param of rule plan: a budget change that keeps the spacing must not rerun the resampling."""
    spacings, shapes = [(0.8, 0.8, 5.0)] * 4, [(512, 512, 90)] * 4
    fifteen = resolution_for_cohort(spacings, shapes, 1, "median", None, "cpu", 2, 15)
    sixteen = resolution_for_cohort(spacings, shapes, 1, "median", None, "cpu", 2, 16)
    assert fifteen is not None and fifteen == sixteen
    assert "minute" not in fifteen["reason"] and "thread" not in fifteen["reason"]
    assert resolution_for_cohort(spacings, shapes, 1, [1.0, 1.0, 2.0], None, "cpu", 2, 15) is None
    assert resolution_for_cohort(spacings, shapes, 1, "median", [256, 256], "cpu", 2, 15) is None
    assert resolution_for_cohort(spacings, shapes, 1, "median", None, "cpu", 2, 100_000) is None
