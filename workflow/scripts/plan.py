"""Rule plan: target spacing and intensity normalisation from the training subjects."""

import _bootstrap  # noqa: F401

import logging
from pathlib import Path

from msdseg.data.manifest import read_manifest
from msdseg.decathlon import read_dataset_json
from msdseg.logs import job_log
from msdseg.plan.preprocessing import make_plan, write_plan

with job_log(snakemake.log[0]):
    plan = make_plan(
        read_manifest(snakemake.input.manifest),
        read_dataset_json(Path(snakemake.input.folder)),
        snakemake.params.preprocess,
        snakemake.params.task,
        snakemake.params.resolution,
    )
    if plan["resolution"]:
        logging.getLogger("msdseg.plan.preprocessing").info("target spacing %s: %s", plan["target_spacing"],
                                                           plan["resolution"]["reason"])
    write_plan(plan, snakemake.output.plan)
