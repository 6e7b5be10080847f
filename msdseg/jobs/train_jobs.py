"""Training jobs: what the plan_training and train rules do, from their inputs to their outputs.

Each function is one rule's job, so that its script only reads ``snakemake.*`` and calls it; the
decisions (which device plans, when the iterations are settled, which subjects a fold trains on)
live here, where they are tested and importable without Snakemake.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from msdseg.config import check_labels
from msdseg.decathlon import label_map
from msdseg.devices import cpu_has_native_bf16
from msdseg.files import write_text

logger = logging.getLogger(__name__)  # its log lines name the job that wrote them


def plan_training_job(
    plan_path: str,
    manifest_path: str,
    rows: Sequence[Mapping[str, Any]],
    user: Mapping[str, Any],
    settings: Mapping[str, Any],
    declared: Mapping[str, Any],
    budget_minutes: float,
    n_folds: int,
    threads: int,
    out_plan: str,
    out_table: str,
) -> dict[str, Any]:
    """Rule plan_training: the training plan for the device this job runs on, written as JSON and CSV.

    ``settings`` is the config's ``plan`` section (device, gpu_memory_gb); ``declared`` the seed,
    model and train sections the pipeline's pace is measured with. Where the planned device is
    this machine, the step is probed and the iterations are settled from the whole pipeline's
    pace on ``rows``; otherwise the train job settles them where it runs.
    """
    import torch

    from msdseg.data.manifest import read_manifest
    from msdseg.plan.fingerprint import Fingerprint, detect_device
    from msdseg.plan.preprocessing import read_plan
    from msdseg.plan.record import TrainingPlan
    from msdseg.plan.training import plan_training
    from msdseg.train.probe import settle_iterations, torch_probe

    plan = read_plan(plan_path)
    check_labels({"class_weights": user.get("train.class_weights"),
                  "label_probabilities": user.get("train.label_probabilities")},
                 label_map(plan["labels"]), f"{plan_path} (the task's labels)")
    fingerprint = Fingerprint.from_manifest(read_manifest(manifest_path), plan)
    torch.set_num_threads(threads)
    device, here = detect_device(settings["device"], threads, settings["gpu_memory_gb"])
    native_bf16 = device.type == "cpu" and cpu_has_native_bf16()
    probe = None
    if here:
        precision = user.get("train.precision", "bf16" if native_bf16 else "auto")
        probe = torch_probe(fingerprint, torch.device(device.type), precision)
    planned = plan_training(fingerprint, device, budget_minutes, user, probe=probe, n_folds=n_folds,
                            cpu_native_bf16=native_bf16).as_dict()
    if here and "train.iterations" not in user:  # the step misses the data: settle from the pipeline's pace
        budgeted = {**declared, "train": {**declared["train"], "max_minutes": budget_minutes}}
        planned = settle_iterations(planned, rows, plan, budgeted, threads, n_folds, device.type)
    settled = TrainingPlan.from_dict(planned)
    spacing = plan["resolution"]["reason"] if plan["resolution"] else "full resolution"
    logger.info("training plan for %s at %s mm (%s):\n%s", device.describe(), plan["target_spacing"], spacing,
                settled.table())
    write_text(json.dumps(planned, indent=2, sort_keys=True) + "\n", out_plan)
    write_text(settled.csv(), out_table)
    return planned


def train_fold_job(
    manifest_path: str,
    fold: int,
    rows: Sequence[Mapping[str, Any]],
    plan_path: str,
    training_plan_path: str,
    declared: Mapping[str, Any],
    n_folds: int,
    threads: int,
    out_model: str,
    out_curve: str,
) -> Path:
    """Rule train: fold ``fold``'s U-Net on every other fold's subjects, validated on its own; then the curve.

    ``declared`` holds only the sections the rule declares (seed, model, train), so a change
    elsewhere in the config never reaches training; the training plan's values are applied to
    it. A plan made on another machine (its iterations unset) is settled here first.
    """
    from msdseg.data.manifest import read_manifest, split_fold
    from msdseg.plan.preprocessing import read_plan
    from msdseg.plan.record import apply_plan, plan_table
    from msdseg.report.plots import plot_learning_curve
    from msdseg.train.probe import settle_iterations
    from msdseg.train.trainer import LOG, train

    split = split_fold(read_manifest(manifest_path).set_index("subject")["fold"].to_dict(), fold)
    if not split.held_out:
        logging.getLogger("msdseg.train").warning(
            "fold %d: the task has one labelled subject, so it trains and validates on %s; "
            "its Dice is not held out (dice_summary.csv: held_out false).", fold, split.validation[0])
    training_plan = json.loads(Path(training_plan_path).read_text())
    plan = read_plan(plan_path)
    fold_rows = [row for row in rows if row["subject"] in split.training]
    if training_plan["settings"]["train.iterations"]["value"] is None:  # planned on another machine
        training_plan = settle_iterations(training_plan, fold_rows, plan, declared, threads, n_folds,
                                          probe_step=True)
    logger.info("training plan:\n%s", plan_table(training_plan))
    out_dir = Path(out_model).parent
    model_path = train(fold_rows, [row for row in rows if row["subject"] in split.validation], plan,
                       apply_plan(declared, training_plan), out_dir=out_dir, fold=fold, threads=threads)
    plot_learning_curve(out_dir / LOG, out_curve)
    return model_path
