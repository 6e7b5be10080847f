"""Rule extract: verify a local archive when a digest is given, then extract it safely."""

import _bootstrap  # noqa: F401

from pathlib import Path

from msdseg.data.archive import safe_extract
from msdseg.data.download import verify_checksum
from msdseg.logs import job_log

with job_log(snakemake.log[0]):
    archive = Path(snakemake.input.archive)
    if snakemake.params.md5 or snakemake.params.sha256:
        verify_checksum(archive, md5=snakemake.params.md5, sha256=snakemake.params.sha256)
    safe_extract(archive, Path(snakemake.output.folder))
