"""Benchmark: bundling the per-subject resample jobs into SLURM group jobs, measured.

Starts a throw-away single-node SLURM cluster (tests/slurm_cluster.py, 2 CPUs here), then runs
the data stage of Task04_Hippocampus from ``../shared/data/Task04_Hippocampus.tar`` (200
training + 10 test subjects: extract, manifest, plan, one resample job per subject) in fresh
working directories, with ``configs/hippocampus.yaml`` and ``source: {archive, md5}``:

- ``local --cores 2``: no SLURM (reference);
- ``slurm unbundled``: ``--profile profiles/slurm --group-components resample=1``, one SLURM job
  per subject; by default on the first 60 subjects only (``--unbundled-subjects``), it is slow;
- ``slurm bundle 4 (profile)``: the profile as shipped (``group-components: resample: 4``);
- ``slurm bundle N, --cores C`` for each ``--bundles N:C`` (default ``30:1``). The SLURM plugin
  runs a bundle's jobs one after another (its in-job Snakemake gets ``--jobs 1``), so a bundle
  sized for 2 CPUs (``--cores 2``) leaves one idle; ``--cores 1`` makes 1-CPU bundles, two of
  which share the node;
- ``slurm bundle 4, resumed`` (``--resume-subjects``, 0 skips it): first up to plan.json, then
  the resampled files in a second call, as a run resumed after the manifest checkpoint.

Every run but the resumed one is one Snakemake call with every resampled file of its subjects as
targets (``results/Task04_Hippocampus/resampled/{imagesTr,labelsTr,imagesTs}/<subject>.nii.gz``);
its wall time is split where the main Snakemake saw ``plan`` finish. For each run it prints
Snakemake jobs, SLURM jobs submitted (the plugin's ``submitted with SLURM jobid`` lines, checked
against ``.snakemake/slurm_logs`` and the cluster's job completion log), how often resample jobs
actually ran inside SLURM (from the job logs) and wall times. SLURM runs add the options
tests/test_slurm.py gives this cluster (``--slurm-status-command squeue
--slurm-init-seconds-before-status-checks 5``). The cluster is stopped at the end, always.

The machine may be shared: start it niced, and compare runs of one invocation only::

    nice -n 19 python benchmarks/slurm_grouping.py [--bundles 30:1 30:2] [--unbundled-subjects 60]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from msdseg.decathlon import subject_id
from slurm_cluster import SlurmCluster

ARCHIVE = ROOT.parent / "shared" / "data" / "Task04_Hippocampus.tar"
MD5SUMS = ROOT.parent / "shared" / "data" / "MD5SUMS"
TASK = "Task04_Hippocampus"
PROFILE = ROOT / "profiles" / "slurm"
CLUSTER_OPTIONS = (
    "--slurm-status-command", "squeue",
    "--slurm-init-seconds-before-status-checks", "5",
    "--slurm-keep-successful-logs",
)
PREP_TARGETS = (f"results/{TASK}/plan.json",)


def archive_md5() -> str:
    for line in MD5SUMS.read_text().splitlines():
        digest, name = line.split()
        if name.lstrip("*") == ARCHIVE.name:
            return digest
    raise SystemExit(f"{ARCHIVE.name} is not listed in {MD5SUMS}")


def archive_subjects() -> list[tuple[str, str]]:
    """(subject, role) in dataset.json order, read from the archive (as the manifest will)."""
    with tarfile.open(ARCHIVE) as tar:
        data = json.load(tar.extractfile(f"{TASK}/dataset.json"))
    train = [(subject_id(entry["image"]), "train") for entry in data["training"]]
    test = [
        (subject_id(entry["image"] if isinstance(entry, dict) else entry), "test")
        for entry in data.get("test", [])
    ]
    return train + test


def resample_targets(subjects: list[tuple[str, str]]) -> list[str]:
    targets = []
    for subject, role in subjects:
        if role == "train":
            targets += [
                f"results/{TASK}/resampled/imagesTr/{subject}.nii.gz",
                f"results/{TASK}/resampled/labelsTr/{subject}.nii.gz",
            ]
        else:
            targets.append(f"results/{TASK}/resampled/imagesTs/{subject}.nii.gz")
    return targets


class Runaway(RuntimeError):
    """Snakemake submitted far more SLURM jobs than the run has Snakemake jobs; it was stopped."""

    def __init__(self, submitted: int, wall: float, output: str) -> None:
        super().__init__(f"stopped after {submitted} SLURM jobs")
        self.submitted, self.wall, self.output = submitted, wall, output


def snakemake(workdir: Path, env: dict, args: list[str], targets: list[str], name: str,
              timeout: float, max_submissions: int | None = None) -> tuple[float, str]:
    """One Snakemake invocation in workdir; (wall seconds, its output). Fails loudly; stops it
    (raising Runaway) once it submitted more than ``max_submissions`` SLURM jobs."""
    command = [
        sys.executable, "-m", "snakemake", *targets,  # first: options with nargs="+" follow
        "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir), "--nocolor",
        "--configfile", str(ROOT / "configs" / "hippocampus.yaml"), str(workdir / "bench.yaml"),
        *args,
    ]
    out_path = workdir / f"snakemake_{name}.out"
    with open(out_path, "w") as out:
        start = time.monotonic()
        process = subprocess.Popen(
            command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        submitted = 0
        try:
            while process.poll() is None:
                if time.monotonic() - start > timeout:
                    raise TimeoutError(f"snakemake ({name}) in {workdir}: over {timeout:.0f} s")
                if max_submissions is not None:
                    submitted = len(slurm_job_ids(out_path.read_text()))
                    if submitted > max_submissions:
                        break
                time.sleep(1)
        finally:
            if process.poll() is None:  # timed out or interrupted: end it (it cancels its jobs)
                process.terminate()
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        wall = time.monotonic() - start
    output = out_path.read_text()
    if max_submissions is not None and submitted > max_submissions:
        raise Runaway(submitted, wall, output)
    if process.returncode != 0:
        raise RuntimeError(f"snakemake ({name}) in {workdir} failed:\n{output[-6000:]}")
    return wall, output


def finished_jobs(output: str) -> dict[int, str]:
    """Snakemake job id -> rule of the jobs a run finished (a group's jobs may be reported twice)."""
    return {int(i): rule for i, rule in re.findall(r"Finished jobid: (\d+) \(Rule: (\w+)\)", output)}


def finished_at(output: str, rule: str) -> float:
    """When the main Snakemake process saw the (single) job of ``rule`` finish (epoch seconds)."""
    match = re.search(r"\[(\w{3} \w{3} +\d+ [\d:]+ \d{4})\]\s*\nFinished jobid: \d+ \(Rule: "
                      + rule + r"\)", output)
    return time.mktime(time.strptime(match.group(1), "%a %b %d %H:%M:%S %Y"))


def slurm_job_ids(output: str) -> list[str]:
    return re.findall(r"submitted with SLURM jobid (\d+)", output)


def executions_in_slurm(workdir: Path) -> Counter:
    """Subject -> how often a resample job ran inside SLURM jobs (the job steps' own logs)."""
    runs: Counter = Counter()
    for log in (workdir / ".snakemake" / "slurm_logs").rglob("*.log"):
        for block in re.split(r"^localrule ", log.read_text(), flags=re.MULTILINE)[1:]:
            if block.startswith("resample_"):
                runs.update(re.findall(r"wildcards: subject=(\S+)", block)[:1])
    return runs


def _seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def run_one(label: str, workdir: Path, env: dict, args: list[str],
            subjects: list[tuple[str, str]], cluster: SlurmCluster | None,
            timeout: float, resume: bool = False) -> dict:
    """One fresh working directory: archive -> resampled files of ``subjects``.

    One Snakemake call for everything, or (``resume``) a first call up to plan.json and a
    second one for the resampled files, i.e. a run resumed after the manifest checkpoint.
    """
    workdir.mkdir(parents=True)
    (workdir / "bench.yaml").write_text(
        f"task: {TASK}\nsource:\n  archive: {ARCHIVE}\n  md5: {archive_md5()}\n"
    )
    load = os.getloadavg()[0]
    print(f"[{time.strftime('%H:%M:%S')}] {label}: {len(subjects)} subjects, "
          f"load average {load:.1f} ...", flush=True)
    targets = resample_targets(subjects)
    if resume:
        prep_s, first = snakemake(workdir, env, args, list(PREP_TARGETS), "prep", timeout)
        try:
            resample_s, second = snakemake(workdir, env, args, targets, "resample", timeout,
                                           max_submissions=5 * len(subjects))
        except Runaway as runaway:  # the group-components bug may resubmit a bundle forever
            return {
                "label": label, "subjects": len(subjects), "smk_jobs": len(finished_jobs(first)),
                "prep_s": prep_s, "resample_s": runaway.wall, "load": load,
                "slurm_jobs": len(slurm_job_ids(first)) + runaway.submitted,
                "slurm_resample_jobs": runaway.submitted, "runaway": True,
                "executions": sum(executions_in_slurm(workdir).values()),
                "twice": sum(n > 1 for n in executions_in_slurm(workdir).values()),
            }
        outputs = [first, second]
    else:
        started = time.time()
        wall, output = snakemake(workdir, env, args, list(PREP_TARGETS) + targets, "all", timeout)
        prep_s = finished_at(output, "plan") - started
        resample_s = wall - prep_s
        outputs = [output]
    jobs: dict[int, str] = {}
    smk_jobs = 0
    for output in outputs:
        finished = finished_jobs(output)
        smk_jobs += len(finished)
        jobs.update(finished)
    rules = Counter(finished_jobs(outputs[-1]).values())
    expected = Counter(
        resample_training=sum(role == "train" for _, role in subjects),
        resample_test=sum(role == "test" for _, role in subjects),
    )
    assert +Counter({r: n for r, n in rules.items() if r.startswith("resample")}) == +expected, (
        label, rules, expected)
    row = {
        "label": label,
        "subjects": len(subjects),
        "smk_jobs": smk_jobs,
        "prep_s": prep_s,
        "resample_s": resample_s,
        "load": load,
    }
    missing = [t for t in targets if not (workdir / t).is_file()]
    assert not missing, (label, missing[:3])
    if cluster is None:
        return row

    ids = [i for output in outputs for i in slurm_job_ids(output)]
    # cross-checks: one SLURM log per submitted job, every job in the completion log, COMPLETED
    logs = list((workdir / ".snakemake" / "slurm_logs").rglob("*.log"))
    assert len(logs) == len(ids), (label, len(logs), len(ids))
    completed = {job["JobId"]: job for job in cluster.completed_jobs()}
    assert set(ids) <= set(completed), (label, set(ids) - set(completed))
    assert all(completed[i]["JobState"] == "COMPLETED" for i in ids), label
    resample_jobs = [completed[i] for i in ids if _is_resample(workdir, i)]
    elapsed = [_seconds(j["EndTime"]) - _seconds(j["StartTime"]) for j in resample_jobs]
    runs = executions_in_slurm(workdir)
    row.update(
        slurm_jobs=len(ids),
        slurm_resample_jobs=len(resample_jobs),
        executions=sum(runs.values()),
        twice=sum(n > 1 for n in runs.values()),
        mean_job_s=sum(elapsed) / len(elapsed),
        cpus=sorted({int(j.get("ProcCnt", 0)) for j in resample_jobs}),
        time_limits=sorted({int(j.get("TimeLimit", 0)) for j in resample_jobs}),
    )
    return row


def _is_resample(workdir: Path, job_id: str) -> bool:
    """Whether SLURM job ``job_id`` ran the resample group (its log lies in the group's folder)."""
    return any(
        "resample" in log.parent.name
        for log in (workdir / ".snakemake" / "slurm_logs").rglob(f"{job_id}.log")
    )


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)  # runs the finally blocks: Snakemake ended, cluster stopped


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundles", nargs="*", default=["30:1"], metavar="SIZE[:CORES]",
                        help="further bundle sizes to run, each with --cores CORES (default 2); "
                        "default: 30:1")
    parser.add_argument("--subjects", type=int, default=0,
                        help="subjects of the local and bundled runs (default 0: all 210)")
    parser.add_argument("--unbundled-subjects", type=int, default=60,
                        help="subjects of the unbundled run (first N of dataset.json; 0: all)")
    parser.add_argument("--resume-subjects", type=int, default=8,
                        help="subjects of the run resumed after the manifest checkpoint, with the "
                        "profile's bundles (0: skip it)")
    parser.add_argument("--no-local", action="store_true", help="skip the local reference run")
    parser.add_argument("--timeout", type=float, default=1500, help="seconds per Snakemake call")
    parser.add_argument("--keep", action="store_true", help="keep the working directories")
    options = parser.parse_args()

    every = archive_subjects()

    def first(n: int) -> list[tuple[str, str]]:
        return every[:n] if n else every

    subjects = first(options.subjects)
    import yaml

    # the profile no longer groups (a job is a chunk of subjects): "1" labels the run as shipped
    profile_size = (yaml.safe_load((PROFILE / "config.yaml").read_text()).get("group-components") or {}).get(
        "resample", 1)

    work = Path(tempfile.mkdtemp(prefix="msdseg-grp-", dir="/tmp"))
    base_env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_WAIT_POLICY="PASSIVE")
    rows = []
    cluster = SlurmCluster(work / "slurm")
    started = time.monotonic()
    try:
        if not options.no_local:
            rows.append(run_one("local --cores 2", work / "local", base_env, ["--cores", "2"],
                                subjects, None, options.timeout))
        cluster.start()
        env = dict(cluster.env, PYTHONPATH=str(ROOT), OMP_WAIT_POLICY="PASSIVE")
        slurm_args = ["--profile", str(PROFILE), *CLUSTER_OPTIONS]
        # (label, extra options, subjects, resumed after the checkpoint)
        runs = [("slurm unbundled (resample=1)",
                 ["--cores", "2", "--group-components", "resample=1"],
                 first(options.unbundled_subjects), False),
                (f"slurm bundle {profile_size} (profile)", ["--cores", "2"], subjects, False)]
        for spec in options.bundles:
            size, _, cores = spec.partition(":")
            cores = cores or "2"
            runs.append((f"slurm bundle {size}, --cores {cores}",
                         ["--cores", cores, "--group-components", f"resample={size}"],
                         subjects, False))
        if options.resume_subjects:
            runs.append((f"slurm bundle {profile_size}, resumed", ["--cores", "2"],
                         first(options.resume_subjects), True))
        for index, (label, extra, chosen, resume) in enumerate(runs):
            try:
                rows.append(run_one(label, work / f"slurm{index}", env, slurm_args + extra,
                                    chosen, cluster, options.timeout, resume=resume))
            except (RuntimeError, AssertionError, TimeoutError) as error:  # report, go on
                print(f"{label} FAILED: {str(error)[-3000:]}", flush=True)
                rows.append({"label": label, "error": str(error).splitlines()[0][:200]})
    finally:
        cluster.stop()
        if not options.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"working directories kept in {work}")

    print()
    print(f"Task04_Hippocampus data stage (extract, manifest, plan, resample) from the archive, "
          f"{os.cpu_count()} CPUs, whole benchmark {time.monotonic() - started:.0f} s")
    header = (f"{'run':<28} {'subj':>4} {'smk jobs':>8} {'SLURM jobs':>10} {'runs':>5} "
              f"{'prep s':>6} {'resample s':>10} {'total s':>7} {'s/subj':>6} {'s/SLURM job':>11} "
              f"{'load':>4}")
    print(header)
    print("-" * len(header))
    for row in rows:
        if "error" in row:
            print(f"{row['label']:<28} FAILED: {row['error']}")
            continue
        total = row["prep_s"] + row["resample_s"]
        slurm = (f"{row['slurm_jobs']} ({row['slurm_resample_jobs']})"
                 if "slurm_jobs" in row else "-")
        per_job = f"{row['mean_job_s']:.1f}" if "mean_job_s" in row else "-"
        if row.get("runaway"):
            slurm += "!"
        runs_done = str(row["executions"]) if "executions" in row else "-"
        print(f"{row['label']:<28} {row['subjects']:>4} {row['smk_jobs']:>8} {slurm:>10} "
              f"{runs_done:>5} {row['prep_s']:>6.0f} {row['resample_s']:>10.0f} {total:>7.0f} "
              f"{row['resample_s'] / row['subjects']:>6.2f} {per_job:>11} {row['load']:>4.1f}")
    print("smk jobs: Snakemake jobs finished (3 prep + one per subject); SLURM jobs: submitted "
          "(of them resample); runs: resample jobs executed inside SLURM; prep s: start to plan "
          "done (3 SLURM jobs); resample s: the rest; s/subj: resample s per subject; "
          "s/SLURM job: mean run time of a resample SLURM job; load: 1-min load average before.")
    for row in rows:
        if "error" in row:
            continue
        if row["subjects"] < len(every):
            note = f"{row['label']}: the first {row['subjects']} of {len(every)} subjects only"
            if "unbundled" in row["label"]:
                note += (f"; at its rate all {len(every)} would take about "
                         f"{row['resample_s'] / row['subjects'] * len(every):.0f} s to resample, "
                         f"in {len(every)} SLURM jobs")
            print(note)
        if "resumed" in row["label"]:
            print(f"{row['label']}: two calls (up to plan.json, then the resampled files), as a "
                  f"run resumed after the manifest checkpoint; {row['twice']} of "
                  f"{row['subjects']} subjects were resampled more than once")
            if row.get("runaway"):
                print(f"{row['label']}: STOPPED by the benchmark after {row['slurm_resample_jobs']}"
                      f" resample SLURM jobs for {row['subjects']} subjects (it resubmitted "
                      "bundles of already finished jobs); its times are up to the stop")
        if row.get("cpus"):
            print(f"{row['label']}: a resample SLURM job asked for CPUs {row['cpus']}, "
                  f"time limits (min) {row['time_limits'][0]}..{row['time_limits'][-1]}")


if __name__ == "__main__":
    main()
