"""The data half of the workflow through Snakemake: archive -> download -> extract -> manifest -> plan.

The real Task04_Hippocampus archive is served over HTTP on 127.0.0.1, so the real download code
path runs; faults are real files and a real server that misbehaves.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from helpers import write_task_folder
from msdseg.plan.resolution import resolution_for_cohort
from workflow_runner import output_of, snakemake

pytestmark = pytest.mark.slow

TASK = "Task04_Hippocampus"


def _digests(shared_data: Path, name: str) -> tuple[str, str]:
    def lookup(file: str) -> str:
        for line in (shared_data / file).read_text().splitlines():
            digest, _, member = line.partition("  ")
            if member.strip() == name:
                return digest
        raise KeyError(name)

    return lookup("MD5SUMS"), lookup("SHA256SUMS")


def _hippocampus_config(url: str, md5: str, sha256: str | None = None, **source: object) -> dict:
    return {"task": TASK, "source": {"url": url, "md5": md5, "sha256": sha256, **source}}


def _assert_nothing_trusted(workdir: Path) -> None:
    results = workdir / "results" / TASK
    assert not (results / "raw").exists(), "an extracted folder was left behind"
    assert not (results / "manifest.csv").exists(), "a manifest was left behind"
    assert not (results / "download" / f"{TASK}.tar").exists(), "an unverified archive was kept as done"


def test_hippocampus_over_http_to_manifest_and_nothing_to_redo(tmp_path, http_server, shared_data):
    md5, sha256 = _digests(shared_data, f"{TASK}.tar")
    url = http_server.url_for(shared_data / f"{TASK}.tar")
    config = _hippocampus_config(url, md5, sha256)
    target = f"results/{TASK}/plan.json"

    run = snakemake(tmp_path, target, config=config)
    assert run.returncode == 0, output_of(run)

    manifest = pd.read_csv(tmp_path / "results" / TASK / "manifest.csv")
    assert (manifest["role"] == "train").sum() == 200
    assert (manifest["role"] == "test").sum() == 10
    assert not manifest["subject"].str.startswith("._").any()
    assert sorted(c for c in manifest.columns if c.startswith("voxels_")) == ["voxels_0", "voxels_1", "voxels_2"]
    train = manifest[manifest["role"] == "train"]
    assert (train[["voxels_1", "voxels_2"]] > 0).all().all()
    # the schema's 5 folds: the demo's preset (n_folds 3) no longer reaches another task
    assert sorted(train["fold"].unique()) == [0, 1, 2, 3, 4]
    assert set(manifest.loc[manifest["role"] == "test", "fold"]) == {-1}
    assert any(r.path.endswith(f"{TASK}.tar") for r in http_server.requests)

    again = snakemake(tmp_path, target, "-n", config=config)
    assert again.returncode == 0, output_of(again)
    assert "Nothing to be done" in output_of(again)


def test_wrong_checksum_fails_naming_both_digests_and_keeps_nothing(tmp_path, http_server, shared_data):
    md5, _ = _digests(shared_data, f"{TASK}.tar")
    wrong = "0" * 32
    config = _hippocampus_config(http_server.url_for(shared_data / f"{TASK}.tar"), wrong)
    run = snakemake(tmp_path, f"results/{TASK}/manifest.csv", config=config)
    assert run.returncode != 0
    log = output_of(run) + "".join(p.read_text() for p in (tmp_path / "results").rglob("*.log"))
    assert wrong in log and md5 in log
    _assert_nothing_trusted(tmp_path)


def test_truncated_download_fails_and_keeps_nothing_trusted(tmp_path, http_server, shared_data):
    md5, _ = _digests(shared_data, f"{TASK}.tar")
    http_server.cut_after(1_000_000, requests=1000)  # every request dies after 1 MB
    config = _hippocampus_config(http_server.url_for(shared_data / f"{TASK}.tar"), md5, retries=1)
    run = snakemake(tmp_path, f"results/{TASK}/manifest.csv", config=config)
    assert run.returncode != 0
    _assert_nothing_trusted(tmp_path)


@pytest.mark.parametrize("hostile", ["dotdot", "symlink"])
def test_hostile_local_archive_is_rejected_and_nothing_written_outside(tmp_path, hostile):
    archive = tmp_path / "hostile.tar"
    with tarfile.open(archive, "w") as tar:
        payload = b'{"name": "x", "labels": {"0": "background"}, "training": [], "test": []}'
        info = tarfile.TarInfo("Task99_Hostile/dataset.json")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
        if hostile == "dotdot":
            evil = tarfile.TarInfo("Task99_Hostile/../../escaped.txt")
            evil.size = 4
            tar.addfile(evil, io.BytesIO(b"evil"))
        else:
            link = tarfile.TarInfo("Task99_Hostile/imagesTr")
            link.type = tarfile.SYMTYPE
            link.linkname = "/etc"
            tar.addfile(link)
    workdir = tmp_path / "work"
    run = snakemake(workdir, "results/Task99_Hostile/manifest.csv",
                    config={"task": "Task99_Hostile", "source": {"archive": str(archive)}})
    assert run.returncode != 0
    assert not (workdir / "results" / "Task99_Hostile" / "raw").exists()
    assert not (tmp_path / "escaped.txt").exists() and not (workdir / "escaped.txt").exists()
    assert not list(tmp_path.rglob("escaped.txt"))


@pytest.mark.parametrize(
    "override, key",
    [
        ({"task": "Task99_Unknown"}, "task"),
        ({"train": {"patch_size": [-4, 32, 32]}}, "train.patch_size"),
        ({"train": {"batch_size": "four"}}, "batch_size"),
        ({"infer": {"overlap": [32, 2, 2]}}, "infer.overlap"),
    ],
)
def test_bad_config_fails_before_any_job_naming_the_key(tmp_path, override, key):
    run = snakemake(tmp_path, config=override)
    assert run.returncode != 0
    assert key in output_of(run)
    assert not (tmp_path / "results").exists()


def test_a_cpu_budget_too_short_for_large_images_plans_a_coarser_spacing(tmp_path):
    """Rule plan's low-resolution decision (msdseg.plan.resolution), through Snakemake: a Spleen-like
    cohort on a CPU with 15 minutes gets a coarser spacing in plan.json with its reason; 16 minutes
    decide the same and rerun nothing; a budget that affords full resolution replans at it."""
    task = write_task_folder(tmp_path / "data", "Task87_LargeCT", labels=("background", "organ"), modality="CT",
                             shape=(320, 320, 60), spacing=(0.8, 0.8, 2.5), n_train=3, n_test=0)
    config = {"task": task.name, "source": {"folder": str(task)}, "plan": {"device": "cpu"},
              "train": {"max_minutes": 15}}
    target = f"results/{task.name}/plan.json"
    run = snakemake(tmp_path / "run", target, config=config)
    assert run.returncode == 0, output_of(run)
    plan_json = tmp_path / "run" / target
    plan = json.loads(plan_json.read_text())
    expected = resolution_for_cohort([(0.8, 0.8, 2.5)] * 3, [(320, 320, 60)] * 3, 1, "median", None, "cpu", 2, 15)
    assert expected is not None and plan["resolution"]["full_spacing"] == expected["full_spacing"]
    assert plan["target_spacing"] == plan["resolution"]["spacing"] == pytest.approx(expected["spacing"], abs=1e-3)
    assert plan["target_spacing"][0] > 1.2 and "low resolution" in plan["resolution"]["reason"]
    assert "low resolution" in (tmp_path / "run" / "results" / task.name / "logs" / "plan.log").read_text()

    same = snakemake(tmp_path / "run", target, "-n", config={**config, "train": {"max_minutes": 16}})
    assert same.returncode == 0 and "Nothing to be done" in output_of(same), output_of(same)

    roomy = snakemake(tmp_path / "run", target, config={**config, "train": {"max_minutes": 100_000}})
    assert roomy.returncode == 0, output_of(roomy)
    full = json.loads(plan_json.read_text())
    assert full["resolution"] is None and full["target_spacing"] == pytest.approx([0.8, 0.8, 2.5])
