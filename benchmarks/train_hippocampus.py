"""Benchmark: Task04_Hippocampus from its archive to held-out Dice within 15 CPU minutes.

Extracts ``../shared/data/Task04_Hippocampus.tar``, builds the manifest, plan and resampled
volumes with the package, holds out 40 of the 200 labelled cases (seeded), trains one model on
the rest with ``configs/hippocampus.yaml`` (a few of the rest validate for the best weights),
and prints the held-out mean Dice per class, iterations, training wall time, the patch rate the
queue delivers on its own vs the rate the model consumes in training, and the data-wait share.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/train_hippocampus.py [--threads 2] [--minutes 15]
"""

from __future__ import annotations

import argparse
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

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from msdseg.archive import safe_extract  # noqa: E402
from msdseg.config import load_config  # noqa: E402
from msdseg.data import IMAGE, LABEL, make_loader, make_queue, mirror_axes, preprocessing, subjects_from_paths  # noqa: E402
from msdseg.decathlon import read_dataset_json  # noqa: E402
from msdseg.inference import predict_probabilities  # noqa: E402
from msdseg.manifest import build_manifest  # noqa: E402
from msdseg.metrics import dice_per_label  # noqa: E402
from msdseg.model import load_model  # noqa: E402
from msdseg.resample import make_plan, resample_subject  # noqa: E402
from msdseg.train import train  # noqa: E402

ARCHIVE = ROOT.parent / "shared" / "data" / "Task04_Hippocampus.tar"


def prepare(work: Path, config: dict) -> tuple[list[dict], dict, dict[int, str]]:
    """Extract, manifest, plan, resample: the workflow's data stages through the package."""
    task_dir = safe_extract(ARCHIVE, work / "raw")
    dataset = read_dataset_json(task_dir)
    manifest, _ = build_manifest(dataset, n_folds=config["manifest"]["n_folds"], seed=config["seed"])
    plan = make_plan(manifest, dataset, config["preprocess"], config["task"])
    rows = []
    for row in manifest[manifest["role"] == "train"].itertuples():
        image = work / "resampled" / "imagesTr" / f"{row.subject}.nii.gz"
        label = work / "resampled" / "labelsTr" / f"{row.subject}.nii.gz"
        resample_subject(row.image, image, plan, label_in=row.label, label_out=label)
        rows.append({"subject": row.subject, "image": str(image), "label": str(label)})
    return rows, plan, {int(k): v for k, v in plan["labels"].items() if int(k) > 0}


def queue_rate(rows: list[dict], plan: dict, config: dict, seconds: float) -> float:
    """Patches per second the queue delivers with no model running (its capacity)."""
    queue = make_queue(subjects_from_paths(rows), plan, config)
    loader = make_loader(queue, config["train"]["batch_size"])
    patches, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for batch in loader:
            patches += batch[IMAGE]["data"].shape[0]
            if time.perf_counter() - start >= seconds:
                break
    return patches / (time.perf_counter() - start)


def evaluate(model_path: Path, rows: list[dict], labels: dict[int, str], config: dict) -> pd.DataFrame:
    """Dice per held-out subject and class (resampled grid = original grid here: all are 1 mm)."""
    model, meta = load_model(model_path, "cpu")
    transform = preprocessing(meta["plan"])
    infer = config["infer"]
    tta = meta["mirror_axes"] if infer["tta"] else False
    records = []
    for subject in subjects_from_paths(rows):
        prepared = transform(subject)
        probabilities = predict_probabilities(model, prepared[IMAGE].data, meta["patch_size"], infer["overlap"],
                                              infer["batch_size"], "cpu", infer["overlap_mode"], tta)
        dice = dice_per_label(probabilities.argmax(0).numpy(), prepared[LABEL].data[0].numpy(), labels)
        records.append({"subject": subject["subject"], **{labels[k]: v for k, v in dice.items()}})
    return pd.DataFrame(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "hippocampus.yaml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--minutes", type=float, default=None, help="override train.max_minutes")
    parser.add_argument("--held-out", type=int, default=40)
    parser.add_argument("--validation", type=int, default=8, help="cases of the rest that pick the best weights")
    parser.add_argument("--queue-seconds", type=float, default=20.0)
    parser.add_argument("--workdir", type=Path, default=None, help="keep outputs here (default: a temporary folder)")
    args = parser.parse_args()

    config = load_config(args.config)
    if args.minutes is not None:
        config["train"]["max_minutes"] = args.minutes
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="msdseg-bench-") as tmp:
        work = args.workdir or Path(tmp)
        t0 = time.perf_counter()
        rows, plan, labels = prepare(work, config)
        prepare_s = time.perf_counter() - t0
        order = list(rows)
        random.Random(config["seed"]).shuffle(order)
        held_out = order[: args.held_out]
        validation = order[args.held_out: args.held_out + args.validation]
        training = order[args.held_out + args.validation:]

        t0 = time.perf_counter()
        model_path = train(training, validation, plan, config, work / "fold0", fold=0, threads=args.threads)
        train_s = time.perf_counter() - t0
        log = pd.read_csv(work / "fold0" / "training_log.csv")

        t0 = time.perf_counter()
        scores = evaluate(model_path, held_out, labels, config)
        eval_s = time.perf_counter() - t0
        delivered = queue_rate(training, plan, config, args.queue_seconds)

    batch = config["train"]["batch_size"]
    compute = log["seconds_per_step"] - log["data_wait_s"]
    steady = log.iloc[min(20, len(log) - 1):]  # skip the queue's first fill
    summary = {
        "held_out_subjects": len(held_out), "train_subjects": len(training), "val_subjects": len(validation),
        "mean_dice": {name: float(scores[name].mean()) for name in labels.values()},
        "median_dice": {name: float(scores[name].median()) for name in labels.values()},
        "iterations": int(log["iteration"].max()), "batch_size": batch,
        "train_wall_s": round(train_s, 1), "prepare_s": round(prepare_s, 1), "eval_s": round(eval_s, 1),
        "queue_patches_per_s_alone": round(delivered, 2),
        "model_patches_per_s_in_training": round(float(batch / compute.iloc[20:].median()), 2),
        "end_to_end_patches_per_s": round(float(len(log) * batch / log["seconds_per_step"].sum()), 2),
        "data_wait_share": round(float(log["data_wait_s"].sum() / log["seconds_per_step"].sum()), 4),
        "data_wait_share_steady": round(float(steady["data_wait_s"].sum() / steady["seconds_per_step"].sum()), 4),
        "validation_s": round(train_s - float(log["seconds_per_step"].sum()), 1),
        "mirror_axes": list(mirror_axes(config)), "tta": bool(config["infer"]["tta"]),
        "threads": args.threads, "torch": torch.__version__,
        "last_val_dice": {name: float(log[f"val_dice_{name}"].dropna().iloc[-1]) for name in labels.values()},
    }
    for name, value in summary["mean_dice"].items():
        print(f"held-out mean Dice {name}: {value:.4f}")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
