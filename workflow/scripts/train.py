"""Rule train: one fold's U-Net from the resampled training subjects, then its learning curve."""

import _bootstrap  # noqa: F401

from pathlib import Path

from msdseg.logs import job_log
from msdseg.decathlon import subject_id
from msdseg.manifest import read_manifest
from msdseg.plots import plot_learning_curve
from msdseg.resample import read_plan
from msdseg.train import train

with job_log(snakemake.log[0]):
    fold = int(snakemake.wildcards.fold)
    folds = read_manifest(snakemake.input.manifest).set_index("subject")["fold"]
    subjects = [
        {"subject": subject_id(image), "image": image, "label": label}
        for image, label in zip(snakemake.input.images, snakemake.input.labels)
    ]
    model_path = train(
        [s for s in subjects if folds[s["subject"]] != fold],
        [s for s in subjects if folds[s["subject"]] == fold],
        read_plan(snakemake.input.plan),
        snakemake.config,
        out_dir=Path(snakemake.output.model).parent,
        fold=fold,
        threads=snakemake.threads,
    )
    plot_learning_curve(snakemake.output.log_csv, snakemake.output.curve)
