"""GPU check: the demo trained with AMP on a GPU, its prediction against the CPU's, two jobs on two GPUs.

On a CUDA machine, in a temporary folder (or ``--workdir``):

1. the workflow's data stages for the synthetic demo (Snakemake, up to the resampled subjects);
2. fold 0 trained for ``--iterations`` on one GPU (taken with :func:`msdseg.jobs.gpu_slots.gpu_slot`, so
   running workflow jobs are not disturbed) with ``train.precision: auto``, i.e. bf16 or fp16
   autocast, whichever the GPU computes natively: median step time, peak GPU memory, precision;
3. the same with ``train.deterministic: false`` (cuDNN benchmark on): what the default
   determinism costs in step time on this GPU (``--skip-benchmark-mode`` leaves it out);
4. fold 0's validation subjects predicted with the same model.pt on the GPU (AMP) and on the CPU
   (fp32): Dice between the two label maps >= 0.99 for every class;
5. with two or more GPUs, folds 0 and 1 trained by Snakemake as two jobs at once: their logs must
   name different GPUs and their runs must overlap in time.

Prints a JSON summary; the exit status is 1 when a check fails. Without CUDA it says so and exits 0.
``--cpu-rehearsal`` runs every step on the CPU with two pretend GPUs, to try this script on a
machine without one (its figures are CPU figures).

    python benchmarks/gpu_check.py [--iterations 300] [--threads 4] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from msdseg.devices import precision_name, resolve_precision
from msdseg.jobs.gpu_slots import GPU_COUNT_ENV, gpu_slot, local_gpu_count

TASK = "Task00_SyntheticLiver"
MIN_DICE = 0.99


def merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` merged in, section by section (as Snakemake merges config files)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def workflow_config(overrides: dict[str, Any]) -> dict[str, Any]:
    """The config as the Snakefile builds it from config.yaml and ``overrides`` (a --configfile)."""
    from msdseg import config

    raw = merged(yaml.safe_load((ROOT / "config.yaml").read_text()), overrides)
    if hasattr(config, "layered_config"):  # config.yaml's per-task presets under the user's settings
        return config.layered_config(raw)[0]
    return config.load_config(raw)


def snakemake(work: Path, config_file: Path, cores: int, *args: str, env: dict[str, str] | None = None) -> str:
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(work),
               "--cores", str(cores), "--nocolor", *args, "--configfile", str(config_file)]
    run = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=3600,
                         env=dict(env or os.environ, PYTHONPATH=str(ROOT)))
    if run.returncode != 0:
        raise SystemExit(f"snakemake failed ({' '.join(args)}):\n{(run.stdout + run.stderr)[-4000:]}")
    return run.stdout + run.stderr


def prepare(work: Path, config_file: Path, cores: int) -> None:
    """The workflow's data stages: manifest and plan, then the training subjects it lists, resampled."""
    import pandas as pd

    snakemake(work, config_file, cores, "--until", "plan")
    results = work / "results" / TASK
    subjects = pd.read_csv(results / "manifest.csv").query("role == 'train'")["subject"]
    targets = [f"results/{TASK}/resampled/{kind}/{subject}.nii.gz"  # relative to work, as the rules write them
               for subject in subjects for kind in ("imagesTr", "labelsTr")]
    snakemake(work, config_file, cores, *targets)


def fold_rows(results: Path, fold: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(training rows, validation rows) of ``fold`` from the workflow's manifest and resampled files."""
    import pandas as pd

    manifest = pd.read_csv(results / "manifest.csv")
    train, val = [], []
    for row in manifest[manifest["role"] == "train"].itertuples():
        entry = {"subject": row.subject, "image": str(results / "resampled" / "imagesTr" / f"{row.subject}.nii.gz"),
                 "label": str(results / "resampled" / "labelsTr" / f"{row.subject}.nii.gz"),
                 "reference": str(results.parents[1] / row.image)}
        (val if int(row.fold) == fold else train).append(entry)
    return train, val


def train_once(rows: tuple[list, list], plan: dict, config: dict, out: Path, threads: int,
               device: str) -> dict[str, Any]:
    """Train fold 0 in this process; step time, peak GPU memory and the precision that ran."""
    import pandas as pd
    import torch

    from msdseg.model.unet import load_model
    from msdseg.train.trainer import train

    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    train_rows, val_rows = ([{key: row[key] for key in ("subject", "image", "label")} for row in part] for part in rows)
    model_path = train(train_rows, val_rows, plan, {key: config[key] for key in ("seed", "model", "train")}, out,
                       fold=0, threads=threads, device=device)
    wall = time.perf_counter() - start
    log = pd.read_csv(out / "training_log.csv")
    steady = log.iloc[min(20, len(log) - 1):]  # the queue's first fill and cuDNN's first calls are slower
    dtype = resolve_precision(config["train"]["precision"], torch.device(device), key="train.precision")
    meta = load_model(model_path, "cpu")[1]
    return {
        "model": str(model_path), "iterations": int(log["iteration"].max()), "train_wall_s": round(wall, 1),
        "median_step_s": round(float(steady["seconds_per_step"].median()), 4),
        "median_compute_step_s": round(float((steady["seconds_per_step"] - steady["data_wait_s"]).median()), 4),
        "peak_gpu_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        "peak_gpu_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20, 1) if cuda else None,
        "precision": precision_name(dtype), "precision_in_model_pt": meta.get("precision"),
        "deterministic": bool(config["train"]["deterministic"]),
    }


def compare_predictions(model: Path, val_rows: list[dict[str, str]], plan: dict, config: dict, out: Path,
                        device: str, threads: int) -> dict[str, Any]:
    """The same model.pt on ``device`` and on the CPU: Dice between the label maps, per subject and class."""
    import numpy as np

    from msdseg.decathlon import foreground_labels
    from msdseg.images import read_label_volume
    from msdseg.infer.predict import predict_subject
    from msdseg.metrics import dice

    classes = foreground_labels(plan["labels"])
    runs = {"device": device, "cpu": "cpu"}
    scores, seconds = [], dict.fromkeys(runs, 0.0)
    for row in val_rows:
        paths = {}
        for run, where in runs.items():
            paths[run] = out / run / f"{row['subject']}.nii.gz"
            start = time.perf_counter()
            predict_subject([model], Path(row["image"]), Path(row["reference"]), paths[run], config["infer"],
                            device=where, threads=threads)
            seconds[run] += time.perf_counter() - start
        on_device, on_cpu = (read_label_volume(paths[run])[0] for run in runs)
        for label, name in classes.items():
            value = dice(on_device, on_cpu, label)
            scores.append({"subject": row["subject"], "class": name,
                           "dice": 1.0 if np.isnan(value) else round(float(value), 5)})
    lowest = min(score["dice"] for score in scores)
    return {"dice_device_vs_cpu_min": lowest, "dice_device_vs_cpu": scores,
            "predict_s": {f"{run} ({runs[run]})": round(value, 2) for run, value in seconds.items()},
            "ok": lowest >= MIN_DICE}


def _log_times(log: Path) -> tuple[datetime, datetime]:
    stamps = [datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f") for line in log.read_text().splitlines()
              if re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", line)]
    return stamps[0], stamps[-1]


def concurrent_jobs(work: Path, config_file: Path, threads: int, env: dict[str, str]) -> dict[str, Any]:
    """Folds 0 and 1 trained by Snakemake at once: which GPU each job got, and whether they overlapped."""
    results = work / "results" / TASK
    targets = [f"results/{TASK}/fold{fold}/model.pt" for fold in (0, 1)]
    snakemake(work, config_file, 2 * threads, *targets, env=env)
    jobs = {}
    for fold in (0, 1):
        log = results / "logs" / "train" / f"fold{fold}.log"
        found = re.search(r"GPU slot: this job uses GPU (\S+) of", log.read_text())
        start, end = _log_times(log)
        jobs[fold] = {"gpus": found.group(1) if found else None, "start": start, "end": end}
    overlap = jobs[0]["start"] < jobs[1]["end"] and jobs[1]["start"] < jobs[0]["end"]
    distinct = None not in (jobs[0]["gpus"], jobs[1]["gpus"]) and not (
        set(jobs[0]["gpus"].split(",")) & set(jobs[1]["gpus"].split(",")))
    return {"gpus": {f"fold{fold}": job["gpus"] for fold, job in jobs.items()},
            "overlapping": overlap, "distinct_gpus": distinct, "ok": overlap and distinct,
            "wall_s": {f"fold{fold}": round((job["end"] - job["start"]).total_seconds(), 1)
                       for fold, job in jobs.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--threads", type=int, default=4, help="CPU threads (and data workers' share) per job")
    parser.add_argument("--workdir", type=Path, default=None, help="keep everything here (default: a temporary folder)")
    parser.add_argument("--skip-benchmark-mode", action="store_true",
                        help="leave out the second training with train.deterministic: false")
    parser.add_argument("--cpu-rehearsal", action="store_true",
                        help="every step on the CPU, with two pretend GPUs (tries the script; CPU figures)")
    args = parser.parse_args()

    if args.cpu_rehearsal:
        os.environ[GPU_COUNT_ENV] = "2"
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    gpus = local_gpu_count()
    with tempfile.TemporaryDirectory(prefix="msdseg-gpu-check-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        summary: dict[str, Any] = {"gpus_found": gpus}
        with gpu_slot(1) as slot:  # CUDA is first touched inside, on the GPU this check holds
            import torch

            device = "cpu" if args.cpu_rehearsal else "cuda"
            if device == "cuda" and not torch.cuda.is_available():
                print(f"no CUDA on this machine (torch {torch.__version__}, {gpus} NVIDIA GPU(s) found by the "
                      "driver probe): nothing to check. --cpu-rehearsal tries the script on the CPU.")
                return 0
            summary["slot"] = slot
            summary["torch"] = torch.__version__
            if device == "cuda":
                summary["gpu"] = torch.cuda.get_device_name(0)
                summary["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
                summary["cudnn"] = torch.backends.cudnn.version()

            overrides = {
                "synthetic": {"n_train": 6, "n_test": 1},
                "train": {"folds": [0, 1], "iterations": args.iterations, "validate_every": args.iterations,
                          "checkpoint_every": args.iterations, "max_minutes": 120, "threads": args.threads,
                          "num_workers": max(1, min(4, args.threads // 2)), "precision": "auto"},
                "infer": {"threads": args.threads},
            }
            config_file = work / "gpu_check.yaml"
            config_file.write_text(yaml.safe_dump(overrides))
            prepare(work, config_file, args.threads)

            config = workflow_config(overrides)
            results = work / "results" / TASK
            plan = json.loads((results / "plan.json").read_text())
            rows = fold_rows(results, 0)
            summary["amp"] = train_once(rows, plan, config, work / "check" / "deterministic", args.threads, device)
            if not args.skip_benchmark_mode:
                fast = merged(config, {"train": {"deterministic": False}})
                summary["benchmark_mode"] = train_once(rows, plan, fast, work / "check" / "benchmark", args.threads,
                                                       device)
                summary["deterministic_step_time_ratio"] = round(
                    summary["amp"]["median_compute_step_s"] / summary["benchmark_mode"]["median_compute_step_s"], 3)
            summary["prediction"] = compare_predictions(Path(summary["amp"]["model"]), rows[1], plan, config,
                                                        work / "check" / "predictions", device, args.threads)
        if gpus >= 2:
            env = {key: value for key, value in os.environ.items() if key != "SLURM_JOB_ID"}  # slots in an allocation
            summary["two_jobs"] = concurrent_jobs(work, config_file, args.threads, env)
        else:
            summary["two_jobs"] = f"skipped: {gpus} GPU(s)"
    checks = [summary["prediction"]["ok"]]
    if isinstance(summary["two_jobs"], dict):
        checks.append(summary["two_jobs"]["ok"])
    summary["ok"] = all(checks)
    amp = summary["amp"]
    print(f"precision {amp['precision']}, median step {amp['median_step_s']} s "
          f"(compute {amp['median_compute_step_s']} s), peak GPU memory {amp['peak_gpu_memory_mib']} MiB; "
          f"GPU vs CPU prediction: min Dice {summary['prediction']['dice_device_vs_cpu_min']}")
    print(json.dumps(summary, indent=2, default=str))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
