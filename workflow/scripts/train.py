"""Rule train: one fold's U-Net from the resampled training subjects, then its learning curve."""

import _bootstrap  # noqa: F401

import json
import logging
from pathlib import Path

from msdseg.data.manifest import read_manifest, split_fold
from msdseg.data.preprocessed import training_rows
from msdseg.jobs.gpu_slots import gpu_slot
from msdseg.logs import job_log
from msdseg.plan.preprocessing import read_plan
from msdseg.plan.record import apply_plan, plan_table
from msdseg.report.plots import plot_learning_curve
from msdseg.train.probe import settle_iterations
from msdseg.train.trainer import train

# the job's own GPUs (train.devices of them) before anything initialises CUDA
with job_log(snakemake.log[0]), gpu_slot(int(snakemake.params.train["devices"])):
    fold = int(snakemake.wildcards.fold)
    split = split_fold(read_manifest(snakemake.input.manifest).set_index("subject")["fold"].to_dict(), fold)
    preprocessed = getattr(snakemake.input, "preprocessed", [])
    subjects = training_rows(snakemake.input.images, snakemake.input.labels, preprocessed)
    if not split.held_out:
        logging.getLogger("msdseg.train").warning(
            "fold %d: the task has one labelled subject, so it trains and validates on %s; "
            "its Dice is not held out (dice_summary.csv: held_out false).", fold, split.validation[0])
    training_plan = json.loads(Path(snakemake.input.training_plan).read_text())
    plan = read_plan(snakemake.input.plan)
    # only the sections the rule declares (a change elsewhere never reaches training), with the plan's values
    declared = {"seed": snakemake.params.seed, "model": snakemake.params.model, "train": snakemake.params.train}
    fold_rows = [s for s in subjects if s["subject"] in split.training]
    if training_plan["settings"]["train.iterations"]["value"] is None:  # planned on another machine
        training_plan = settle_iterations(training_plan, fold_rows, plan, declared, snakemake.threads,
                                          snakemake.params.n_folds, probe_step=True)
    logging.getLogger("msdseg.plan.preprocessing").info("training plan:\n%s", plan_table(training_plan))
    model_path = train(
        fold_rows,
        [s for s in subjects if s["subject"] in split.validation],
        plan,
        apply_plan(declared, training_plan),
        out_dir=Path(snakemake.output.model).parent,
        fold=fold,
        threads=snakemake.threads,
    )
    plot_learning_curve(snakemake.output.log_csv, snakemake.output.curve)
