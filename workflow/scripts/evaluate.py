"""Rule evaluate_fold: metrics per subject and class against the original labels."""

import _bootstrap  # noqa: F401

from msdseg.jobs.report_jobs import evaluate_fold_job
from msdseg.logs import job_log

with job_log(snakemake.log[0]):
    evaluate_fold_job(
        snakemake.input.predictions,
        snakemake.input.references,
        snakemake.input.folder,
        snakemake.params.evaluate,
        snakemake.output.metrics,
    )
