"""Rule evaluate_fold: metrics per subject and class against the original labels."""

import _bootstrap  # noqa: F401

from pathlib import Path

from msdseg.decathlon import read_dataset_json
from msdseg.files import write_csv
from msdseg.logs import job_log
from msdseg.metrics import evaluate_subject
from msdseg.report.tables import fold_metrics

with job_log(snakemake.log[0]):
    labels = read_dataset_json(Path(snakemake.input.folder)).labels
    settings = snakemake.params.evaluate
    rows = []
    for prediction, reference in zip(snakemake.input.predictions, snakemake.input.references):
        rows += evaluate_subject(
            Path(prediction),
            Path(reference),
            labels,
            nsd_tolerance_mm=settings["nsd_tolerance_mm"],
            hausdorff_percentile=settings["hausdorff_percentile"],
        )
    write_csv(fold_metrics(rows), snakemake.output.metrics)
