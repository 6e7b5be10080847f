"""Rule download: fetch the archive (resuming, retrying) and verify its digest."""

import _bootstrap  # noqa: F401

from msdseg.data.download import download_task
from msdseg.logs import job_log

with job_log(snakemake.log[0]):
    download_task(
        dict(snakemake.params.source),
        snakemake.output.archive,
        retries=snakemake.params.retries,
        demo_files=list(snakemake.input.demo),
    )
