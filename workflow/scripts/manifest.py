"""Checkpoint manifest: validate every subject of dataset.json and assign folds."""

import _bootstrap  # noqa: F401

from pathlib import Path

from msdseg.config import check_labels
from msdseg.data.manifest import build_manifest, write_excluded, write_manifest
from msdseg.decathlon import read_dataset_json
from msdseg.logs import job_log

with job_log(snakemake.log[0]):
    settings = snakemake.params.manifest
    dataset = read_dataset_json(Path(snakemake.input.folder))
    # per-class keys against this task's labels now, before any subject is read or resampled. Read
    # from the config, not params: a changed class weight must not redo the manifest (plan_training,
    # which declares them, checks them again on every change).
    check_labels(snakemake.config["train"], dataset.labels, f"{snakemake.input.folder}/dataset.json")
    manifest, excluded = build_manifest(
        dataset,
        n_folds=settings["n_folds"],
        seed=snakemake.params.seed,
        on_invalid=settings["on_invalid"],
        affine_tolerance=settings["affine_tolerance"],
    )
    write_excluded(excluded, snakemake.output.excluded)
    write_manifest(manifest, snakemake.output.manifest)
