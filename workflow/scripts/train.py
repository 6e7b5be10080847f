"""Rule train: one fold's U-Net from the resampled training subjects, then its learning curve."""

import _bootstrap  # noqa: F401

from msdseg.data.preprocessed import training_rows
from msdseg.jobs.gpu_slots import gpu_slot
from msdseg.jobs.train_jobs import train_fold_job
from msdseg.logs import job_log

# the job's own GPUs (train.devices of them) before anything initialises CUDA
with job_log(snakemake.log[0]), gpu_slot(int(snakemake.params.train["devices"])):
    train_fold_job(
        snakemake.input.manifest,
        int(snakemake.wildcards.fold),
        training_rows(snakemake.input.images, snakemake.input.labels, getattr(snakemake.input, "preprocessed", [])),
        plan_path=snakemake.input.plan,
        training_plan_path=snakemake.input.training_plan,
        # only the sections the rule declares: a change elsewhere in the config never reaches training
        declared={"seed": snakemake.params.seed, "model": snakemake.params.model, "train": snakemake.params.train},
        n_folds=snakemake.params.n_folds,
        threads=snakemake.threads,
        out_model=snakemake.output.model,
        out_curve=snakemake.output.curve,
    )
