"""Rule download: fetch the archive (resuming, retrying) and verify its digest."""

import _bootstrap  # noqa: F401

from pathlib import Path

from msdseg.data.download import download
from msdseg.logs import job_log

with job_log(snakemake.log[0]):
    source = dict(snakemake.params.source)
    demo = list(snakemake.input.demo)
    if demo:  # the generated demo archive goes through the same path, as a file:// source
        archive = next(path for path in demo if path.endswith(".tar"))
        md5_file = next(path for path in demo if path.endswith(".md5"))
        source["url"] = Path(archive).resolve().as_uri()
        source["md5"] = Path(md5_file).read_text().strip()
    download(
        source["url"],
        Path(snakemake.output.archive),
        md5=source["md5"],
        sha256=source["sha256"],
        retries=snakemake.params.retries,
    )
