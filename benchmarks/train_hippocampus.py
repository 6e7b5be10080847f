"""Benchmark: Task04_Hippocampus from its archive to held-out Dice within 15 CPU minutes.

Extracts ``../shared/data/Task04_Hippocampus.tar``, builds the manifest, plan and resampled
volumes with the package, holds out 40 of the 200 labelled cases (seeded), trains on the rest
with ``configs/hippocampus.yaml`` (a few of the rest validate), predicts the held-out cases with
the workflow's ``predict_subject`` (written back in their original geometry) and scores them
with its ``evaluate_subject`` against the original labels. Prints the held-out mean Dice per
class, iterations, training wall time, the patch rate the loader delivers on its own vs the rate
the model consumes in training, and the data-wait share.

The held-out cases are scored twice from the same weights, without and with mirroring test-time
augmentation (the axes the training flipped), and the paired difference is printed with its
bootstrap interval: a pair on the same model and cases, not two runs.

``--models N`` splits the training budget into N models (seeds seed..seed+N-1, each
``max_minutes / N``) whose probabilities are averaged, as the workflow's fold ensemble does.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/train_hippocampus.py [--threads 2] [--minutes 15] [--models 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # only effective before torch starts its pool

import numpy as np
import pandas as pd
import torch
import yaml

from bootstrap import bootstrap_interval
from msdseg.config import (
    PLANNED_KEYS,
    layered_config,
)
from msdseg.data.archive import safe_extract
from msdseg.data.manifest import build_manifest
from msdseg.data.preprocessed import plan_hash, preprocess_subjects
from msdseg.data.resample import resample_subject
from msdseg.data.subjects import subjects_from_paths
from msdseg.decathlon import foreground_labels, read_dataset_json
from msdseg.devices import cpu_has_native_bf16
from msdseg.infer.predict import predict_subject
from msdseg.metrics import evaluate_subject
from msdseg.plan.budget import settle_budget
from msdseg.plan.fingerprint import DeviceSpec, Fingerprint
from msdseg.plan.preprocessing import make_plan
from msdseg.plan.record import TrainingPlan, apply_plan
from msdseg.plan.training import plan_training
from msdseg.train.augmentation import mirror_axes
from msdseg.train.patches import PatchStream, make_patch_loader
from msdseg.train.probe import pipeline_pace, torch_probe
from msdseg.train.queue import make_loader, make_queue
from msdseg.train.trainer import train

ARCHIVE = ROOT.parent / "shared" / "data" / "Task04_Hippocampus.tar"


def prepare(work: Path, config: dict) -> tuple[list[dict], dict, dict[int, str], Fingerprint]:
    """Extract, manifest, plan, resample: the workflow's data stages through the package."""
    task_dir = safe_extract(ARCHIVE, work / "raw")
    dataset = read_dataset_json(task_dir)
    manifest, _ = build_manifest(dataset, n_folds=config["manifest"]["n_folds"], seed=config["seed"])
    plan = make_plan(manifest, dataset, config["preprocess"], config["task"])
    fingerprint = Fingerprint.from_manifest(manifest, plan)
    rows = []
    for row in manifest[manifest["role"] == "train"].itertuples():
        image = work / "resampled" / "imagesTr" / f"{row.subject}.nii.gz"
        label = work / "resampled" / "labelsTr" / f"{row.subject}.nii.gz"
        resample_subject(row.image, image, plan, label_in=row.label, label_out=label)
        rows.append({"subject": row.subject, "image": str(image), "label": str(label),
                     "raw_image": str(row.image), "raw_label": str(row.label)})
    if config["train"]["loader"] == "patch":  # the workflow's preprocess_training rule
        rows = preprocess_subjects(rows, plan, work / "preprocessed", int(config["seed"]))
    return rows, plan, foreground_labels(plan["labels"]), fingerprint


def planned_config(config: dict, chosen: dict, fingerprint: Fingerprint, threads: int, minutes: float,
                   rows: list[dict], plan: dict) -> dict:
    """The workflow's plan_training on this machine: the config with every planned key filled, the
    iterations settled from the pipeline's measured pace on the training ``rows``."""
    user = {key: value for key, value in chosen.items() if key in PLANNED_KEYS}
    native_bf16 = cpu_has_native_bf16()
    precision = user.get("train.precision", "bf16" if native_bf16 else "fp32")
    probe = torch_probe(fingerprint, torch.device("cpu"), precision)
    n_folds = config["manifest"]["n_folds"]
    planned = plan_training(fingerprint, DeviceSpec("cpu", threads=threads), minutes, user, probe=probe,
                            n_folds=n_folds, cpu_native_bf16=native_bf16).as_dict()
    if "train.iterations" not in user:
        budgeted = {**config, "train": {**config["train"], "max_minutes": minutes}}
        pace = pipeline_pace(rows, plan, apply_plan(budgeted, planned), threads, "cpu")
        planned = settle_budget(planned, None, n_folds, pace)
    print(TrainingPlan.from_dict(planned).table(), flush=True)
    return apply_plan(config, planned)


def loader_rate(rows: list[dict], plan: dict, config: dict, seconds: float) -> float:
    """Patches per second the training loader delivers with one worker and no model running (its capacity)."""
    cfg, dims = {**config["train"], "num_workers": 1}, config["model"]["spatial_dims"]
    if cfg["loader"] == "patch":
        stream = PatchStream([r["preprocessed"] for r in rows], plan_hash(plan), cfg, dims, int(config["seed"]))
        batches = iter(make_patch_loader(stream, cfg["batch_size"], 0, 1))
    else:
        batches = iter(make_loader(make_queue(subjects_from_paths(rows), plan, cfg, dims), cfg["batch_size"]))
    patches, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        try:
            next(batches)
        except StopIteration:  # the queue's pass over the subjects ended
            batches = iter(make_loader(make_queue(subjects_from_paths(rows), plan, cfg, dims), cfg["batch_size"]))
            continue
        patches += cfg["batch_size"]
    return patches / (time.perf_counter() - start)


def evaluate(model_paths: list[Path], rows: list[dict], labels: dict[int, str], config: dict,
             out_dir: Path, threads: int) -> pd.DataFrame:
    """Dice per held-out subject and class, through the workflow's predict and evaluate steps."""
    records = []
    for row in rows:
        prediction = out_dir / f"{row['subject']}.nii.gz"
        predict_subject(model_paths, Path(row["image"]), Path(row["raw_image"]), prediction, config["infer"],
                        device="cpu", threads=threads)
        scores = evaluate_subject(prediction, row["raw_label"], labels)
        records.append({"subject": row["subject"], **{score["class_name"]: score["dice"] for score in scores}})
    return pd.DataFrame(records)


def mean_interval(values: np.ndarray) -> list[float]:
    """95% bootstrap interval of the mean over subjects: how far another 40 cases could move it."""
    low, high = bootstrap_interval(lambda resampled: resampled.mean(axis=1), values, draws=5000)
    return [round(low, 4), round(high, 4)]


def tta_pair(by_tta: dict[bool, pd.DataFrame], seconds: dict[bool, float], labels: dict[int, str]) -> dict:
    """Held-out Dice without and with mirroring TTA from the same weights, and the paired gain's interval."""
    without, with_tta = by_tta[False], by_tta[True]
    gain = {name: (with_tta[name] - without[name]).to_numpy() for name in labels.values()}
    return {
        "without": {name: round(float(without[name].mean()), 4) for name in labels.values()},
        "with": {name: round(float(with_tta[name].mean()), 4) for name in labels.values()},
        "gain": {name: round(float(values.mean()), 4) for name, values in gain.items()},
        "gain_95ci": {name: mean_interval(values) for name, values in gain.items()},
        "seconds_without": round(seconds[False], 1), "seconds_with": round(seconds[True], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "hippocampus.yaml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--minutes", type=float, default=None, help="override train.max_minutes")
    parser.add_argument("--held-out", type=int, default=40)
    parser.add_argument("--validation", type=int, default=8, help="cases of the rest validated during training")
    parser.add_argument("--models", type=int, default=1, help="split the budget into this many averaged models")
    parser.add_argument("--split-seed", type=int, default=None,
                        help="shuffle for the held-out/validation/training split (default: the config's seed)")
    parser.add_argument("--queue-seconds", type=float, default=20.0, help="measuring time of the loader's rate")
    parser.add_argument("--loader", choices=("patch", "queue"), default=None, help="override train.loader")
    parser.add_argument("--dims", type=int, choices=(2, 3), default=None, help="force a 2D or 3D plan")
    parser.add_argument("--no-plan", action="store_true", help="train with the config as it is (a full preset)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep outputs here (default: a temporary folder)")
    args = parser.parse_args()

    with open(args.config) as handle:
        raw = yaml.safe_load(handle) or {}
    if args.minutes is not None:
        raw.setdefault("train", {})["max_minutes"] = args.minutes
    if args.dims is not None:
        raw.setdefault("model", {})["spatial_dims"] = args.dims
    if args.loader is not None:
        raw.setdefault("train", {})["loader"] = args.loader
    config, chosen = layered_config(raw)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="msdseg-bench-") as tmp:
        work = args.workdir or Path(tmp)
        t0 = time.perf_counter()
        rows, plan, labels, fingerprint = prepare(work, config)
        prepare_s = time.perf_counter() - t0
        order = list(rows)
        split_seed = config["seed"] if args.split_seed is None else args.split_seed
        random.Random(split_seed).shuffle(order)
        held_out = order[: args.held_out]
        validation = order[args.held_out: args.held_out + args.validation]
        training = order[args.held_out + args.validation:]
        if not args.no_plan:  # the fingerprint is the whole training set's, as in the workflow; the pace, the split's
            config = planned_config(config, chosen, fingerprint, args.threads,
                                    float(config["train"]["max_minutes"]) / args.models, training, plan)

        budget = float(config["train"]["max_minutes"])
        model_paths, logs, t0 = [], [], time.perf_counter()
        for member in range(args.models):
            member_config = copy.deepcopy(config)
            member_config["seed"] = int(config["seed"]) + member
            member_config["train"]["max_minutes"] = budget / args.models
            member_dir = work / ("fold0" if member == 0 else f"fold0-seed{member_config['seed']}")
            model_paths.append(train(training, validation, plan, member_config, member_dir, fold=0,
                                     threads=args.threads))
            logs.append(pd.read_csv(member_dir / "training_log.csv"))
        train_s = time.perf_counter() - t0
        log = pd.concat(logs, ignore_index=True)

        by_tta, eval_seconds = {}, {}
        for tta in (False, True):  # the same weights scored both ways: a pair
            t0 = time.perf_counter()
            scored = {**config, "infer": {**config["infer"], "tta": tta}}
            # the configured scoring writes predictions/ (what the README points at); the other its pair
            folder = work / ("predictions" if tta == bool(config["infer"]["tta"]) else "predictions-other")
            by_tta[tta] = evaluate(model_paths, held_out, labels, scored, folder, args.threads)
            eval_seconds[tta] = time.perf_counter() - t0
        scores, eval_s = by_tta[bool(config["infer"]["tta"])], eval_seconds[bool(config["infer"]["tta"])]
        delivered = loader_rate(training, plan, config, args.queue_seconds)

    batch = config["train"]["batch_size"]
    compute = log["seconds_per_step"] - log["data_wait_s"]
    steady = pd.concat([member.iloc[min(20, len(member) - 1):] for member in logs])  # skip each queue's first fill
    summary = {
        "held_out_subjects": len(held_out), "split_seed": split_seed,
        "train_subjects": len(training), "val_subjects": len(validation),
        "mean_dice": {name: float(scores[name].mean()) for name in labels.values()},
        "mean_dice_95ci": {name: mean_interval(scores[name].to_numpy()) for name in labels.values()},
        "median_dice": {name: float(scores[name].median()) for name in labels.values()},
        "models": args.models, "iterations": [int(member["iteration"].max()) for member in logs], "batch_size": batch,
        "train_wall_s": round(train_s, 1), "budget_minutes": budget,
        "budget_use": round(train_s / (budget * 60.0), 3),
        "validation_patches": config["train"]["validation_patches"],
        "prepare_s": round(prepare_s, 1), "eval_s": round(eval_s, 1),
        "loader": config["train"]["loader"], "loader_patches_per_s_alone": round(delivered, 2),
        "model_patches_per_s_in_training": round(float(batch / compute.iloc[20:].median()), 2),
        "end_to_end_patches_per_s": round(float(len(log) * batch / log["seconds_per_step"].sum()), 2),
        "data_wait_share": round(float(log["data_wait_s"].sum() / log["seconds_per_step"].sum()), 4),
        "data_wait_share_steady": round(float(steady["data_wait_s"].sum() / steady["seconds_per_step"].sum()), 4),
        "validation_s": round(train_s - float(log["seconds_per_step"].sum()), 1),
        "tta_pair": tta_pair(by_tta, eval_seconds, labels),
        "mirror_axes": list(mirror_axes(config["train"]["augmentation"], config["model"]["spatial_dims"])),
        "tta": bool(config["infer"]["tta"]),
        "threads": args.threads, "torch": torch.__version__,
        "seconds_per_step_median": round(float(log["seconds_per_step"].median()), 4),
        "patch_size": list(config["train"]["patch_size"]), "base_channels": config["model"]["base_channels"],
        "spatial_dims": config["model"]["spatial_dims"], "precision": config["train"]["precision"],
        "last_val_dice": [{name: float(member[f"val_dice_{name}"].dropna().iloc[-1]) for name in labels.values()}
                          for member in logs],
    }
    print(f"training used {summary['budget_use']:.3f} of the {budget:g}-minute budget "
          f"({summary['iterations']} iterations, {summary['seconds_per_step_median']} s/step median)")
    for name, value in summary["mean_dice"].items():
        low, high = summary["mean_dice_95ci"][name]
        print(f"held-out mean Dice {name}: {value:.4f} (95% bootstrap interval {low:.4f}-{high:.4f})")
    pair = summary["tta_pair"]
    for name in labels.values():
        low, high = pair["gain_95ci"][name]
        print(f"mirroring TTA, same weights: {name} {pair['without'][name]:.4f} -> {pair['with'][name]:.4f} "
              f"(paired gain {pair['gain'][name]:+.4f}, 95% {low:+.4f} to {high:+.4f}; "
              f"inference {pair['seconds_without']:.0f} s -> {pair['seconds_with']:.0f} s)")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
