"""Rules infer_fold / infer_test: predict one subject and write it in its original geometry."""

import _bootstrap  # noqa: F401

from pathlib import Path

from msdseg.logs import job_log
from msdseg.predict import predict_subject

with job_log(snakemake.log[0]):
    predict_subject(
        [Path(path) for path in snakemake.input.models],
        Path(snakemake.input.image),
        Path(snakemake.input.reference),
        Path(snakemake.output.prediction),
        snakemake.params.infer,
        threads=snakemake.threads,
    )
