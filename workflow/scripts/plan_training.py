"""Rule plan_training: network, patch, batch and iterations from the fingerprint, the device and the budget."""

import _bootstrap  # noqa: F401

from msdseg.data.preprocessed import training_rows
from msdseg.jobs.gpu_slots import gpu_slot
from msdseg.jobs.train_jobs import plan_training_job
from msdseg.logs import job_log

# the probe runs on the GPU the train job will use: take a slot first (before CUDA starts)
with job_log(snakemake.log[0]), gpu_slot(int(snakemake.params.devices)):
    plan_training_job(
        snakemake.input.plan,
        snakemake.input.manifest,
        training_rows(snakemake.input.images, snakemake.input.labels, getattr(snakemake.input, "preprocessed", [])),
        user=snakemake.params.user,
        settings=snakemake.params.plan,
        declared={"seed": snakemake.params.seed, "model": snakemake.params.model, "train": snakemake.params.train},
        budget_minutes=snakemake.params.budget_minutes,
        n_folds=snakemake.params.n_folds,
        threads=snakemake.threads,
        out_plan=snakemake.output.plan,
        out_table=snakemake.output.table,
    )
