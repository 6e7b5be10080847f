"""profiles/default and profiles/slurm; the SLURM profile on a real single-node SLURM cluster.

The static checks need nothing. The cluster tests start Debian's slurm-wlm and munge on this
machine (tests/slurm_cluster.py; installed by .ci/install_slurm.sh, which the ``slurm_cluster``
fixture runs when they are missing) and skip, saying why, only where the packages cannot be
installed. Set MSDSEG_SLURM_INSTALL=0 to never install from the tests.

The cluster has partitions ``cpu`` (default) and ``gpu`` with one count-only GPU, i.e. the
placeholder names of profiles/slurm, so the profile is used as shipped. What the tests add on
the command line is what this cluster differs in: no accounting database
(``--slurm-status-command squeue``), 2 CPUs (``--cores 2`` caps grouped jobs' width), and
quicker status polling.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from helpers import assert_dice_floors
from slurm_cluster import SlurmCluster, missing_commands

REPOSITORY = Path(__file__).resolve().parents[1]
SLURM_PROFILE = REPOSITORY / "profiles" / "slurm"
DEFAULT_PROFILE = REPOSITORY / "profiles" / "default"
GPU_RULES = {"plan_training", "train", "infer_fold", "infer_test", "infer_folder"}
STANDARD_RESOURCES = {
    "gpu", "gpu_model", "mem_mb", "runtime", "cpus_per_task", "slurm_partition", "slurm_account",
}
# what this test cluster needs beyond the profile (see the module docstring)
CLUSTER_OPTIONS = (
    "--slurm-status-command", "squeue",
    "--slurm-init-seconds-before-status-checks", "5",
    "--slurm-keep-successful-logs",
)
TASK = "Task00_SyntheticLiver"
TINY = {
    "synthetic": {"n_train": 4, "n_test": 1},
    "train": {
        # 120 steps: enough to learn the lesions, so the Dice floor below means something
        "folds": [0, 1], "iterations": 120, "validate_every": 60, "checkpoint_every": 60, "samples_per_volume": 2,
        "queue_length": 4, "num_workers": 0, "threads": 1, "mem_mb": 1000,
    },
    "infer": {"threads": 1, "mem_mb": 1000},
}


def profile(folder: Path) -> dict:
    with open(folder / "config.yaml") as handle:
        return yaml.safe_load(handle)


# ------------------------------------------------------------------------ static checks


def test_default_profile_never_runs_two_gpu_jobs_on_one_gpu():
    # the workflow sets the global `gpu` limit to the machine's GPU count (a fixed value here
    # would clamp every job's gpu, train.devices included); test_devices.py checks it in dry runs
    settings = profile(DEFAULT_PROFILE)
    assert "gpu" not in (settings.get("resources") or {})
    common = (REPOSITORY / "workflow" / "rules" / "common.smk").read_text()
    assert "from msdseg.jobs.gpu_slots import local_gpu_count" in common
    assert {"mem_mb", "runtime"} <= set(settings["default-resources"])
    assert "executor" not in settings


def test_slurm_profile_uses_standard_resource_names_and_no_gres():
    settings = profile(SLURM_PROFILE)
    assert settings["executor"] == "slurm"
    for rule, resources in settings["set-resources"].items():
        assert set(resources) <= STANDARD_RESOURCES | {"slurm_extra"}, rule
        assert not re.search(r"--(gres|gpus)\b", str(resources.get("slurm_extra", ""))), rule
        expected = "gpu" if rule in GPU_RULES else "cpu"
        assert resources["slurm_partition"] == expected, rule
        # train's (and its probe's) count comes from the rule (train.devices); test_devices.py checks it
        assert (resources.get("gpu", 0) >= 1) == (rule in GPU_RULES - {"train", "plan_training"}), rule
    assert settings["set-resource-scopes"] == {"gpu": "local"}


def test_slurm_profile_does_not_fight_the_implicit_workflow_profile():
    """profiles/default is read next to --profile profiles/slurm and wins key by key."""
    slurm, default = profile(SLURM_PROFILE), profile(DEFAULT_PROFILE)
    for key in set(slurm) & set(default):
        assert slurm[key] == default[key], f"profiles/default overrides '{key}' of profiles/slurm"


def _workflow_rules() -> set[str]:
    run = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPOSITORY / "Snakefile"),
         "--list-rules", "--nocolor"],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=str(REPOSITORY)),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return {line.split()[0] for line in run.stdout.splitlines() if line and not line[0].isspace()}


def _local_rules() -> set[str]:
    """Rules marked ``localrule: True``: they run where Snakemake runs and are never submitted."""
    local, rule = set(), None
    for path in [REPOSITORY / "Snakefile", *(REPOSITORY / "workflow" / "rules").glob("*.smk")]:
        for line in path.read_text().splitlines():
            declared = re.match(r"^\s*(?:rule|checkpoint) (\w+):", line)
            if declared:
                rule = declared.group(1)
            elif rule and re.match(r"^\s+localrule:\s*True", line):
                local.add(rule)
    return local


def test_slurm_profile_names_every_rule_and_group_of_the_workflow():
    if not (REPOSITORY / "Snakefile").exists():
        pytest.skip(reason="no Snakefile yet")
    rules = _workflow_rules() - {"all"} - _local_rules()
    settings = profile(SLURM_PROFILE)
    assert rules == set(settings["set-resources"]) - _local_rules(), "profiles/slurm set-resources vs submitted rules"
    groups = set()
    for path in (REPOSITORY / "workflow" / "rules").glob("*.smk"):
        groups |= set(re.findall(r"^\s+group:\s*\n\s+\"(\w+)\"", path.read_text(), re.M))
    assert set(settings.get("group-components") or {}) <= groups


# ------------------------------------------------------------------------ the cluster


def _why_unavailable() -> str | None:
    missing = missing_commands()
    plugin = importlib.util.find_spec("snakemake_executor_plugin_slurm") is not None
    if not missing and plugin:
        return None
    said = ""
    if os.environ.get("MSDSEG_SLURM_INSTALL", "1") != "0":
        run = subprocess.run(
            ["bash", str(REPOSITORY / ".ci" / "install_slurm.sh")],
            capture_output=True, text=True, timeout=900,
        )
        said = (run.stdout + run.stderr).strip()
        importlib.invalidate_caches()
        missing = missing_commands()
        plugin = importlib.util.find_spec("snakemake_executor_plugin_slurm") is not None
        if not missing and plugin:
            return None
    parts = []
    if missing:
        parts.append("missing " + ", ".join(missing) + " (Debian packages slurm-wlm, munge)")
    if not plugin:
        parts.append("snakemake-executor-plugin-slurm is not installed")
    return "no SLURM here: " + "; ".join(parts) + (f". .ci/install_slurm.sh said: {said}" if said else "")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    reason = _why_unavailable()
    if reason:
        pytest.skip(reason=reason)
    # 2 stand-in GPUs: two train jobs (folds) run side by side as on a real GPU partition
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), gpus=2)
    cluster.start()  # a cluster that is installed but does not start is a failure
    try:
        yield cluster
    finally:
        cluster.stop()


def _run(command: list[str], cwd: Path, env: dict, timeout: int = 600) -> str:
    run = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-8000:]
    return output


def _slurm_jobs_of(cluster: SlurmCluster, output: str) -> list[dict[str, str]]:
    """The SLURM jobs of one Snakemake run (the plugin names them after its run ID)."""
    run_id = re.search(r"SLURM run ID: (\S+)", output).group(1)
    submitted = re.findall(r"submitted with SLURM jobid (\d+)", output)
    jobs = cluster.jobs(name=run_id)
    assert sorted(job["JobId"] for job in jobs) == sorted(submitted)
    assert all(job["JobState"] == "COMPLETED" for job in jobs), jobs
    return jobs


def _rules_run_in_slurm(workdir: Path) -> Counter:
    """Snakemake jobs per rule that ran inside SLURM jobs, from the SLURM job logs."""
    counts: Counter = Counter()
    for log in (workdir / ".snakemake" / "slurm_logs").rglob("*.log"):
        counts.update(re.findall(r"^\s*(?:rule|checkpoint) (\w+):$", log.read_text(), re.M))
    return counts


def _partitions_are_right(jobs: list[dict[str, str]]) -> None:
    """GPU jobs (plan_training, train, infer_* and the `infer` group) in `gpu` with one GPU, the rest in `cpu`.

    The plugin comments a job `rule_<rule>[_wildcards_...]`, a group job `rule_<group>_<rules>`.
    """
    seen = [(job["JobId"], job["Comment"], job["Partition"], job.get("TresPerJob")) for job in jobs]
    for job in jobs:
        gpu_job = re.match(r"rule_(plan_training|train|infer)(_|$)", job["Comment"]) is not None
        assert job["Partition"] == ("gpu" if gpu_job else "cpu"), seen
        assert ("gpu:1" in job.get("TresPerJob", "")) == gpu_job, seen


@pytest.mark.slurm
def test_cluster_runs_batch_jobs_and_job_steps_on_both_partitions(slurm_cluster, tmp_path):
    submitted = {
        partition: subprocess.Popen(
            ["sbatch", "--wait", "--parsable", "-p", partition, *extra, "--mem", "100", "-t", "2",
             "-o", str(tmp_path / f"{partition}.out"), "--wrap", "srun -n1 echo step-ran"],
            cwd=tmp_path, env=slurm_cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )
        for partition, extra in (("cpu", []), ("gpu", ["--gpus=1"]))
    }
    for partition, process in submitted.items():
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 0, output
        assert "step-ran" in (tmp_path / f"{partition}.out").read_text()
        (job,) = [job for job in slurm_cluster.jobs() if job["JobId"] == output.split()[0]]
        assert job["Partition"] == partition and job["JobState"] == "COMPLETED"


TOY_SNAKEFILE = """
SUBJECTS = ["s1", "s2", "s3"]
# as workflow/rules/common.smk sets when submitting: a limit of the largest job's GPUs, so that a
# bundle (its jobs run one after the other in one SLURM job) asks for one GPU
workflow.global_resources.setdefault("gpu", 1)

rule all:
    input: "summary.txt"

rule resample_training:
    output: "resampled/{subject}.txt"
    group: "resample"
    resources: mem_mb=200, runtime=5
    shell: "echo $SLURM_JOB_ID {wildcards.subject} > {output}"

rule train:
    input: expand("resampled/{subject}.txt", subject=SUBJECTS)
    output: "model.txt"
    threads: 1
    resources: mem_mb=200, runtime=5, gpu=1  # as workflow/rules/train.smk asks when submitting
    shell: "cat {input} > {output}"

rule infer_fold:
    input: "model.txt"
    output: "predictions/{subject}.txt"
    group: "infer"
    resources: mem_mb=200, runtime=5, gpu=0
    shell: "echo $SLURM_JOB_ID {wildcards.subject} > {output}"

rule summarize:
    input: expand("predictions/{subject}.txt", subject=SUBJECTS)
    output: "summary.txt"
    resources: mem_mb=200, runtime=5
    shell: "cat {input} > {output}"
"""


@pytest.mark.slurm
def test_profile_sends_every_job_through_sbatch_to_its_partition_grouped(slurm_cluster, tmp_path):
    """A workflow with the real rule names, profiles/ copied beside it as in the repository."""
    (tmp_path / "Snakefile").write_text(TOY_SNAKEFILE)
    for name in ("default", "slurm"):
        (tmp_path / "profiles" / name).mkdir(parents=True)
        (tmp_path / "profiles" / name / "config.yaml").write_text(
            (REPOSITORY / "profiles" / name / "config.yaml").read_text()
        )
    output = _run(
        [sys.executable, "-m", "snakemake", "--profile", "profiles/slurm", "--cores", "2",
         "--nocolor", *CLUSTER_OPTIONS,
         "--group-components", "resample=4", "infer=4"],  # Snakemake's grouping, with the profile
        cwd=tmp_path, env=slurm_cluster.env,
    )
    jobs = _slurm_jobs_of(slurm_cluster, output)
    # 3 resample jobs -> 1 group job, train, 3 infer jobs -> 1 group job (one GPU), summarize
    assert len(jobs) == 4, jobs
    _partitions_are_right(jobs)
    assert _rules_run_in_slurm(tmp_path) == {
        "resample_training": 3, "train": 1, "infer_fold": 3, "summarize": 1,
    }
    # outputs were written inside SLURM jobs, each group's jobs in one SLURM job
    infer_ids = {(tmp_path / "predictions" / f"s{i}.txt").read_text().split()[0] for i in (1, 2, 3)}
    assert len(infer_ids) == 1 and infer_ids <= {job["JobId"] for job in jobs}


# ------------------------------------------------------------------------ the demo workflow


def _start_snakemake(workdir: Path, env: dict, *args: str) -> subprocess.Popen:
    """The demo workflow with the TINY config in workdir (output to workdir/snakemake.out)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "test_config.yaml"
    config.write_text(yaml.safe_dump(TINY))
    command = [
        sys.executable, "-m", "snakemake", "--snakefile", str(REPOSITORY / "Snakefile"),
        "--directory", str(workdir), "--cores", "2", "--nocolor", *args,
        "--configfile", str(config),
    ]
    env = dict(env, PYTHONPATH=str(REPOSITORY), OMP_WAIT_POLICY="PASSIVE")
    with open(workdir / "snakemake.out", "w") as out:
        return subprocess.Popen(command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)


def _finish(process: subprocess.Popen, workdir: Path, timeout: float = 900) -> str:
    try:
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)
    output = (workdir / "snakemake.out").read_text()
    assert process.returncode == 0, output[-8000:]
    return output


def _finished_per_rule(output: str) -> Counter:
    return Counter(re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", output))


@pytest.mark.slurm
@pytest.mark.slow
def test_demo_workflow_through_slurm_profile_equals_a_local_run(slurm_cluster, tmp_path):
    import nibabel as nib
    import numpy as np

    if not (REPOSITORY / "Snakefile").exists():
        pytest.skip(reason="no Snakefile yet")
    # side by side: the SLURM run mostly waits for its status polls
    slurm_run = _start_snakemake(
        tmp_path / "slurm", slurm_cluster.env, "--profile", str(SLURM_PROFILE), *CLUSTER_OPTIONS,
    )
    local_run = _start_snakemake(tmp_path / "local", dict(os.environ))
    local_out = _finish(local_run, tmp_path / "local")
    slurm_out = _finish(slurm_run, tmp_path / "slurm")

    # every job but the target rule ran inside a SLURM job, in the partition meant for it
    jobs = _slurm_jobs_of(slurm_cluster, slurm_out)
    _partitions_are_right(jobs)
    expected = _finished_per_rule(local_out)
    expected.pop("all", None)
    submitted = Counter({rule: n for rule, n in expected.items() if rule not in _local_rules()})
    assert _rules_run_in_slurm(tmp_path / "slurm") == submitted
    assert _finished_per_rule(slurm_out) - Counter({"all": 1}) == expected
    # one SLURM job per chunk of subjects: fewer jobs than subjects placed
    assert len(jobs) == sum(submitted.values()) < sum(expected.values())

    # the results are the same
    local, slurm = (tmp_path / name / "results" / TASK for name in ("local", "slurm"))
    for name in ("manifest.csv", "excluded.csv", "plan.json", "dice_summary.csv"):
        here, there = (local / name).read_text(), (slurm / name).read_text()
        diff = "\n".join(difflib.unified_diff(
            here.splitlines(), there.splitlines(), "local/" + name, "slurm/" + name, lineterm="", n=0
        ))
        assert here == there, diff[:4000]
    assert_dice_floors(local / "dice_summary.csv", {"liver": 0.6, "cancer": 0.3})
    predictions = sorted(p.relative_to(local) for p in local.glob("**/predictions/**/*.nii.gz"))
    assert predictions
    assert predictions == sorted(p.relative_to(slurm) for p in slurm.glob("**/predictions/**/*.nii.gz"))
    for path in predictions:
        a, b = nib.load(local / path), nib.load(slurm / path)
        np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj), err_msg=str(path))
        np.testing.assert_array_equal(a.affine, b.affine)
