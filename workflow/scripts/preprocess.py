"""Rule preprocess_training: a resampled chunk's training subjects as the patch loader reads them."""

import _bootstrap  # noqa: F401

from pathlib import Path

from msdseg.data.preprocessed import preprocess_subjects, training_rows
from msdseg.logs import job_log
from msdseg.plan.preprocessing import read_plan

with job_log(snakemake.log[0]):
    staged = Path(snakemake.input.staged)  # the chunk's resampled subjects, and only those
    images = sorted(str(path) for path in (staged / "imagesTr").iterdir() if not path.name.startswith("."))
    labels = [str(staged / "labelsTr" / Path(image).name) for image in images]
    rows = training_rows(images, labels)
    preprocess_subjects(rows, read_plan(snakemake.input.plan), snakemake.output.folder, snakemake.params.seed)
