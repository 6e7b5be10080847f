"""Rules resample_training / resample_test: a chunk of subjects onto the plan's grid, into a staging folder."""

import _bootstrap  # noqa: F401

from msdseg.logs import job_log
from msdseg.plan import read_plan
from msdseg.resample import resample_chunk


def files(value):
    """A named input as a list (a single file comes as a string)."""
    return [value] if isinstance(value, str) else list(value)


with job_log(snakemake.log[0]):
    labels = snakemake.input.get("labels")
    resample_chunk(
        list(snakemake.params.subjects),
        files(snakemake.input.images),
        snakemake.output.staged,
        read_plan(snakemake.input.plan),
        labels=files(labels) if labels else None,
        folders=dict(snakemake.params.folders),
    )
