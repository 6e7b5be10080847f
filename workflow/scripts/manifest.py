"""Checkpoint manifest: validate every subject of dataset.json and assign folds."""

import _bootstrap  # noqa: F401

from pathlib import Path

from msdseg.decathlon import read_dataset_json
from msdseg.logs import job_log
from msdseg.manifest import build_manifest, write_excluded, write_manifest

with job_log(snakemake.log[0]):
    settings = snakemake.params.manifest
    dataset = read_dataset_json(Path(snakemake.input.folder))
    manifest, excluded = build_manifest(
        dataset,
        n_folds=settings["n_folds"],
        seed=snakemake.params.seed,
        on_invalid=settings["on_invalid"],
        affine_tolerance=settings["affine_tolerance"],
    )
    write_excluded(excluded, snakemake.output.excluded)
    write_manifest(manifest, snakemake.output.manifest)
