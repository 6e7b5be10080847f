"""Rule summarize: the Dice summary over folds, the box plot, the best/worst overlays and the provenance."""

import _bootstrap  # noqa: F401

from msdseg.jobs.report_jobs import summarize_job
from msdseg.logs import job_log

with job_log(snakemake.log[0]):
    summarize_job(
        dict(zip(snakemake.params.folds, snakemake.input.metrics)),
        snakemake.input.manifest,
        snakemake.params.prediction_pattern,
        snakemake.config,
        out_summary=snakemake.output.summary,
        out_boxplot=snakemake.output.boxplot,
        out_overlays=snakemake.output.overlays,
        out_provenance=snakemake.output.provenance,
    )
