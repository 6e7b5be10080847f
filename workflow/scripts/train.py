"""Rule train: one fold's U-Net from the resampled training subjects, then its learning curve."""

import _bootstrap  # noqa: F401

import json
import logging
from pathlib import Path

from msdseg.decathlon import subject_id
from msdseg.devices import gpu_slot
from msdseg.logs import job_log
from msdseg.manifest import read_manifest
from msdseg.plan import read_plan
from msdseg.planner import apply_plan, plan_table, settle_here
from msdseg.plots import plot_learning_curve
from msdseg.train import train

# the job's own GPUs (train.devices of them) before anything initialises CUDA
with job_log(snakemake.log[0]), gpu_slot(int(snakemake.params.train["devices"])):
    fold = int(snakemake.wildcards.fold)
    folds = read_manifest(snakemake.input.manifest).set_index("subject")["fold"]
    subjects = [
        {"subject": subject_id(image), "image": image, "label": label}
        for image, label in zip(snakemake.input.images, snakemake.input.labels)
    ]
    training_plan = json.loads(Path(snakemake.input.training_plan).read_text())
    if training_plan["settings"]["train.iterations"]["value"] is None:  # planned on another machine
        training_plan = settle_here(training_plan, snakemake.params.n_folds)
    logging.getLogger("msdseg.plan").info("training plan:\n%s", plan_table(training_plan))
    # only the sections the rule declares (a change elsewhere never reaches training), with the plan's values
    config = apply_plan(
        {"seed": snakemake.params.seed, "model": snakemake.params.model, "train": snakemake.params.train},
        training_plan,
    )
    model_path = train(
        [s for s in subjects if folds[s["subject"]] != fold],
        [s for s in subjects if folds[s["subject"]] == fold],
        read_plan(snakemake.input.plan),
        config,
        out_dir=Path(snakemake.output.model).parent,
        fold=fold,
        threads=snakemake.threads,
    )
    plot_learning_curve(snakemake.output.log_csv, snakemake.output.curve)
