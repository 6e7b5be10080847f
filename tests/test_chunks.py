"""Chunks of subjects per job (msdseg.jobs): deterministic chunks, auto sizes, the cached cohort, folder cases.

And what a stage's job imports: resampling needs neither pandas nor torch, the DAG side not even numpy.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from msdseg.config import load_config
from msdseg.errors import DatasetError
from msdseg.grid import grid_patch_count
from msdseg.infer import cases as input_cases
from msdseg.jobs import chunking, costs, worklog
from msdseg.jobs import cohort as cohorts

REPOSITORY = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- chunks


def test_chunk_k_is_the_kth_slice_of_the_sorted_subjects():
    names = [f"s{i:02d}" for i in range(7)]
    built = chunking.Chunks.build(names, 3)
    assert built.members == (("s00", "s01", "s02"), ("s03", "s04", "s05"), ("s06",))
    assert built.names() == ["0000", "0001", "0002"]
    assert built.of["s04"] == "0001" and built["0002"] == ("s06",)
    assert built.span("0001") == slice(3, 6) and built.span("0002") == slice(6, 7)
    with pytest.raises(KeyError):
        built["0003"]


def test_a_changed_subject_stays_in_its_chunk_and_others_keep_theirs():
    """Chunks depend on the subject list only: the same list gives the same chunks."""
    names = [f"s{i:03d}" for i in range(50)]
    assert chunking.Chunks.build(names, 8) == chunking.Chunks.build(list(names), 8)
    # appending a subject changes the last chunk only
    more = chunking.Chunks.build([*names, "s999"], 8)
    assert more.members[:-1] == chunking.Chunks.build(names, 8).members[:-1]


def test_auto_fills_each_job_with_the_target_work_evenly():
    assert chunking.auto_size([0.1] * 210, 10.0) == 105  # 21 s -> 2 chunks of 105, not 100 + 100 + 10
    assert chunking.auto_size([0.1] * 50, 10.0) == 50  # 5 s: one chunk
    assert chunking.auto_size([30.0] * 4, 10.0) == 1  # each subject alone pays for its start-up
    assert chunking.auto_size([], 10.0) == 1
    assert chunking.chunk_size(7, [1.0] * 100, 10.0) == 7
    assert chunking.chunk_size("auto", [1.0] * 100, 10.0) == 10
    with pytest.raises(ValueError):
        chunking.chunk_size(0, [1.0], 10.0)


def test_target_keeps_start_up_under_a_tenth():
    assert costs.target_seconds(0.5) == costs.MIN_WORK_S
    assert costs.target_seconds(3.0) == pytest.approx(27.0)
    for startup in (0.5, costs.RESAMPLE_STARTUP_S, costs.INFER_STARTUP_S):
        assert startup / (startup + costs.target_seconds(startup)) <= costs.START_UP_SHARE + 1e-9


def test_estimates_grow_with_voxels_models_and_mirroring():
    config = load_config({"task": "Task04_Hippocampus", "preprocess": {"spacing": "median"},
                          "train": {"patch_size": [32, 32, 16]}, "model": {"base_channels": 16}})
    small = costs.infer_seconds((40, 40, 20), (1.0, 1.0, 1.0), config, 1)
    large = costs.infer_seconds((400, 400, 200), (1.0, 1.0, 1.0), config, 1)
    assert large > 100 * small
    assert costs.infer_seconds((400, 400, 200), (1.0, 1.0, 1.0), config, 5) > 4 * large
    mirrored = copy.deepcopy(config)
    mirrored["infer"]["tta"] = True
    mirrored["train"]["augmentation"]["flip_axes"] = [0]
    assert costs.infer_seconds((400, 400, 200), (1.0, 1.0, 1.0), mirrored, 1) > 1.8 * large
    # a fixed spacing halving the resolution of a 1 mm image: 1/8 of the voxels
    assert costs.resampled_shape((100, 100, 50), (1.0, 1.0, 1.0), {"spacing": [2.0, 2.0, 2.0]}) == (50, 50, 25)
    assert costs.resampled_shape((100, 100, 50), (1.0, 1.0, 1.0), {"spacing": "median", "inplane_size": [64, 64]}) \
        == (64, 64, 50)
    assert grid_patch_count((35, 51, 35), (32, 48, 32)) == 8


# --------------------------------------------------------------------------- the cohort


def _manifest(path: Path, rows: list[tuple[str, str, int]]) -> None:
    header = "subject,role,fold,image,label,n_channels,shape,spacing\n"
    lines = [f'{s},{role},{fold},/data/{s}.nii.gz,{"/data/l_" + s if role == "train" else ""},1,'
             '"[10, 10, 5]","[1.0, 1.0, 2.0]"' for s, role, fold in rows]
    path.write_text(header + "\n".join(lines) + "\n")


def test_cohort_lookups_and_cache_by_file_version(tmp_path):
    path = tmp_path / "manifest.csv"
    _manifest(path, [("a", "train", 0), ("b", "train", 1), ("c", "test", -1)])
    first = cohorts.cached_cohort(path)
    assert cohorts.cached_cohort(path) is first  # parsed once
    assert [s.subject for s in first.role("train")] == ["a", "b"]
    assert [s.subject for s in first.validation(1)] == ["b"]
    assert first.by_id["c"].label == "" and first.by_id["a"].shape == (10, 10, 5) and first.by_id["a"].voxels == 500
    _manifest(path, [("a", "train", 0), ("b", "train", 0), ("c", "test", -1), ("d", "test", -1)])
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000_000))
    second = cohorts.cached_cohort(path)
    assert second is not first and [s.subject for s in second.validation(0)] == ["a", "b"]


def test_cohort_reads_a_real_manifest_like_read_manifest(tmp_path, synthetic_dir):
    from msdseg.data.manifest import build_manifest, read_manifest, write_manifest
    from msdseg.decathlon import read_dataset_json

    manifest, _ = build_manifest(read_dataset_json(synthetic_dir), n_folds=2, seed=0)
    write_manifest(manifest, tmp_path / "manifest.csv")
    cohort = cohorts.read_cohort(tmp_path / "manifest.csv")
    table = read_manifest(tmp_path / "manifest.csv")
    assert [s.subject for s in cohort.subjects] == list(table["subject"])
    assert [s.fold for s in cohort.subjects] == list(table["fold"])
    assert [list(s.shape) for s in cohort.subjects] == list(table["shape"])


def test_a_job_finds_its_chunk_in_the_manifest_as_the_dag_does(tmp_path):
    path = tmp_path / "manifest.csv"
    _manifest(path, [(f"t{i}", "train", i % 2) for i in range(5)] + [("x", "test", -1)])
    cohort = cohorts.read_cohort(path)
    built = chunking.Chunks.build([s.subject for s in cohort.role("train")], 2)
    for chunk in built.names():
        assert tuple(s.subject for s in chunking.role_chunk(cohort, "train", 2, chunk)) == built[chunk]
    with pytest.raises(KeyError, match="no chunk"):
        chunking.role_chunk(cohort, "train", 2, "0003")


def test_a_resampling_job_refuses_a_chunk_the_workflow_did_not_plan(tmp_path):
    from msdseg.jobs.resample_jobs import resample_role_chunk

    path = tmp_path / "manifest.csv"
    _manifest(path, [("a", "train", 0), ("b", "train", 0), ("c", "train", 1)])
    with pytest.raises(DatasetError, match="manifest.csv changed while the workflow ran"):
        resample_role_chunk(path, "train", 2, "0000", tmp_path / "plan.json", tmp_path / "out", "b", 2)
    assert not (tmp_path / "out").exists()
    (tmp_path / "plan.json").write_text(json.dumps({"target_spacing": [1.0, 1.0, 1.0]}))
    with pytest.raises(DatasetError, match="plan lacks .*inplane_size"):
        resample_role_chunk(path, "train", 2, "0000", tmp_path / "plan.json", tmp_path / "out", "a", 2)


def test_an_inference_job_finds_its_chunk_as_the_dag_plans_it(tmp_path):
    """Fold chunks: its validation subjects, then the test list where the fold alone predicts it."""
    path = tmp_path / "manifest.csv"
    _manifest(path, [("a", "train", 0), ("b", "train", 1), ("c", "train", 0), ("x", "test", -1), ("y", "test", -1)])
    cohort = cohorts.read_cohort(path)
    assert [s.subject for s in chunking.infer_members(cohort, 0)] == ["a", "c"]
    assert [s.subject for s in chunking.infer_members(cohort, 0, with_test=True)] == ["a", "c", "x", "y"]
    assert [s.subject for s in chunking.infer_members(cohort, None)] == ["x", "y"]
    assert [s.subject for s in cohort.validation(0)] == ["a", "c"], "the cohort's own list is left as it was"
    built = chunking.Chunks.build([s.subject for s in chunking.infer_members(cohort, 0, True)], 3)
    for chunk in built.names():
        members = built[chunk]
        found = chunking.infer_chunk(path, 0, True, 3, chunk, members[0], len(members))
        assert tuple(s.subject for s in found) == members
    assert cohorts.resampled_image("r", cohort.by_id["x"]) == os.path.join("r", "imagesTs", "x.nii.gz")
    assert cohorts.resampled_image("r", cohort.by_id["a"]) == os.path.join("r", "imagesTr", "a.nii.gz")


def test_an_inference_job_refuses_a_chunk_the_workflow_did_not_plan(tmp_path):
    path = tmp_path / "manifest.csv"
    _manifest(path, [("a", "train", 0), ("b", "train", 0), ("x", "test", -1)])
    with pytest.raises(DatasetError, match=r"chunk 0000 of fold 0's validation subjects is 2 subject\(s\) from a, "
                                           r"but the workflow planned 3 from a; manifest.csv changed .*run it again"):
        chunking.infer_chunk(path, 0, False, 3, "0000", "a", 3)
    with pytest.raises(DatasetError, match=r"chunk 0001 of the test subjects is 0 subject\(s\) from None"):
        chunking.infer_chunk(path, None, False, 1, "0001", "y", 1)


def test_a_table_that_is_not_a_manifest_is_refused(tmp_path):
    path = tmp_path / "manifest.csv"
    path.write_text("subject,role\na,train\n")
    with pytest.raises(DatasetError, match="lacks columns"):
        cohorts.read_cohort(path)


# --------------------------------------------------------------------------- images of a folder


def _nifti(path: Path, shape: tuple[int, ...], spacing=(1.0, 1.0, 2.0)) -> Path:
    affine = np.diag([*spacing, 1.0])
    nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), affine), str(path))
    return path


def test_nifti_grid_reads_the_header_only(tmp_path, hippocampus_dir):
    image = hippocampus_dir / "imagesTr" / "hippocampus_001.nii.gz"
    loaded = nib.load(str(image))
    assert costs.nifti_grid(image) == (loaded.shape, tuple(float(v) for v in loaded.header.get_zooms()))
    four = _nifti(tmp_path / "four.nii", (6, 5, 4, 2))
    assert costs.nifti_grid(four)[0] == (6, 5, 4, 2)
    (tmp_path / "junk.nii.gz").write_bytes(gzip.compress(b"not a nifti" * 40))
    with pytest.raises(DatasetError, match="not a NIfTI"):
        costs.nifti_grid(tmp_path / "junk.nii.gz")


def test_folder_cases_decathlon_and_nnunet_layouts(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("b.nii.gz", "a.nii.gz", "._a.nii.gz", ".hidden.nii.gz", "notes.txt"):
        (folder / name).write_bytes(b"x")
    files = input_cases.list_images(str(folder))
    assert [Path(f).name for f in files] == ["a.nii.gz", "b.nii.gz"]
    assert [c.case for c in input_cases.group_cases(files)] == ["a", "b"]

    nnunet = [str(tmp_path / f"{case}_{k:04d}.nii.gz") for case in ("x", "y") for k in (1, 0)]
    cases = input_cases.group_cases(nnunet)
    assert [(c.case, [Path(f).name for f in c.files]) for c in cases] == [
        ("x", ["x_0000.nii.gz", "x_0001.nii.gz"]), ("y", ["y_0000.nii.gz", "y_0001.nii.gz"])]
    # numbered cases without channel 0000 (or with different channels per case) stay one file per case
    numbered = [str(tmp_path / f"liver_{k:04d}.nii.gz") for k in (1, 2, 3)]
    assert [c.case for c in input_cases.group_cases(numbered)] == ["liver_0001", "liver_0002", "liver_0003"]
    with pytest.raises(DatasetError, match="_0000"):
        input_cases.group_cases(numbered, "nnunet")
    assert [c.case for c in input_cases.group_cases(nnunet, "decathlon")] == ["x_0000", "x_0001", "y_0000", "y_0001"]
    with pytest.raises(DatasetError, match="one case name"):
        input_cases.group_cases([str(tmp_path / "a.nii"), str(tmp_path / "a.nii.gz")])
    with pytest.raises(DatasetError, match="no such image"):
        input_cases.list_images([str(tmp_path / "missing.nii.gz")])


# --------------------------------------------------------------------------- imports


def _imported(code: str) -> set[str]:
    script = f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          cwd=REPOSITORY / "workflow" / "scripts", env={**os.environ, "PYTHONPATH": str(REPOSITORY)})
    return set(done.stdout.split())


def test_a_resampling_job_imports_neither_pandas_nor_torch():
    modules = _imported("import _bootstrap\nfrom msdseg.logs import job_log\n"
                        "from msdseg.jobs.resample_jobs import resample_role_chunk")
    # nor Snakemake (a shell command, not `script:`), nor the config machinery (yaml) of msdseg.plan.preprocessing
    assert not {"pandas", "torch", "torchio", "jsonschema", "nibabel", "snakemake", "yaml"} & modules


def test_the_dag_side_imports_no_numpy():
    modules = _imported("import msdseg.jobs.chunking, msdseg.jobs.cohort, msdseg.jobs.costs, msdseg.jobs.gpu_slots\n"
                        "import msdseg.infer.cases")
    assert not {"numpy", "pandas", "torch"} & modules


def test_chunk_work_line_round_trips():
    line = worklog.work_line(12, 3.25)
    assert worklog.parse_work(f"INFO start\nINFO {line}\n") == (12, 3.25)
    assert worklog.parse_work("nothing") is None
    assert json.loads(json.dumps(worklog.failed_in_chunk("s1", 3))).startswith("(in a chunk of 3")
