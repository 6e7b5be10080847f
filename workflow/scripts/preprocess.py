"""Rule preprocess_training: a resampled chunk's training subjects as the patch loader reads them."""

import _bootstrap  # noqa: F401

from pathlib import Path

from msdseg.data.preprocessed import preprocess_subjects
from msdseg.logs import job_log
from msdseg.plan.preprocessing import read_plan

with job_log(snakemake.log[0]):
    staged = Path(snakemake.input.staged)
    rows = [
        {"subject": s, "image": str(staged / "imagesTr" / f"{s}.nii.gz"),
         "label": str(staged / "labelsTr" / f"{s}.nii.gz")}
        for s in snakemake.params.subjects
    ]
    preprocess_subjects(rows, read_plan(snakemake.input.plan), snakemake.output.folder, snakemake.params.seed)
