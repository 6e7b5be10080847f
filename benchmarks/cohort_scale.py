"""Benchmark: what a cohort costs by its size, not by its job count (issue 14).

For each cohort it prints the jobs per stage, the wall time of the data (resample) and
inference stages, the start-up share of their jobs (the rule benchmark's wall time minus the
work the job logs, ``chunk of N subject(s) done: X s of work``), and how long Snakemake takes to
plan the run (a dry run once the manifest and plan exist) and to find nothing to do (a no-op
rerun of the finished stages).

Cohorts (``--cohorts``, comma-separated):

- ``real``: the 210 subjects of ``../shared/data/Task04_Hippocampus.tar`` (200 labelled, 10 test;
  its dataset.json lists these of the task's 260), extracted once into a source folder, with the
  ``configs/hippocampus.yaml`` preset, one fold trained for ``--iterations`` steps. The whole
  workflow runs, stage by stage (``--until``), each stage timed as one Snakemake invocation.
- ``N`` (a number, e.g. 2000, 10000): N tiny synthetic subjects (12x12x8 voxels, 90% labelled)
  in a Decathlon folder (``source: {folder: ...}``). The manifest and plan run, then a dry run
  of the whole workflow is timed; with ``--data-stage`` the resampling runs too and its no-op
  rerun is timed.

``--baseline`` also runs the real cohort's data stage with ``resample.subjects_per_job: 1`` (one
job per subject, as before chunking) for comparison.

    nice -n 10 python benchmarks/cohort_scale.py [--cohorts real,2000,10000] [--workdir DIR]
        [--iterations 20] [--cores 2] [--data-stage] [--baseline]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from msdseg.jobs.cohort import read_cohort
from msdseg.jobs.worklog import parse_work

sys.path.insert(0, str(ROOT / "tests"))
from workflow_runner import planned_jobs

ARCHIVE = ROOT.parent / "shared" / "data" / "Task04_Hippocampus.tar"
HIPPOCAMPUS = "Task04_Hippocampus"
TINY_TASK = "Task95_TinyCohort"
DATA_RULES = ("resample_training", "resample_test")
INFER_RULES = ("infer_fold", "infer_test")


def stage_targets(results: Path, stage: str, fold: int = 0) -> list[str]:
    """The per-subject files a stage ends with (``--until`` with several rules can stall Snakemake 9.27).

    Relative to the work folder, as the workflow names them.
    """
    cohort = read_cohort(results / "manifest.csv")
    prefix = Path(results.parent.name) / results.name
    targets = []
    for s in cohort.subjects:
        if stage == "data" and s.role == "train":
            targets += [f"{prefix}/resampled/{folder}/{s.subject}.nii.gz" for folder in ("imagesTr", "labelsTr")]
        elif stage == "data":
            targets.append(f"{prefix}/resampled/imagesTs/{s.subject}.nii.gz")
        elif s.role == "test":
            targets.append(f"{prefix}/predictions/test/{s.subject}.nii.gz")
        elif s.fold == fold:
            targets.append(f"{prefix}/fold{fold}/predictions/{s.subject}.nii.gz")
    return targets


# --------------------------------------------------------------------------- running Snakemake


def snakemake(workdir: Path, config: dict, *args: str, cores: int = 2) -> tuple[float, str]:
    """One Snakemake invocation in ``workdir``: (wall seconds, output); raises when it fails."""
    config_file = workdir / "benchmark_config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
               "--cores", str(cores), "--nocolor", *args, "--configfile", str(config_file)]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT))
    # bytecode caches as an installation has them: without, every job compiles the msdseg modules
    # it imports again (0.015 s of a resampling job's start-up), which no user's setup does
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"snakemake {' '.join(args)} failed:\n{output[-6000:]}")
    return seconds, output


def median_time(workdir: Path, config: dict, *args: str, repeat: int = 3) -> float:
    return statistics.median(snakemake(workdir, config, *args)[0] for _ in range(repeat))


def startup_shares(results: Path, rules: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Per rule: jobs, their wall seconds (benchmarks/*.tsv), logged work seconds, start-up share."""
    shares = {}
    for rule in rules:
        wall = work = 0.0
        jobs = subjects = 0
        per_job = []
        for tsv in sorted((results / "benchmarks" / rule).rglob("*.tsv")):
            log = results / "logs" / rule / tsv.relative_to(results / "benchmarks" / rule).with_suffix(".log")
            logged = parse_work(log.read_text()) if log.is_file() else None
            if logged is None:
                continue
            seconds = float(tsv.read_text().splitlines()[-1].split("\t")[0])
            jobs += 1
            subjects += logged[0]
            wall += seconds
            work += logged[1]
            per_job.append(round(1.0 - logged[1] / seconds, 3) if seconds else 0.0)
        if jobs:
            shares[rule] = {"jobs": jobs, "subjects": subjects, "job_wall_s": round(wall, 2),
                            "work_s": round(work, 2), "startup_share": round(1.0 - work / wall, 3)}
            if len(per_job) <= 10:
                shares[rule]["startup_share_per_job"] = per_job
            else:
                shares[rule]["startup_share_per_job_min_median_max"] = [
                    min(per_job), round(statistics.median(per_job), 3), max(per_job)]
    return shares


def stage_share(shares: dict[str, dict[str, float]], rules: tuple[str, ...]) -> float | None:
    wall = sum(shares[r]["job_wall_s"] for r in rules if r in shares)
    work = sum(shares[r]["work_s"] for r in rules if r in shares)
    return round(1.0 - work / wall, 3) if wall else None


# --------------------------------------------------------------------------- cohorts


def hippocampus_folder(workdir: Path) -> Path:
    folder = workdir / "source" / HIPPOCAMPUS
    if not (folder / "dataset.json").is_file():
        with tarfile.open(ARCHIVE) as tar:
            tar.extractall(workdir / "source", filter="data")
    return folder


def tiny_folder(workdir: Path, n: int) -> Path:
    """A Decathlon folder of ``n`` tiny subjects (90% labelled), the files hard links of one pair."""
    import nibabel as nib
    import numpy as np

    folder = workdir / "source" / f"{TINY_TASK}_{n}"
    if (folder / "dataset.json").is_file():
        return folder
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    image = (rng.normal(100, 20, (12, 12, 8))).astype(np.int16)
    label = np.zeros((12, 12, 8), np.uint8)
    label[3:8, 3:8, 2:6] = 1
    label[5:7, 5:7, 3:5] = 2
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    template_image, template_label = workdir / "source" / "tiny_image.nii.gz", workdir / "source" / "tiny_label.nii.gz"
    for array, path in ((image, template_image), (label, template_label)):
        nifti = nib.Nifti1Image(array, affine)
        nifti.set_qform(affine, code=1)
        nifti.set_sform(affine, code=1)
        path.write_bytes(gzip.compress(nifti.to_bytes(), mtime=0))
    n_train = max(2, int(n * 0.9))
    training, test = [], []
    for index in range(n):
        subject = f"tiny_{index:05d}"
        if index < n_train:
            os.link(template_image, folder / "imagesTr" / f"{subject}.nii.gz")
            os.link(template_label, folder / "labelsTr" / f"{subject}.nii.gz")
            training.append({"image": f"./imagesTr/{subject}.nii.gz", "label": f"./labelsTr/{subject}.nii.gz"})
        else:
            os.link(template_image, folder / "imagesTs" / f"{subject}.nii.gz")
            test.append(f"./imagesTs/{subject}.nii.gz")
    dataset = {"name": "TinyCohort", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "a", "2": "b"},
               "numTraining": len(training), "numTest": len(test), "training": training, "test": test}
    (folder / "dataset.json").write_text(json.dumps(dataset))
    return folder


def real_cohort(workdir: Path, args: argparse.Namespace) -> dict:
    work = workdir / "real"
    work.mkdir(parents=True, exist_ok=True)
    preset = yaml.safe_load((ROOT / "configs" / "hippocampus.yaml").read_text())
    iterations = int(args.iterations)
    config = {
        **preset,
        "source": {"folder": str(hippocampus_folder(workdir))},
        "train": {**preset["train"], "folds": [0], "iterations": iterations, "validate_every": iterations,
                  "checkpoint_every": iterations, "max_minutes": 5},
    }
    results = work / "results" / HIPPOCAMPUS
    report: dict = {"cohort": "real Task04_Hippocampus", "iterations": iterations}
    seconds, _ = snakemake(work, config, "--until", "plan", cores=args.cores)
    report["manifest_and_plan_wall_s"] = round(seconds, 1)
    seconds, output = snakemake(work, config, "-n", cores=args.cores)
    report["dry_run_s"] = round(median_time(work, config, "-n"), 2)
    report["jobs_planned"] = planned_jobs(output)
    seconds, _ = snakemake(work, config, *stage_targets(results, "data"), cores=args.cores)
    report["data_stage_wall_s"] = round(seconds, 1)
    seconds, _ = snakemake(work, config, str(Path("results") / HIPPOCAMPUS / "fold0" / "model.pt"), cores=args.cores)
    report["train_wall_s"] = round(seconds, 1)
    seconds, _ = snakemake(work, config, *stage_targets(results, "inference"), cores=args.cores)
    report["inference_stage_wall_s"] = round(seconds, 1)
    seconds, _ = snakemake(work, config, cores=args.cores)
    report["rest_wall_s"] = round(seconds, 1)
    _, output = snakemake(work, config, "-n")
    assert "Nothing to be done" in output, output[-3000:]
    report["noop_rerun_s"] = round(median_time(work, config, "-n"), 2)
    shares = startup_shares(results, DATA_RULES + INFER_RULES)
    report["startup"] = shares
    report["startup_share_data_stage"] = stage_share(shares, DATA_RULES)
    report["startup_share_inference_stage"] = stage_share(shares, INFER_RULES)
    report["snakemake_floor_s"] = round(snakemake_floor(workdir), 2)
    if args.baseline:
        base = workdir / "real_per_subject"
        base.mkdir(parents=True, exist_ok=True)
        base_config = {**config, "resample": {"subjects_per_job": 1}}
        snakemake(base, base_config, "--until", "plan", cores=args.cores)
        targets = stage_targets(base / "results" / HIPPOCAMPUS, "data")
        seconds, _ = snakemake(base, base_config, *targets, cores=args.cores)
        base_shares = startup_shares(base / "results" / HIPPOCAMPUS, DATA_RULES)
        report["baseline_one_subject_per_job"] = {
            "data_stage_wall_s": round(seconds, 1), "startup": base_shares,
            "startup_share_data_stage": stage_share(base_shares, DATA_RULES),
        }
    return report


def tiny_cohort(workdir: Path, n: int, args: argparse.Namespace) -> dict:
    work = workdir / f"tiny_{n}"
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    folder = tiny_folder(workdir, n)
    report: dict = {"cohort": f"{n} synthetic tiny subjects", "generate_s": round(time.perf_counter() - start, 1)}
    config = {"task": TINY_TASK, "source": {"folder": str(folder)}, "manifest": {"n_folds": 5},
              "preprocess": {"spacing": "median"}, "train": {"folds": [0]}}
    seconds, _ = snakemake(work, config, "--until", "plan", cores=args.cores)
    report["manifest_and_plan_wall_s"] = round(seconds, 1)
    seconds, output = snakemake(work, config, "-n")
    report["dry_run_s"] = round(seconds, 2)
    report["jobs_planned"] = planned_jobs(output)
    if args.data_stage:
        targets = stage_targets(work / "results" / TINY_TASK, "data")
        seconds, _ = snakemake(work, config, *targets, cores=args.cores)
        report["data_stage_wall_s"] = round(seconds, 1)
        seconds, output = snakemake(work, config, "-n", *targets)
        assert "Nothing to be done" in output, output[-3000:]
        report["data_stage_noop_rerun_s"] = round(seconds, 2)
        shares = startup_shares(work / "results" / TINY_TASK, DATA_RULES)
        report["startup"] = shares
        report["startup_share_data_stage"] = stage_share(shares, DATA_RULES)
    return report


def snakemake_floor(workdir: Path) -> float:
    """A no-op of a one-rule workflow: what any Snakemake invocation costs on this machine."""
    floor = workdir / "floor"
    floor.mkdir(exist_ok=True)
    (floor / "Snakefile").write_text('rule all:\n    input: "done.txt"\n\nrule make:\n    output: "done.txt"\n'
                                     '    shell: "touch {output}"\n')
    run = [sys.executable, "-m", "snakemake", "--cores", "1", "--nocolor"]
    subprocess.run(run, cwd=floor, capture_output=True, check=True)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([*run, "-n"], cwd=floor, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohorts", default="real,2000,10000")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/msdseg-cohort-scale"))
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--data-stage", action="store_true", help="also resample the synthetic cohorts")
    parser.add_argument("--baseline", action="store_true", help="also one subject per job (real cohort)")
    parser.add_argument("--fresh", action="store_true", help="delete the work folder first")
    args = parser.parse_args()
    if args.fresh and args.workdir.exists():
        shutil.rmtree(args.workdir)
    args.workdir.mkdir(parents=True, exist_ok=True)
    for cohort in args.cohorts.split(","):
        start = time.perf_counter()
        report = real_cohort(args.workdir, args) if cohort == "real" else tiny_cohort(args.workdir, int(cohort), args)
        report["benchmark_wall_s"] = round(time.perf_counter() - start, 1)
        print(json.dumps(report, indent=1), flush=True)


if __name__ == "__main__":
    main()
