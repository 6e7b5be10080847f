"""Rule plan_training: network, patch, batch and iterations from the fingerprint, the device and the budget."""

import _bootstrap  # noqa: F401

import json
import logging

import torch

from msdseg.config import check_labels
from msdseg.data.manifest import read_manifest
from msdseg.data.preprocessed import training_rows
from msdseg.decathlon import label_map
from msdseg.devices import cpu_has_native_bf16
from msdseg.files import write_text
from msdseg.jobs.gpu_slots import gpu_slot
from msdseg.logs import job_log
from msdseg.plan.fingerprint import Fingerprint, detect_device
from msdseg.plan.preprocessing import read_plan
from msdseg.plan.record import TrainingPlan
from msdseg.plan.training import plan_training
from msdseg.train.probe import settle_iterations, torch_probe

# the probe runs on the GPU the train job will use: take a slot first (before CUDA starts)
with job_log(snakemake.log[0]), gpu_slot(int(snakemake.params.devices)):
    plan = read_plan(snakemake.input.plan)
    user = snakemake.params.user
    check_labels({"class_weights": user.get("train.class_weights"),
                  "label_probabilities": user.get("train.label_probabilities")},
                 label_map(plan["labels"]), f"{snakemake.input.plan} (the task's labels)")
    fingerprint = Fingerprint.from_manifest(read_manifest(snakemake.input.manifest), plan)
    settings = snakemake.params.plan
    torch.set_num_threads(snakemake.threads)
    device, here = detect_device(settings["device"], snakemake.threads, settings["gpu_memory_gb"])
    native_bf16 = device.type == "cpu" and cpu_has_native_bf16()
    probe = None
    if here:
        precision = user.get("train.precision", "bf16" if native_bf16 else "auto")
        probe = torch_probe(fingerprint, torch.device(device.type), precision)
    training = plan_training(fingerprint, device, snakemake.params.budget_minutes, user, probe=probe,
                             n_folds=snakemake.params.n_folds, cpu_native_bf16=native_bf16)
    planned = training.as_dict()
    if here and "train.iterations" not in user:  # the step misses the data: settle from the pipeline's pace
        declared = {"seed": snakemake.params.seed, "model": snakemake.params.model,
                    "train": {**snakemake.params.train, "max_minutes": snakemake.params.budget_minutes}}
        rows = training_rows(snakemake.input.images, snakemake.input.labels,
                             getattr(snakemake.input, "preprocessed", []))
        planned = settle_iterations(planned, rows, plan, declared, snakemake.threads, snakemake.params.n_folds,
                                    device.type)
    settled = TrainingPlan.from_dict(planned)
    spacing = plan["resolution"]["reason"] if plan["resolution"] else "full resolution"
    logging.getLogger("msdseg.plan.preprocessing").info("training plan for %s at %s mm (%s):\n%s", device.describe(),
                                                       plan["target_spacing"], spacing, settled.table())
    write_text(json.dumps(planned, indent=2, sort_keys=True) + "\n", snakemake.output.plan)
    write_text(settled.csv(), snakemake.output.table)
