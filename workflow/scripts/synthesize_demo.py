"""Rule synthesize_demo: write the embedded demo task as a Decathlon archive and its MD5."""

import _bootstrap  # noqa: F401

from msdseg.data.synthetic import make_synthetic_task
from msdseg.files import atomic_path, write_text
from msdseg.logs import job_log

with job_log(snakemake.log[0]):
    synthetic = snakemake.params.synthetic
    with atomic_path(snakemake.output.archive) as archive:
        md5 = make_synthetic_task(
            archive, n_train=synthetic["n_train"], n_test=synthetic["n_test"], seed=snakemake.params.seed
        )
    write_text(md5 + "\n", snakemake.output.md5)
