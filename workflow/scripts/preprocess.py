"""Rule preprocess_training: a resampled chunk's training subjects as the patch loader reads them."""

import _bootstrap  # noqa: F401

from msdseg.data.preprocessed import preprocess_staged
from msdseg.logs import job_log
from msdseg.plan.preprocessing import read_plan

with job_log(snakemake.log[0]):
    # the chunk's resampled subjects, and only those
    preprocess_staged(snakemake.input.staged, read_plan(snakemake.input.plan), snakemake.output.folder,
                      snakemake.params.seed)
