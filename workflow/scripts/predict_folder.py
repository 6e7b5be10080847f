"""Rule infer_folder: resample and predict a chunk of new images with the fold ensemble, into its staging folder."""

import _bootstrap  # noqa: F401

from pathlib import Path

from msdseg.jobs.gpu_slots import gpu_slot
from msdseg.jobs.infer_jobs import predict_cases
from msdseg.logs import job_log


def files(value):
    """A named input as a list (a single file comes as a string)."""
    return [value] if isinstance(value, str) else list(value)


# a GPU of its own (where the machine has any) before anything initialises CUDA
with job_log(snakemake.log[0]), gpu_slot(1):
    predict_cases(
        [Path(path) for path in files(snakemake.input.models)],
        [(name, list(paths)) for name, paths in snakemake.params.cases],
        snakemake.output.staged,
        snakemake.params.infer,
        threads=snakemake.threads,
    )
