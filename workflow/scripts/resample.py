"""Rules resample_training / resample_test: one subject onto the plan's grid."""

import _bootstrap  # noqa: F401

from pathlib import Path

from msdseg.logs import job_log
from msdseg.resample import read_plan, resample_subject

with job_log(snakemake.log[0]):
    label_in = snakemake.input.get("label")
    label_out = snakemake.output.get("label")
    resample_subject(
        Path(snakemake.input.image),
        Path(snakemake.output.image),
        read_plan(snakemake.input.plan),
        label_in=Path(label_in) if label_in else None,
        label_out=Path(label_out) if label_out else None,
    )
